"""The course as a learner meets it: JupyterLab in Chromium, every notebook run from the menu.

nbval runs the notebooks in a kernel; what breaks only in the browser is
checked here: a widget that says "Error displaying widget", a Mermaid block
left as text, a figure that never appears, Chinese drawn as boxes, and a
playground whose buttons do nothing.  Marked ``browser`` and left out of the
default run (pyproject.toml); run it with ``pytest -m browser tests/browser``.

A cell whose error is the lesson carries the cell tag ``raises-exception``
(JupyterLab's Run All then goes on past it, and nbval expects the error);
any other error or printed traceback fails its notebook.  Today no cell
needs it: 07 catches every error it shows and prints it.

One JupyterLab and one Chromium serve the whole run.  Where Playwright or a
Chromium is missing, every test here is skipped with one line that says how to
get it (a failure under NESTPY_NO_SKIP, as in CI).  The fixtures live in this
module, not in a conftest.py: tests elsewhere import `conftest` by name, and a
second conftest module would take that name from them.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from jupyterlab_driver import COURSE, PANEL, Expected, Lab, LabServer, Outputs

if TYPE_CHECKING:
    from playwright.sync_api import Locator

pytestmark = pytest.mark.browser

# The English edition, whole; of the Chinese one (the same code cells, see
# tests/course/test_editions.py), its course map and one lesson, for its prose.
CHINESE = ["zh/00_course_map.ipynb", "zh/02_basic_usage.ipynb"]
NOTEBOOKS = sorted(p.name for p in COURSE.glob("*.ipynb")) + CHINESE
RUN_ALL_TIMEOUT = 60.0  # seconds; here Run All takes 0.4-3 s, 08 11 s: room for slower machines
SLOW = {"05c_python_and_nestjs.ipynb": 90.0, "08_scaling_out.ipynb": 90.0}

SCREENSHOTS = Path(__file__).with_name("screenshots")  # in .gitignore: for a person to look at
SYSTEM_CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_CHROMIUM = (
    "no Chromium found: apt-get install chromium fonts-noto-cjk (Debian, Ubuntu),"
    " or playwright install chromium"
)


@pytest.fixture(scope="session")
def notebooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of notebooks/, so a run never writes into the committed outputs.

    No notebook reads a file outside notebooks/ (02 reads its extras from the
    installed package's metadata), so the folder alone is a learner's setup.
    """
    copy = tmp_path_factory.mktemp("course") / "notebooks"
    shutil.copytree(
        COURSE, copy, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    )
    return copy


@pytest.fixture(scope="session")
def lab(notebooks: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab serving the copy, and a Chromium page on it; both stopped at the end."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed: pip install -r requirements.txt")
    playwright = sync_playwright().start()
    try:
        own = Path(playwright.chromium.executable_path)  # what `playwright install` puts there
        found = next(filter(None, map(shutil.which, SYSTEM_CHROMIUMS)), None)
        if not own.exists() and found is None:
            pytest.skip(NO_CHROMIUM)
        browser = playwright.chromium.launch(executable_path=None if own.exists() else found)
        server = LabServer(notebooks, tmp_path_factory.mktemp("jupyter"), secrets.token_hex(16))
        try:
            server.start()
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.set_default_timeout(30_000)
            yield Lab(page, server)
        finally:
            browser.close()
            left = server.stop()
        assert not left, f"kernels left running after JupyterLab stopped: {left}"
    finally:
        playwright.stop()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """The folder, emptied: what it holds comes from the last run, failures' shots too."""
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir()
    return SCREENSHOTS


def shot(name: str) -> str:
    """The screenshot's and the test's name: ``02_basic_usage``, ``zh_02_basic_usage``."""
    return name.removesuffix(".ipynb").replace("/", "_")


@pytest.mark.parametrize("name", NOTEBOOKS, ids=[shot(n) for n in NOTEBOOKS])
def test_notebook_runs_from_the_menu(
    lab: Lab, notebooks: Path, screenshots: Path, name: str
) -> None:
    path = notebooks / name
    expected = Expected.read(path)
    lab.open(name)
    lab.console.clear()
    problems: list[str] = []
    try:
        problems = lab.run_all(name, expected, SLOW.get(name, RUN_ALL_TIMEOUT))
        left = lab.kernel_children(name)
        problems += [f"left running: {pid} {cmd}" for pid, cmd in left.items()]
        lab.save(path)
        outputs = Outputs.read(path, expected)
        problems += [f"cell {i}: {error}" for i, error in sorted(outputs.errors.items())]
        problems += lab.rendering_problems(expected, outputs)
        problems += lab.cjk_problems(prose=name in CHINESE)
        lab.screenshot(screenshots / f"{shot(name)}.png")
    except Exception:
        lab.page.screenshot(path=str(screenshots / f"{shot(name)}_error.png"))
        raise
    finally:
        problems += lab.close(name)
    if problems and lab.console:
        problems += ["the browser console said:", *lab.console[-5:]]
    assert not problems, f"{name} in JupyterLab:\n" + "\n".join(problems)


FRAME = re.compile(r"^([→←]) b'(\d+)#(.*)'$", re.MULTILINE)


def frames(wire: str) -> list[tuple[str, dict]]:
    """The TCP frames the form shows, each as its direction and its JSON.

    Each frame's declared length must be its JSON's: these are ASCII, where
    JavaScript's string length is the byte count.
    """
    found = FRAME.findall(wire)
    assert found, f"no frame in {wire!r}"
    for _, length, body in found:
        assert int(length) == len(body), f"frame {length}#{body}: the length is not the JSON's"
    return [(way, json.loads(body)) for way, _, body in found]


def test_playground_answers_from_the_form(lab: Lab, notebooks: Path, screenshots: Path) -> None:
    """04's form, used as its notes say: run its cell again, then type, click and read."""
    name = "04_client.ipynb"
    path = notebooks / name
    lab.open(name)
    try:
        problems = lab.run_all(name, Expected.read(path), RUN_ALL_TIMEOUT)
        assert not problems, problems
        form = lab.page.locator(".jp-Cell", has=lab.page.locator("button", has_text="Send"))
        try:
            form.wait_for(timeout=10_000)
        except Exception as exc:
            raise AssertionError("04 shows no form with a Send button after Run All") from exc
        form.scroll_into_view_if_needed()
        closed = form.locator(".jp-OutputArea-output").text_content() or ""
        assert "Run the cell above this form again" in closed, closed
        assert form.locator("button", has_text="Send").is_disabled()

        lab.run_cell(name, int(form.get_attribute("data-windowed-list-index") or -1))
        assert form.locator("button", has_text="Send").is_enabled(), "the form is still closed"
        cut = form.locator(".widget-label").evaluate_all(
            "ls => ls.filter(l => l.scrollWidth > l.clientWidth).map(l => l.innerText)"
        )
        assert not cut, f"labels cut off: {cut}"

        reply, wire = playground_click(form, "Send", '{"cmd": "sum"}', "[4, 5, 6]")
        assert reply == "15", (reply, wire)
        (out, request), (back, response) = frames(wire)
        assert (out, back) == ("→", "←"), wire
        assert request["pattern"] == {"cmd": "sum"} and request["data"] == [4, 5, 6], request
        assert response == {"response": 15, "isDisposed": True, "id": request["id"]}, response

        reply, wire = playground_click(form, "Emit", "user_created", '{"userId": "42"}')
        assert reply == "(event emitted: an event gets no reply)", (reply, wire)
        assert frames(wire) == [("→", {"pattern": "user_created", "data": {"userId": "42"}})]

        reply, wire = playground_click(form, "Send", '{"cmd": "sum"}', "[1, 2")
        assert reply.startswith("The payload is not valid JSON") and "Nothing was sent." in reply
        assert wire == "(nothing went over the wire)", wire
        form.screenshot(path=str(screenshots / f"{path.stem}_playground.png"))

        lab.run_cell(name, Expected.read(path).code_cells[-1])  # the clean-up closes the new form
        assert lab.kernel_children(name) == {}
        lab.save(path)
    except Exception:
        lab.page.screenshot(path=str(screenshots / f"{path.stem}_playground_error.png"))
        raise
    finally:
        left = lab.close(name)
    assert not left, left


def playground_click(form: Locator, button: str, pattern: str, payload: str) -> tuple[str, str]:
    """Type a pattern and a payload, click, and return the reply and the wire as the form shows."""
    for box, text in ((form.locator(".widget-text input"), pattern),
                      (form.locator(".widget-textarea textarea"), payload)):  # fmt: skip
        box.fill("")
        box.press_sequentially(text)
    before = playground_texts(form)
    form.locator("button", has_text=re.compile(f"^{button}$")).click()
    deadline = 15_000
    while (now := playground_texts(form)) == before and deadline > 0:
        form.page.wait_for_timeout(100)
        deadline -= 100
    assert now != before, f"{button}: the form showed nothing new within 15 s"
    return now


def playground_texts(form: Locator) -> tuple[str, str]:
    """The reply and the wire: the HTML widgets right under the 'Reply' and 'Wire' headings."""
    texts = form.locator(".widget-html-content").evaluate_all("hs => hs.map(h => h.textContent)")
    heads = [t.split(":")[0].strip() for t in texts]
    return texts[heads.index("Reply") + 1].strip(), texts[heads.index("Wire") + 1].strip()


def test_each_course_map_opens_the_other_edition(lab: Lab) -> None:
    """The link at the top of each course map, clicked as a reader would, opens the other one."""
    english, chinese = "00_course_map.ipynb", "zh/00_course_map.ipynb"
    lab.open(english)
    left: list[str] = []
    try:
        for there, href in ((chinese, chinese), (english, f"../{english}")):
            # JupyterLab rewrites a relative href into a server URL; the text stays the path
            link = lab.page.locator(f"{PANEL} .jp-MarkdownOutput a", has_text=href).first
            link.click()
            deadline = time.monotonic() + 60
            while lab.active_path() != there or lab.server.kernel_state(there) != "idle":
                assert time.monotonic() < deadline, f"the link {href} did not open {there}"
                time.sleep(0.2)
    finally:
        left += lab.close(english)  # the active tab; the Chinese one comes to the front
        left += lab.close(chinese)
    assert not left, left
