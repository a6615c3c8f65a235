"""JupyterLab in Chromium, driven as a learner drives it: the menus, the mouse and the keys.

``LabServer`` runs ``jupyter lab`` from this venv on a free loopback port, with a
token, its settings and runtime files in a folder of its own.  ``Lab`` drives
one Playwright page: it opens a notebook, runs it from the Run menu, and reads
what the page shows.  JupyterLab 4 keeps its command registry out of the page's
globals, so every action goes through a menu item found by its label, or a key.

Playwright is never imported here at run time: the ``lab`` fixture imports it
when a browser test runs, so collecting the default suite needs no Playwright.
Processes are read from /proc, as on Linux, where CI runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Locator, Page

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
IMAGE_MIMES = ("image/png", "image/svg+xml", "image/jpeg")
RAISES_TAG = "raises-exception"  # the tag nbval, nbclient and JupyterLab's Run All all honour
TRACEBACK = "Traceback (most recent call last)"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
TIED_BROKER = "-m nestpy_mini.dev broker"  # brokers.find's embedded broker, tied to the kernel
COURSE = Path(__file__).resolve().parents[2] / "notebooks"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line), read from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            table[int(stat.parent.name)] = (int(fields[1]), fields[0], cmd)
    return table


def descendants(pid: int, spare: str = "") -> dict[int, str]:
    """Live processes under ``pid``, pid -> command; zombies are already dead.

    A process whose command holds ``spare`` is left out, with everything under it.
    """
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if spare and spare in table[child][2]:
            continue
        todo.extend(children.get(child, []))
        if table[child][1] != "Z":
            found[child] = table[child][2][:160]
    return found


def alive(pids: dict[int, str]) -> dict[int, str]:
    table = process_table()
    return {pid: cmd for pid, cmd in pids.items() if pid in table and table[pid][1] != "Z"}


@dataclass
class LabServer:
    """``jupyter lab`` on a free loopback port, serving ``root``; its state kept in ``state``.

    Settings, workspaces, config and runtime files live in ``state``, so neither
    the user's ~/.jupyter nor a kernel spec in ~/.local decides what runs: the
    kernel is this venv's Python, the one nbval uses.
    """

    root: Path
    state: Path
    token: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.state / "server.log"

    def start(self) -> None:
        settings = self.state / "user-settings"
        # The news prompt is a toast that would cover every screenshot.
        notes = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notes.parent.mkdir(parents=True, exist_ok=True)
        notes.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        for name in ("CONFIG", "DATA", "RUNTIME"):
            env[f"JUPYTER_{name}_DIR"] = str(self.state / name.lower())
        argv = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}", f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={self.state / 'workspaces'}",
        ]  # fmt: skip
        if os.geteuid() == 0:  # CI runs as root, and JupyterLab refuses root without this
            argv.append("--allow-root")
        with self.log.open("wb") as log:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                argv, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.api("GET", "/api/status")
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited:\n{self.log_tail()}")
            time.sleep(0.3)
        raise RuntimeError(f"jupyter lab did not answer within 60 s:\n{self.log_tail()}")

    def stop(self) -> list[str]:
        """Stop the server, which shuts its kernels down; return the kernels left running.

        Kernels run in sessions of their own (jupyter_client starts them so), so
        they are found by their connection files, which live in our runtime dir.
        """
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        marker = str(self.state / "runtime")
        deadline = time.monotonic() + 10
        while (left := self.kernel_processes(marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for line in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        return left

    @staticmethod
    def kernel_processes(marker: str) -> list[str]:
        return [
            f"{pid} {cmd[:160]}"
            for pid, (_, state, cmd) in process_table().items()
            if marker in cmd and state != "Z"
        ]

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            self.base + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def session(self, name: str) -> dict[str, Any] | None:
        for session in self.api("GET", "/api/sessions"):
            if session.get("path") == name:
                return session
        return None

    def kernel_state(self, name: str) -> str | None:
        session = self.session(name)
        return session["kernel"]["execution_state"] if session and session.get("kernel") else None

    def kernel_pid(self, name: str) -> int | None:
        """The notebook's kernel process, found by its connection file's name."""
        session = self.session(name)
        if not session or not session.get("kernel"):
            return None
        needle = f"kernel-{session['kernel']['id']}.json"
        for pid, (_, _, cmd) in process_table().items():
            if needle in cmd:
                return pid
        return None


# --- what the notebook file says should be on the page -------------------------------------


@dataclass
class Expected:
    """What a notebook holds, read from its file before the run: where to look on the page.

    The figures and widgets are the committed outputs': a plot that never shows
    leaves no output at all, so only the committed notebook says one belongs there.
    """

    code_cells: list[int]  # non-blank code cells: each must get an execution count
    mermaid_fences: int
    raises: set[int]  # cells tagged raises-exception: their error is the lesson
    figures: dict[int, int]  # cell -> how many images its committed outputs hold
    widgets: set[int]  # cells whose committed outputs hold a widget

    @classmethod
    def read(cls, path: Path) -> Expected:
        cells = json.loads(path.read_text())["cells"]
        data = [[o.get("data", {}) for o in c.get("outputs", [])] for c in cells]
        return cls(
            code_cells=[
                i for i, c in enumerate(cells)
                if c["cell_type"] == "code" and "".join(c["source"]).strip()
            ],
            mermaid_fences=sum(
                "".join(c["source"]).count("```mermaid")
                for c in cells if c["cell_type"] == "markdown"
            ),
            raises={i for i, c in enumerate(cells) if RAISES_TAG in c["metadata"].get("tags", [])},
            figures={
                i: n for i, outs in enumerate(data)
                if (n := sum(any(m in d for m in IMAGE_MIMES) for d in outs))
            },
            widgets={i for i, outs in enumerate(data) if any(WIDGET_MIME in d for d in outs)},
        )  # fmt: skip


@dataclass
class Outputs:
    """What a run left in the saved notebook, per cell index."""

    errors: dict[int, str]  # an error output, or a traceback printed as text
    widgets: set[int]
    images: dict[int, int]  # how many image outputs
    bare_figures: set[int]  # a "<Figure size ...>" with no image beside it

    @classmethod
    def read(cls, path: Path, expected: Expected) -> Outputs:
        errors: dict[int, str] = {}
        widgets: set[int] = set()
        images: dict[int, int] = {}
        bare: set[int] = set()
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                if out["output_type"] == "error" and i not in expected.raises:
                    last = ANSI.sub("", "\n".join(out.get("traceback", [])[-3:]))
                    errors[i] = f"{out['ename']}: {out['evalue']}\n{last}"
                text = "".join(out.get("text", "")) + "".join(data.get("text/plain", ""))
                if TRACEBACK in text and i not in expected.raises:
                    errors[i] = text[text.index(TRACEBACK) :][-1200:]
                if WIDGET_MIME in data:
                    widgets.add(i)
                if any(m in data for m in IMAGE_MIMES):
                    images[i] = images.get(i, 0) + 1
                elif "".join(data.get("text/plain", "")).startswith("<Figure size"):
                    bare.add(i)
        return cls(errors, widgets, images, bare)


# --- the page ---------------------------------------------------------------------------------

# Per cell: Mermaid diagrams, loaded images, widget views, and outputs that say a widget failed.
FINDINGS_JS = """(selector) => {
  const panel = document.querySelector(selector);
  const found = {};
  for (const c of panel.querySelectorAll('.jp-Cell')) {
    // A block Mermaid cannot parse stays text, with the parser's error under it.
    const mermaid = [...c.querySelectorAll('.jp-RenderedMermaid')].map(m => ({
      svg: !m.classList.contains('jp-mod-warning') && !!(
        m.querySelector('svg') || m.querySelector('img[src^="data:image/svg+xml"]')),
      text: m.classList.contains('jp-mod-warning')
        ? (m.querySelector(':scope > details > pre') || m).textContent.slice(0, 300) : ''}));
    const images = [...c.querySelectorAll('.jp-OutputArea-output img')]
      .filter(img => img.complete && img.naturalWidth > 0).length;
    // ipywidgets 8 draws a view it cannot make as an error view (an icon, "Click to show
    // javascript error."); a model it cannot find, as text. Printed text has a MIME type.
    const views = [...c.querySelectorAll('.jp-OutputArea-output .jupyter-widgets')];
    const widgets = views.filter(v => !v.querySelector('.jupyter-widgets-error-widget')).length;
    const broken = [...c.querySelectorAll('.jp-OutputArea-output:not([data-mime-type])')]
      .filter(o => o.querySelector('.jupyter-widgets-error-widget')
                   || /Error displaying widget|Loading widget|model not found/i.test(o.textContent))
      .map(o => 'a widget that failed to draw: ' + o.textContent.trim().slice(0, 200));
    found[c.dataset.windowedListIndex] = {mermaid, images, widgets, broken};
  }
  return found;
}"""

# For one heading: its Han characters' rendered width, against as many copies of a code point
# no font has (U+10FFFD, drawn as the missing-glyph box), in the heading's own font; and whether
# each Han character draws the same pixels as that box, as every character does without a font.
CJK_JS = r"""async (h) => {
  h.scrollIntoView();  // off screen, content-visibility skips its layout: let it lay out
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  const han = /\p{Script=Han}/u;
  const range = document.createRange();
  let width = 0;
  const chars = [];
  const walker = document.createTreeWalker(h, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (let i = 0; i < node.data.length; i++) {
      if (!han.test(node.data[i])) continue;
      chars.push(node.data[i]);
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      width += range.getBoundingClientRect().width;
    }
  }
  const style = getComputedStyle(h);
  const probe = document.createElement('span');
  probe.style.cssText = 'position:absolute;left:0;top:0;visibility:hidden;white-space:pre';
  probe.style.font = style.font;
  probe.textContent = '\u{10FFFD}'.repeat(chars.length);
  document.body.appendChild(probe);
  const box = probe.getBoundingClientRect().width;
  probe.remove();
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 64;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.font = `${style.fontWeight} 48px ${style.fontFamily}`;
  const ink = (ch) => {
    ctx.clearRect(0, 0, 64, 64);
    ctx.fillText(ch, 4, 52);
    return ctx.getImageData(0, 0, 64, 64).data.join(',');
  };
  const boxInk = ink('\u{10FFFD}');
  const drawnAsBox = [...new Set(chars)].filter(ch => ink(ch) === boxInk);
  const text = h.textContent.replace('¶', '').trim().slice(0, 120);
  return {text, count: chars.length, width, box, fontSize: parseFloat(style.fontSize), drawnAsBox};
}"""


class Lab:
    """One page of JupyterLab, driven through its menus and keys."""

    def __init__(self, page: Page, server: LabServer) -> None:
        self.page = page
        self.server = server
        self.console: list[str] = []  # the page's console errors: why a widget did not draw
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        line = message.text.strip().split("\n")[0][:300]  # the message, not its stack
        if message.type == "error" and line not in self.console:
            self.console.append(line)

    # --- menus, cells, files ------------------------------------------------------------

    def menu(self, title: str, label: str) -> None:
        """Click menu ``title``, then the enabled item whose label starts with ``label``."""
        self.page.keyboard.press("Escape")  # a menu left open
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{title}$")).click()
        item = self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(label)}"))
        self.page.locator(".lm-Menu li.lm-Menu-item:not(.lm-mod-disabled)").filter(
            has=item
        ).first.click()

    def open(self, name: str) -> None:
        """Load JupyterLab once, then File ▸ Open from Path…, and wait for an idle kernel."""
        if not self.page.url.startswith(self.server.base):
            self.page.goto(f"{self.server.base}/lab?reset&token={self.server.token}")
            self.page.locator(".lm-MenuBar-itemLabel").first.wait_for(timeout=60_000)
        self.menu("File", "Open from Path")
        self.page.locator(".jp-Dialog input").fill(name)
        self.page.locator(".jp-Dialog button.jp-mod-accept").click()
        self.page.locator(f"{PANEL} .jp-Cell").first.wait_for(timeout=60_000)
        deadline = time.monotonic() + 60
        while self.server.kernel_state(name) != "idle":
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: the kernel was not idle within 60 s of opening")
            time.sleep(0.2)

    def active_path(self) -> str | None:
        """The path of the notebook in the front tab, from the tab's tooltip ("Path: ...")."""
        title = self.page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current").first
        found = re.search(r"^Path: (.+)$", title.get_attribute("title") or "", re.MULTILINE)
        return found.group(1) if found else None

    def cell(self, index: int) -> Locator:
        return self.page.locator(f'{PANEL} .jp-Cell[data-windowed-list-index="{index}"]')

    def prompts(self) -> dict[int, str]:
        """Each code cell's prompt, '[3]' or '[*]' or '[ ]', by cell index."""
        found = self.page.evaluate(
            """(panel) => Object.fromEntries(
                 [...document.querySelectorAll(panel + ' .jp-CodeCell')].map(c => [
                   c.dataset.windowedListIndex,
                   (c.querySelector('.jp-InputArea-prompt')?.textContent || '').trim()]))""",
            PANEL,
        )
        return {int(i): text.rstrip(":") for i, text in found.items()}

    def run_all(self, name: str, expected: Expected, timeout: float) -> list[str]:
        """Clear every output, Run ▸ Run All Cells, wait; return what went wrong.

        Done is every code cell numbered and the kernel idle.  Run All stops at
        an error that was not expected, so a kernel idle for 3 s with cells
        still unnumbered is done as well, and the cells are reported.
        """
        self.menu("Edit", "Clear Outputs of All Cells")
        started = time.monotonic()
        self.menu("Run", "Run All Cells")
        idle_since: float | None = None
        while (now := time.monotonic()) - started < timeout:
            prompts = self.prompts()
            unrun = [i for i in expected.code_cells if not prompts.get(i, "").strip("[]").isdigit()]
            if "[*]" in prompts.values() or self.server.kernel_state(name) != "idle":
                idle_since = None
            elif not unrun:
                return []
            elif idle_since is None:
                idle_since = now
            elif now - idle_since > 3:
                return [f"Run All stopped: cells {unrun} never ran"]
            time.sleep(0.25)
        running = [i for i, p in self.prompts().items() if p == "[*]"]
        self.menu("Kernel", "Interrupt Kernel")
        return [f"Run All did not finish within {timeout:.0f} s; still running: {running}"]

    def run_cell(self, name: str, index: int, timeout: float = 60) -> None:
        """Click into a cell and press Shift+Enter, as a learner runs one cell again."""
        cell = self.cell(index)
        cell.scroll_into_view_if_needed()
        prompt = cell.locator(".jp-InputArea-prompt").inner_text()
        cell.locator(".jp-InputArea-editor .cm-content").click()
        self.page.keyboard.press("Shift+Enter")
        deadline = time.monotonic() + timeout
        while True:
            now = cell.locator(".jp-InputArea-prompt").inner_text()
            if now != prompt and "*" not in now and self.server.kernel_state(name) == "idle":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cell {index} did not finish within {timeout:.0f} s")
            time.sleep(0.2)

    def save(self, path: Path) -> None:
        before = path.stat().st_mtime_ns
        self.menu("File", "Save Notebook")
        deadline = time.monotonic() + 20
        while True:  # written, and whole: the server writes the file in more than one step
            if path.stat().st_mtime_ns != before:
                with contextlib.suppress(ValueError):
                    json.loads(path.read_text())
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{path.name} was not saved within 20 s")
            time.sleep(0.1)

    def close(self, name: str) -> list[str]:
        """File ▸ Close and Shut Down Notebook; return what outlived the kernel.

        The kernel and every process under it must end: an embedded broker
        too, which lives as long as the kernel by design (nestpy_mini.dev.brokers).
        """
        pid = self.server.kernel_pid(name)
        watched = {} if pid is None else {pid: "the kernel", **descendants(pid)}
        try:
            self.menu("File", "Close and Shut Down Notebook")
            dialog = self.page.locator(".jp-Dialog")
            dialog.wait_for(timeout=5000)
            dialog.locator("button.jp-mod-accept").click()
        except Exception:  # a page left in a bad state by a failure
            self.page.goto("about:blank")  # the next open loads JupyterLab anew
        problems = []
        deadline = time.monotonic() + 20
        while self.server.session(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        if session := self.server.session(name):
            self.server.api("DELETE", f"/api/sessions/{session['id']}")
            problems.append(f"{name}: its kernel still ran 20 s after Close and Shut Down")
        deadline = time.monotonic() + 15
        while (left := alive(watched)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for survivor, command in left.items():
            problems.append(f"outlived its kernel: {survivor} {command}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(survivor, signal.SIGKILL)
        return problems

    def kernel_children(self, name: str, within: float = 10) -> dict[int, str]:
        """What the notebook started and left running, given ``within`` s to stop it.

        An embedded broker that ``brokers.find`` started serves the kernel until
        it ends (a tied child, see nestpy_mini.dev.brokers): that one may stay.
        """
        pid = self.server.kernel_pid(name)
        if pid is None:
            return {}
        deadline = time.monotonic() + within
        while (left := descendants(pid, spare=TIED_BROKER)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    # --- what the page shows -------------------------------------------------------------

    def findings(self) -> dict[int, dict[str, Any]]:
        return {int(i): f for i, f in self.page.evaluate(FINDINGS_JS, PANEL).items()}

    def rendering_problems(
        self, expected: Expected, outputs: Outputs, within: float = 20
    ) -> list[str]:
        """Diagrams, figures and widgets as the page draws them, after the kernel is done."""
        deadline = time.monotonic() + within
        while True:
            found = self.findings()
            problems = []
            diagrams = [m for f in found.values() for m in f["mermaid"]]
            drawn = sum(m["svg"] for m in diagrams)
            if drawn != expected.mermaid_fences:
                problems.append(f"Mermaid: {drawn} of {expected.mermaid_fences} blocks drawn")
                problems += [
                    f"  cell {i}: {m['text']!r}"
                    for i, f in found.items() for m in f["mermaid"] if m["text"]
                ]
            for i in sorted(expected.figures.keys() | outputs.images.keys()):
                count = max(expected.figures.get(i, 0), outputs.images.get(i, 0))
                shown = found.get(i, {}).get("images", 0)
                if shown < count:
                    problems.append(f"cell {i}: {count} figures belong here, {shown} drawn")
            problems += [f"cell {i}: a figure with no image" for i in sorted(outputs.bare_figures)]
            for i in sorted(expected.widgets | outputs.widgets):
                if not found.get(i, {}).get("widgets"):
                    problems.append(f"cell {i}: a widget output, but no widget on the page")
            problems += [f"cell {i}: {text}" for i, f in found.items() for text in f["broken"]]
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.5)

    def cjk_problems(self, prose: bool = False, sample: int = 40) -> list[str]:
        """Chinese drawn as text: each Han character unlike the missing-glyph box.

        The headings, and with ``prose`` the paragraphs and list items too (the
        Chinese edition), up to ``sample`` of those, spread over the notebook.
        """
        kinds = "h1, h2, h3, p, li" if prose else "h1, h2, h3"
        found = self.page.locator(
            f"{PANEL} .jp-MarkdownOutput :is({kinds})", has_text=re.compile(r"[\u4e00-\u9fff]")
        )
        if found.count() == 0:
            return [f"no {kinds} with Chinese text on the page"]
        problems = []
        picked = range(0, found.count(), max(1, found.count() // sample))
        for k in picked:
            m = found.nth(k).evaluate(CJK_JS)
            per_char = m["width"] / m["count"]
            if m["drawnAsBox"] or abs(m["width"] - m["box"]) < 0.05 * m["box"]:
                problems.append(
                    f"{m['text']!r}: {m['count']} Han characters {m['width']:.1f} px wide,"
                    f" {m['count']} missing-glyph boxes {m['box']:.1f} px;"
                    f" drawn like the box: {''.join(m['drawnAsBox']) or 'none'}"
                )
            elif not 0.8 <= per_char / m["fontSize"] <= 1.2:  # CJK ideographs are one em wide
                problems.append(
                    f"{m['text']!r}: Han characters {per_char:.1f} px wide"
                    f" at {m['fontSize']:.0f} px font size; an ideograph is one em"
                )
        if len(problems) > 3:
            problems[3:] = [f"and {len(problems) - 3} more of {len(picked)} {kinds} so"]
        return problems

    def screenshot(self, path: Path) -> None:
        """The whole notebook in one PNG, from screens scrolled one after another.

        The notebook scrolls inside its own panel, so a full-page capture would
        show one screen; this pastes the screens together.
        """
        from PIL import Image  # matplotlib's dependency; the course installs it

        outer = self.page.locator(f"{PANEL} .jp-WindowedPanel-outer")
        box = outer.bounding_box()
        if box is None:
            self.page.screenshot(path=str(path))
            return
        tiles: list[tuple[int, bytes]] = []
        top = -1
        outer.evaluate("o => { o.scrollTop = 0; }")
        while True:
            self.page.wait_for_timeout(100)  # cells coming into view draw a moment later
            now = int(outer.evaluate("o => o.scrollTop"))
            if now <= top:
                break
            tiles.append((now, self.page.screenshot(clip=box)))
            top = now
            outer.evaluate(f"o => {{ o.scrollTop = {now + int(box['height'])}; }}")
        sheet = Image.new("RGB", (int(box["width"]), tiles[-1][0] + int(box["height"])), "white")
        for offset, png in tiles:
            sheet.paste(Image.open(io.BytesIO(png)), (0, offset))
        sheet.save(path)
        outer.evaluate("o => { o.scrollTop = 0; }")
