"""Small helpers the course notebooks share (the framework itself is ``nestpy_mini``).

The notebooks run with this folder as their working directory, so
``import course`` finds this file.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import contextlib
import contextvars
import html
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

from nestpy_mini import ClientProxy, ClientProxyFactory, Module, NestFactory, Transport
from nestpy_mini.dev import brokers, node

if TYPE_CHECKING:
    from nestpy_mini.dev.playground import WireTap

T = TypeVar("T")


class _OneLine(logging.Formatter):
    """Log records as one short line: no timestamps, no tracebacks.

    A traceback shows file paths, which differ from machine to machine, and a
    learner only needs the message; the framework keeps the details.
    """

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.levelname.lower()}] {record.getMessage()}"


class _RunningCell:
    """Writes to ``stream`` as the cell that is running now.

    ipykernel 7 sends a print to the cell whose code *started* the task that
    prints (it keeps the cell in a contextvar).  A service started in one cell
    runs its handlers, and logs, in tasks born from that cell, so their output
    would land under that earlier cell.  In an empty context ipykernel falls
    back to the cell that is executing, which is where a learner looks.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return contextvars.Context().run(self._stream.write, text)

    def flush(self) -> None:
        contextvars.Context().run(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def print_in_running_cell() -> None:
    """Route prints from background tasks to the cell that is running."""
    if not isinstance(sys.stdout, _RunningCell):
        sys.stdout = _RunningCell(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, _RunningCell):
        sys.stderr = _RunningCell(sys.stderr)  # type: ignore[assignment]


def show_logs(level: int = logging.WARNING) -> None:
    """Print nestpy_mini's log lines in the cell that caused them."""
    print_in_running_cell()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("nestpy_mini")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


# The exercises (06): a service that follows the learner's edits, and checks that wait for events.


class _Closable(Protocol):
    async def close(self) -> None: ...


# What each exercise started last: its key -> (what it was started from, what it started).
_running: dict[str, tuple[object, _Closable]] = {}


async def _start_once(key: str, source: object, start: Callable[[], Awaitable[Any]]) -> Any:
    """Return what ``source`` started under ``key`` if it still runs; else close the older one
    (started from other code) and ``await start()``.  ``None`` (not answered yet) is not kept."""
    if key in _running:
        previous_source, previous = _running[key]
        if previous_source == source:
            return previous
        del _running[key]
        await previous.close()
    started = await start()
    if started is not None:
        _running[key] = (source, started)
    return started


async def restart(start: Callable[[], Awaitable[T]]) -> T:
    """``await start()``, after closing what an earlier ``start`` of the same name started.

    An exercise cell defines classes and a start function, then starts a service.  Run the
    cell again after an edit and Python makes new classes and a new function, but the
    service the first run started still serves the old code: a check would test that.
    So ``restart`` keeps what each start function (by name) returned, and when a new
    function of that name comes, closes the old service before starting the new one.
    Called again with the very same function (a check cell does that), it returns the
    service that runs, or starts it anew if ``stop_all`` stopped it: checks can be rerun.
    """
    return await _start_once(start.__qualname__, start, start)


class _Served:
    """A service over TCP and a client connected to it, closed together."""

    def __init__(self, app: Any, client: ClientProxy) -> None:
        self.app, self.client = app, client

    async def close(self) -> None:
        await self.client.close()
        await self.app.close()


async def serve(*controllers: type) -> ClientProxy:
    """Serve ``controllers`` in one module over TCP on a free port; return a client for it.

    Restarted as ``restart`` does: once the cell that defines the controllers runs again,
    the service of the old classes is closed and the new classes are served.  The client's
    timeout is 2 s, so that a wrong answer fails a check quickly.
    """

    async def start() -> _Served:
        module = Module(controllers=controllers)(type("ExerciseModule", (), {}))
        app = await NestFactory.create_microservice(
            module, transport=Transport.TCP, options={"port": 0}
        )
        await app.start()
        client = ClientProxyFactory.create(Transport.TCP, {"port": app.server.port, "timeout": 2})
        return _Served(app, client)

    key = "serve " + " ".join(c.__qualname__ for c in controllers)
    served: _Served = await _start_once(key, controllers, start)
    return served.client


async def stop_all() -> int:
    """Close everything ``restart`` and ``serve`` started, the latest first; return how many."""
    count = 0
    while _running:
        _key, (_source, started) = _running.popitem()
        await started.close()
        count += 1
    return count


async def until(condition: Callable[[], bool], within: float) -> bool:
    """Wait until ``condition()`` holds, at most ``within`` seconds; return whether it does.

    An event gets no reply, so a check cannot await its handler: it watches what the
    handler changes, and is done as soon as the change shows.
    """
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)
    return True


# "Predict, then run" (02, 03): the answer, then whether the learner's guess matched.


def reveal(answer: object, guess: object = None) -> None:
    """Print the answer to a "predict, then run" question, and, once guessed, the verdict.

    ``guess`` stays ``None`` until the learner writes one, so the first line is all that a
    run of the notebook as shipped prints: the same output on every machine.
    """
    print(f"The answer is {answer!r}.")
    if guess is not None:
        verdict = "right (猜对了)" if guess == answer else "not this time (再想想为什么)"
        print(f"Your guess, {guess!r}: {verdict}.")


async def serve_hybrid(*controllers: type, providers: list[type] | tuple[type, ...] = ()) -> Any:
    """Serve ``controllers`` and ``providers`` as a hybrid app (2.3): HTTP and TCP, free ports.

    Restarted as ``serve`` does.  Returns the app: ``app.url`` for HTTP, and
    ``app.microservices[0].server.port`` for TCP.
    """

    async def start() -> Any:
        module = Module(controllers=controllers, providers=providers)(type("HybridModule", (), {}))
        app = await NestFactory.create(module)
        app.connect_microservice(transport=Transport.TCP, options={"port": 0})
        await app.start_all_microservices()
        await app.listen(0)
        return app

    key = "serve_hybrid " + " ".join(c.__qualname__ for c in controllers)
    return await _start_once(key, (controllers, tuple(providers)), start)


# Several instances of one service (05): fan-out needs more than one listener.


class _Instances(list[Any]):
    """Apps that ``start_instances`` started; ``close`` closes them all, the latest first."""

    async def close(self) -> None:
        while self:
            await self.pop().close()


async def start_instances(count: int, module: type, **how: Any) -> _Instances:
    """Start ``count`` instances of ``module``, each ``create_microservice(module, **how)``,
    as ``count`` processes of one service would run.  One ``await group.close()`` closes
    them all, so a start function for ``restart`` can return the group.
    """
    group = _Instances()
    try:
        for _ in range(count):
            app = await NestFactory.create_microservice(module, **how)
            group.append(await app.start())
    except BaseException:
        await group.close()
        raise
    return group


# Child processes (05c, 08): each prints ``ready`` once it serves, and closes gracefully when
# its standard input ends, so that none outlives a kernel that dies.


class Child:
    """A process the course started.  Its stdout lines after ``ready`` go to ``on_line``
    (by default into ``lines``); ``log`` keeps the last lines of its stderr, which
    ``failure`` quotes in one line."""

    def __init__(
        self,
        name: str,
        process: asyncio.subprocess.Process,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name, self.process = name, process
        self.lines: list[str] = []
        self.on_line = on_line or self.lines.append
        self.log: collections.deque[str] = collections.deque(maxlen=100)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readers = [asyncio.ensure_future(self._out()), asyncio.ensure_future(self._err())]

    async def _out(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line == "ready" and not self.ready.done():
                self.ready.set_result(None)
            else:
                self.on_line(line)

    async def _err(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.log.append(raw.decode(errors="replace").rstrip())

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug: it finishes nothing and closes nothing."""
        if self.running:
            self.process.kill()

    def failure(self) -> RuntimeError:
        """Why it failed, in one line: a Python or node error line, else its last line."""
        said = next((line for line in reversed(self.log) if _ERROR_LINE.match(line)), None)
        if said is None:
            said = self.log[-1] if self.log else f"exit code {self.process.returncode}"
        return RuntimeError(f"{self.name} failed: {said}")

    async def wait(self, within: float = 20.0) -> int:
        """Wait until it exits, at most ``within`` s; return its exit code."""
        code = await asyncio.wait_for(self.process.wait(), within)
        await asyncio.gather(*self._readers)
        return code

    async def close(self) -> None:
        """End its standard input (a graceful close), then SIGKILL after 5 s."""
        if self.running:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.kill()
        await self.wait()


# "TypeError: ...", "ConnectionError: ...", "nestpy_mini.exceptions.WiringError: ..."
_ERROR_LINE = re.compile(r"[\w.]*(Error|Exception)\b.*: ")


async def spawn(
    name: str, argv: list[str], on_line: Callable[[str], None] | None = None, **how: Any
) -> Child:
    """Start ``argv`` as a ``Child`` (``how``: ``cwd``, ``env``); do not wait for it."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **how,
    )
    return Child(name, process, on_line)


async def until_ready(*children: Child, within: float = 30.0) -> None:
    """Return once every child printed ``ready``; else close them all and raise why."""
    for child in children:
        exited = asyncio.ensure_future(child.process.wait())
        await asyncio.wait([child.ready, exited], timeout=within, return_when="FIRST_COMPLETED")
        exited.cancel()
        if not child.ready.done():
            for each in children:
                await each.close()
            raise child.failure()


# Instances as processes (08): notebooks/adder.py, one process per instance.


class Processes(list[Child]):
    """The instances ``start_processes`` started.  ``runs`` gets ``(name, n)`` each time
    an instance's handler starts on request ``n``; ``close`` stops them all."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[str, int]] = []

    def counter(self, name: str) -> Callable[[str], None]:
        """What to do with a line from instance ``name``: adder.py prints ``ran <n>``."""

        def count(line: str) -> None:
            if line.startswith("ran "):
                self.runs.append((name, int(line[4:])))

        return count

    async def close(self) -> None:
        await asyncio.gather(*(instance.close() for instance in self))


async def start_processes(
    count: int,
    transport: Transport,
    options: dict[str, Any],
    *,
    pattern: Any = None,
    work: float = 0.0,
    ack: bool = False,
) -> Processes:
    """Start ``count`` instances of the sum service, each ``python adder.py`` in a process
    of its own, named ``instance 1``, ``instance 2``...; return once every one serves.

    ``pattern`` defaults to the chapter's ``{"cmd": "sum"}``; ``work`` and ``ack`` are
    adder.py's options.
    """
    script = str(Path(__file__).with_name("adder.py"))
    group = Processes()
    for number in range(1, count + 1):
        name = f"instance {number}"
        argv = [sys.executable, script, "--name", name, "--transport", transport.name]
        argv += ["--options", json.dumps(options), "--work", str(work)]
        argv += ["--pattern", json.dumps(pattern or {"cmd": "sum"})] + (["--ack"] if ack else [])
        group.append(await spawn(name, argv, group.counter(name)))
    await until_ready(*group)
    return group


# =============================================================================================
# Python and NestJS side by side (05c): the TypeScript in nest/, compiled with tsc and run by
# node; its source shown in the notebook; the frames both sides write, recorded on the wire.
# =============================================================================================

NEST_SOURCES = Path(__file__).with_name("nest")
_REGION = re.compile(r"^// #region (\S+)\n(.*?)^// #endregion\n", re.MULTILINE | re.DOTALL)


class Source:
    """A source file, or part of one, shown as a Markdown code block: JupyterLab highlights it."""

    def __init__(self, text: str, language: str) -> None:
        self.text, self.language = text, language

    def _repr_markdown_(self) -> str:
        return f"```{self.language}\n{self.text}```"

    def __repr__(self) -> str:
        return self.text


def source(name: str, region: str | None = None) -> Source:
    """``nest/<name>``, or the part of it between ``// #region <region>`` and ``// #endregion``.

    The notebook shows the file itself, which is also what tsc compiles and node runs, so
    the TypeScript a learner reads cannot drift from the TypeScript that answered.
    """
    text = (NEST_SOURCES / name).read_text()
    language = "json" if name.endswith(".json") else "typescript"
    if region is None:
        return Source(text, language)
    for match in _REGION.finditer(text):
        if match[1] == region:
            return Source(match[2], language)
    raise KeyError(f"no // #region {region} in nest/{name}")


def compile_nest() -> Path:
    """Compile ``nest/`` with tsc on first use (``node.typescript``); return the build folder.

    A compile (and, on a new machine, the npm install before it) is announced on stderr
    by one line that only a first run prints.  It goes to the kernel's own log here, the
    terminal that runs Jupyter, so that the cell shows the same output on every run.
    """
    with contextlib.redirect_stderr(sys.__stderr__ or io.StringIO()):
        return node.typescript(NEST_SOURCES)


async def _node(build: Path, script: str, args: tuple[str, ...]) -> Child:
    # ipykernel sets FORCE_COLOR=1 for its own children; node would then wrap the numbers
    # that console.log prints in colour codes, which a cell's output should not hold.
    plain = {**os.environ, "FORCE_COLOR": "0", "NO_COLOR": "1"}
    return await spawn(f"node {script}", [node.node(), script, *args], cwd=build, env=plain)


async def start_node(build: Path, script: str, *args: str) -> Child:
    """Start ``node <script> <args>`` in ``build``; return once it prints ``ready``."""
    started = await _node(build, script, args)
    await until_ready(started, within=20)
    return started


async def run_node(build: Path, script: str, *args: str) -> list[str]:
    """Run ``node <script> <args>`` in ``build`` to its end; return the lines it printed."""
    ran = await _node(build, script, args)
    try:
        code = await ran.wait()
    finally:
        await ran.close()
    if code != 0:
        raise ran.failure()
    return ran.lines


class OwnBroker:
    """A broker that this notebook alone uses (``brokers.start``): ``url``, and ``close``."""

    def __init__(self, broker: brokers.Broker) -> None:
        self.broker, self.url = broker, broker.url

    async def close(self) -> None:
        await asyncio.to_thread(self.broker.stop)


async def own_broker(kind: str, port: int) -> OwnBroker:
    """Start ``kind``'s pip-shipped broker on ``port``, for this notebook alone.

    A broker that other services share delivers their messages too: on NATS, every
    subscriber of ``{"cmd":"sum"}`` gets every request (05, 5.3).  A broker of one's own
    makes sure that the service that answers is the one the lesson started.
    """
    return OwnBroker(await asyncio.to_thread(brokers.start, kind, port))


_ID = re.compile(rb'"id":"([^"]*)"')


def frames(tap: WireTap) -> list[tuple[str, bytes]]:
    """``(arrow, frame)`` for each whole frame ``tap`` recorded.

    A tap keeps lines to show, ``→ b'...'``, each frame as Python writes bytes: the
    bytes are read back from that, exactly.  Notes (a failed connection, an incomplete
    frame) are left out.
    """
    recorded = []
    for record in tap.records:
        arrow, _, shown = record.split("\n", 1)[0].partition(" ")
        if arrow in ("→", "←") and shown.endswith("'"):
            recorded.append((arrow, ast.literal_eval(shown)))
    return recorded


def mask_id(frame: bytes) -> bytes:
    """``frame`` with each character of its request id as ``*``: ids are random, so a run
    would show new ones every time; the length stays, so the frame's prefix still adds up."""
    return _ID.sub(lambda m: b'"id":"' + b"*" * len(m[1]) + b'"', frame)


def without_id(frame: bytes) -> bytes:
    """``frame`` with no length prefix and an empty id: what must match between two peers."""
    return _ID.sub(b'"id":""', frame.split(b"#", 1)[1])


class SideBySide:
    """Frames of two taps, a column each, a row per frame: a table in JupyterLab, text elsewhere."""

    def __init__(self, rows: list[str], columns: dict[str, WireTap]) -> None:
        self.rows = rows
        self.columns = {
            title: [f"{arrow} {mask_id(frame)!r}" for arrow, frame in frames(tap)]
            for title, tap in columns.items()
        }

    def _cell(self, column: list[str], row: int) -> str:
        return column[row] if row < len(column) else "(nothing)"

    def _repr_html_(self) -> str:
        left = 'style="text-align: left; vertical-align: top"'
        frame = 'style="white-space: pre-wrap; word-break: break-all"'  # wrap anywhere, evenly
        head = "".join(f"<th {left}>{html.escape(title)}</th>" for title in self.columns)
        body = ""
        for row, name in enumerate(self.rows):
            cells = "".join(
                f"<td {left}><code {frame}>{html.escape(self._cell(column, row))}</code></td>"
                for column in self.columns.values()
            )
            body += f"<tr><th {left}>{html.escape(name)}</th>{cells}</tr>"
        return f"<table><tr><th></th>{head}</tr>{body}</table>"

    def __repr__(self) -> str:
        lines = []
        for row, name in enumerate(self.rows):
            lines.append(name)
            for title, column in self.columns.items():
                lines.append(f"  {title}: {self._cell(column, row)}")
        return "\n".join(lines)


async def side_by_side(
    rows: list[str], columns: dict[str, WireTap], within: float = 2.0
) -> SideBySide:
    """``SideBySide`` of ``columns``, once each tap holds a frame per row (at most ``within`` s):
    a relay records a frame when it passes, which can be after its sender has moved on."""
    for tap in columns.values():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tap.wait_for(len(rows)), within)
    return SideBySide(rows, columns)
