"""A widget for calling a running service by hand and seeing the exact traffic.

``Playground`` sends or emits one message per click and shows two things: the
reply as the caller gets it, and what crossed the wire.  For TCP the traffic
is recorded by ``WireTap``, a relay the playground's client connects through,
so the frames shown are the bytes that really went out, not a re-encoding.
For Redis, NATS and MQTT a raw client of the broker subscribes to everything
(``RedisTap``, ``NatsTap``, ``MqttTap``) and shows each message with the
channel, subject or topic it was published to.  On a shared broker that
includes other clients' traffic: it is what the broker carried.

ipywidgets is imported only when a playground is built, so ``import
nestpy_mini`` stays light for services that never show a widget.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import html
import json
import secrets
import ssl
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .. import ClientProxy, ClientProxyFactory, RpcError, Transport
from ..transports.json_socket import FrameError
from ..transports.tcp import DEFAULT_HOST, DEFAULT_PORT
from . import brokers

if TYPE_CHECKING:
    import ipywidgets

Target = tuple[Transport | int, dict[str, Any]]

TO_SERVICE = "→"
FROM_SERVICE = "←"
# An event has no reply to wait for, and a broker tap gets its copies on its
# own connection: the playground waits at most SETTLE s for the traffic it
# expects, and off the path until QUIET s pass without a new line.
SETTLE = 1.0
QUIET = 0.05
ID_PREFIX = "play-"  # repeatable request ids: play-1, play-2, ...
# One label width for every box, wide enough for "Payload (JSON)": ipywidgets'
# default cuts a longer label to "Payload (J…", and one width keeps the boxes aligned.
LABEL_STYLE = {"description_width": "8em"}
CLOSED_NOTE = "This playground is closed. Make a new Playground to send again."
DEFAULT_BROKER_PORT = {"redis": 6379, "nats": 4222, "mqtt": 1883}
_MAX_PREFIX_DIGITS = 12


def _body_end(buf: bytearray, start: int, units: int) -> int | None:
    """Where a body of ``units`` UTF-16 units that starts at ``start`` ends, or
    None while it is incomplete.  Display only, so clarity beats speed here:
    the transport's own decoder counts the same way, incrementally."""
    chunk = bytes(buf[start : start + 3 * units])  # a unit is at most 3 bytes
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(chunk)
    encoded = text.encode("utf-16-le", "surrogatepass")
    if len(encoded) < 2 * units:
        return None
    body = encoded[: 2 * units].decode("utf-16-le", "surrogatepass")
    return start + len(body.encode("utf-8", "surrogateescape"))


def wire_line(head: str, data: bytes, tail: str = "") -> str:
    """One record of the wire: ``data`` as Python writes bytes, between ``head`` and ``tail``;
    under bytes that hold non-ASCII text, that text, aligned with them.

    The bytes are the wire's truth (``张`` is three of them, ``\\xe5\\xbc\\xa0``), and
    an exercise builds them by hand.  But a frame's length prefix counts
    characters as JavaScript does, so only the text lets a reader check it.
    """
    line = f"{head}{data!r}{tail}"
    if not data.isascii():
        line += "\n" + " " * (len(head) + 2) + data.decode("utf-8", "backslashreplace")
    return line


def split_frames(buf: bytearray) -> list[bytes]:
    """Cut the complete ``<length>#<json>`` frames off the front of ``buf``, as raw bytes.

    The length counts UTF-16 units, so a non-ASCII body is measured with the
    same code the TCP transport's decoder uses; a tap must cut where it cuts.
    """
    frames: list[bytes] = []
    while True:
        hash_at = buf.find(b"#", 0, _MAX_PREFIX_DIGITS + 1)
        if hash_at < 0:
            if len(buf) > _MAX_PREFIX_DIGITS:
                raise FrameError(f"no length prefix: {bytes(buf[:16])!r}")
            return frames
        prefix = bytes(buf[:hash_at])
        if not prefix.isdigit():
            raise FrameError(f"corrupted length prefix {prefix!r}")
        start, units = hash_at + 1, int(prefix)
        end = start + units
        if end > len(buf) or not buf[start:end].isascii():
            found = _body_end(buf, start, units)
            if found is None:
                return frames
            end = found
        frames.append(bytes(buf[:end]))
        del buf[:end]


class Tap:
    """What every tap shares: the traffic as lines, and a way to wait for them."""

    # A relay records a frame before passing it on, so once the caller has a
    # reply its frames are recorded.  A broker subscriber gets its copy on
    # its own connection, maybe later: it must be waited for.
    in_path = False

    def __init__(self) -> None:
        self.records: list[str] = []
        self._changed = asyncio.Event()

    async def start(self) -> Tap:
        return self

    async def close(self) -> None:
        pass

    def client_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options a client needs so that its traffic passes the tap."""
        return options

    def _record(self, line: str) -> None:
        self.records.append(line)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        """Wait until ``records`` holds ``count`` lines (bound it with ``asyncio.timeout``)."""
        while len(self.records) < count:
            self._changed.clear()
            await self._changed.wait()

    async def settle(self, count: int) -> None:
        """Wait, within ``SETTLE`` s, for ``count`` lines, and off the path for stragglers too."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE):
                await self.wait_for(count)
                while not self.in_path:  # e.g. a stream's separate end marker
                    async with asyncio.timeout(QUIET):
                        await self.wait_for(len(self.records) + 1)


class WireTap(Tap):
    """A TCP relay in front of a service that keeps a copy of every frame, both ways.

    A client connects to ``(tap.host, tap.port)`` instead of the service; the
    tap forwards the bytes unchanged.  ``records`` holds one line per frame,
    ``→`` towards the service and ``←`` back, in the order they passed.
    """

    in_path = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.upstream = (host, port)
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> WireTap:
        self._server = await asyncio.start_server(self._relay, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def client_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, "host": self.host, "port": self.port}

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = [writer]
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError as exc:
                # The client only sees its connection to the tap close; say why here.
                self._record(f"! cannot connect to {self.upstream[0]}:{self.upstream[1]}: {exc}")
                return
            writers.append(up_writer)
            self._writers.add(up_writer)
            await asyncio.gather(
                self._pump(reader, up_writer, TO_SERVICE),
                self._pump(up_reader, writer, FROM_SERVICE),
            )
        finally:
            for w in writers:
                self._writers.discard(w)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, arrow: str
    ) -> None:
        """Copy one direction, recording whole frames; when it ends, end the other side."""
        buf = bytearray()
        try:
            while data := await reader.read(65536):
                buf += data
                try:
                    frames = split_frames(buf)
                except FrameError:  # not Nest framing: show the bytes as they came
                    frames, buf = [bytes(buf)], bytearray()
                for frame in frames:
                    self._record(wire_line(f"{arrow} ", frame))
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if buf:
                self._record(wire_line(f"{arrow} ", bytes(buf), " (incomplete)"))
            writer.close()

    async def close(self) -> None:
        """Stop accepting and end every relayed connection."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        await self._server.wait_closed()
        self._server = None


class BrokerTap(Tap):
    """Everything published on a broker, as a raw client subscribed to all of it sees it.

    Brokers route by name, so there is no byte stream to relay; one
    subscriber to every channel sees each published message once, with the
    channel, subject or topic it went to.  The caller's own client connects
    to the broker as usual.
    """

    kind = ""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__()
        self.options = options
        self._task: asyncio.Task[None] | None = None

    async def _url(self) -> str:
        """The broker the target uses: its own option, else the one ``brokers`` finds."""
        named = self._named_url()
        if named:
            return named
        return (await asyncio.to_thread(brokers.find, self.kind)).url

    def _named_url(self) -> str | None:
        url = self.options.get("url")
        if url is None and ("host" in self.options or "port" in self.options):
            host = self.options.get("host", "127.0.0.1")
            url = f"{self.kind}://{host}:{self.options.get('port', DEFAULT_BROKER_PORT[self.kind])}"
        return url

    def _show(self, where: str, payload: bytes, reply_to: str = "") -> None:
        suffix = f"  (reply to {reply_to})" if reply_to else ""
        self._record(wire_line(f"{where}  ", payload, suffix))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None


class RedisTap(BrokerTap):
    """``PSUBSCRIBE *``: every channel, replies (``<channel>.reply``) included."""

    kind = "redis"
    _redis: Any = None
    _pubsub: Any = None

    async def start(self) -> RedisTap:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(await self._url())
        self._pubsub = self._redis.pubsub()
        await self._pubsub.psubscribe("*")
        # The confirmation says the subscription is live before anything is sent.
        await self._pubsub.get_message(timeout=SETTLE)
        self._task = asyncio.ensure_future(self._listen())
        return self

    async def _listen(self) -> None:
        async for message in self._pubsub.listen():
            if message["type"] == "pmessage":
                self._show(message["channel"].decode(), message["data"])

    async def close(self) -> None:
        await super().close()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()


class NatsTap(BrokerTap):
    """``SUB >``: every subject, the per-request reply inboxes included."""

    kind = "nats"
    _nc: Any = None

    def _named_url(self) -> str | None:
        servers = self.options.get("servers")
        return servers if isinstance(servers, str) or not servers else servers[0]

    async def start(self) -> NatsTap:
        import nats

        url = await self._url()
        errors: list[Exception] = []

        async def error_cb(exc: Exception) -> None:
            errors.append(exc)  # nats-py reports each attempt; the last one is raised below

        nc = nats.NATS()
        try:
            # Few attempts, close together: nats-py's defaults retry a broker
            # that is down for minutes, 2 s apart.
            await nc.connect(
                url,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=error_cb,
            )
        except Exception as exc:
            cause = errors[-1] if errors else exc
            raise ConnectionError(f"cannot connect to {brokers.redact(url)}: {cause}") from exc
        self._nc = nc

        async def on_message(msg: Any) -> None:
            self._show(msg.subject, msg.data, msg.reply)

        await self._nc.subscribe(">", cb=on_message)
        await self._nc.flush()  # the broker has the SUB before anything is sent
        return self

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


class MqttTap(BrokerTap):
    """``SUBSCRIBE #``: every topic, replies (``<topic>/reply``) included."""

    kind = "mqtt"

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> MqttTap:
        import aiomqtt

        parts = urlsplit(await self._url())
        tls = self.options.get("ssl")
        if tls is None and parts.scheme in ("mqtts", "ssl"):
            tls = ssl.create_default_context()
        client = await self._stack.enter_async_context(
            aiomqtt.Client(
                parts.hostname or "127.0.0.1",
                parts.port or DEFAULT_BROKER_PORT["mqtt"],
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                identifier=f"nestpy_tap_{secrets.token_hex(4)}",
                tls_context=tls,
            )
        )
        await client.subscribe("#")  # returns once the broker acknowledged it
        self._task = asyncio.ensure_future(self._listen(client))
        return self

    async def _listen(self, client: Any) -> None:
        async for message in client.messages:
            self._show(str(message.topic), bytes(message.payload))

    async def close(self) -> None:
        await super().close()
        await self._stack.aclose()


BROKER_TAPS: dict[Transport, type[BrokerTap]] = {
    Transport.REDIS: RedisTap,
    Transport.NATS: NatsTap,
    Transport.MQTT: MqttTap,
}


def parse_pattern(text: str) -> Any:
    """A pattern typed in a box: JSON if it parses (``{"cmd": "sum"}``), else a plain string.

    Text that starts like JSON but does not parse is an error rather than a
    string pattern, because that is almost always a typo.
    """
    text = text.strip()
    if not text:
        raise ValueError("the pattern is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if text[0] in '{["':
            raise ValueError(f"the pattern looks like JSON but does not parse ({exc})") from None
        return text


def describe_error(exc: BaseException) -> str:
    """One line for an error, as the caller sees it; RpcError shows Nest's ``err`` value."""
    if isinstance(exc, RpcError):
        return f"RpcError: {json.dumps(exc.error, ensure_ascii=False)}"
    return f"{type(exc).__name__}: {exc}"


def _pre(text: str, color: str = "") -> str:
    style = f' style="color:{color}"' if color else ""
    return f"<pre{style}>{html.escape(text)}</pre>"


class Playground:
    """Send or emit to a running service from a form, and see the reply and the wire.

    ``targets`` maps a label to ``(transport, options)``, the same pair
    ``ClientsModule.register`` takes, e.g. ``{"TCP": (Transport.TCP, {"port": 3001})}``.
    Buttons schedule the action in the running event loop; ``pending`` is
    the last scheduled task, so a cell or a test can ``await`` it.
    ``closed_note`` is the line shown under the buttons once ``close`` has
    greyed them out: a learner who scrolls back to a closed form must read
    there why it no longer works and how to get a live one.
    """

    def __init__(
        self,
        targets: Mapping[str, Target],
        *,
        pattern: str = '{"cmd": "sum"}',
        payload: str = "[1, 2, 3]",
        timeout: float = 5.0,
        closed_note: str = CLOSED_NOTE,
    ) -> None:
        if not targets:
            raise ValueError("a Playground needs at least one target")
        for label, (transport, options) in targets.items():
            kind = Transport(transport)
            if kind != Transport.TCP and kind not in BROKER_TAPS:
                raise NotImplementedError(
                    f"{label}: the playground can show TCP, Redis, NATS and MQTT traffic, "
                    f"not Transport.{kind.name}"
                )
            if kind == Transport.TCP and options.get("ssl") is not None:
                raise NotImplementedError(f"{label}: a TCP tap on TLS would see only ciphertext")
        import ipywidgets as widgets  # here, not at the top: see the module docstring

        self.targets = dict(targets)
        self.timeout = timeout
        self.closed_note = closed_note
        self.pending: asyncio.Task[None] | None = None
        self.reply_text = ""
        self.wire_text = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one action at a time, so each shows only its own traffic
        self._clients: dict[str, ClientProxy] = {}
        self._taps: dict[str, Tap] = {}

        self.target_picker = widgets.Dropdown(
            options=list(self.targets), description="Target", style=LABEL_STYLE
        )
        self.pattern_box = widgets.Text(value=pattern, description="Pattern", style=LABEL_STYLE)
        self.payload_box = widgets.Textarea(
            value=payload, description="Payload (JSON)", style=LABEL_STYLE
        )
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.emit_button = widgets.Button(description="Emit")
        self.status_area = widgets.HTML()  # empty while open; the closed note after close()
        self.reply_area = widgets.HTML()
        self.wire_area = widgets.HTML()
        self.send_button.on_click(lambda _: self._click(self._send))
        self.emit_button.on_click(lambda _: self._click(self._emit))
        self.widget: ipywidgets.VBox = widgets.VBox(
            [
                widgets.HBox([self.target_picker, self.pattern_box]),
                self.payload_box,
                widgets.HBox([self.send_button, self.emit_button]),
                self.status_area,
                widgets.HTML("<b>Reply</b>"),
                self.reply_area,
                widgets.HTML(
                    "<b>Wire</b>: TCP frames (→ to the service, ← back), "
                    "or each broker message as its channel and payload; "
                    "under bytes that hold non-ASCII text, that text"
                ),
                self.wire_area,
            ]
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """Display as the widget, with a short plain-text form for places without widgets."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = f"Playground(targets: {', '.join(self.targets)})"
        return bundle

    # --- actions -------------------------------------------------------------
    def _click(self, action: Callable[[Any, Any], Coroutine[Any, Any, None]]) -> None:
        """Read the form now, then run the action in the running loop.

        ipywidgets callbacks are synchronous, so the action becomes a task.  The
        form is read at click time: a box edited before the task runs must not
        change what this click sends.
        """
        form = self._read_form()
        if form is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._show("There is no running event loop: await send() or emit() instead.", [])
            return
        task = loop.create_task(action(*form))
        self.pending = task
        self._tasks.add(task)  # a reference, or the task may be collected mid-flight
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._show(describe_error(task.exception()), [], failed=True)  # type: ignore[arg-type]

    def _read_form(self) -> tuple[Any, Any] | None:
        """The pattern and payload in the boxes, or None after showing why they are invalid."""
        try:
            pattern = parse_pattern(self.pattern_box.value)
        except ValueError as exc:
            self._show(f"Invalid pattern: {exc}. Nothing was sent.", [], failed=True)
            return None
        try:
            data = json.loads(self.payload_box.value)
        except json.JSONDecodeError as exc:
            self._show(f"The payload is not valid JSON ({exc}). Nothing was sent.", [], failed=True)
            return None
        return pattern, data

    async def _endpoint(self, label: str) -> tuple[Tap, ClientProxy]:
        """The tap and client for a target, made on first use (they need a running loop)."""
        if label not in self._clients:
            transport, options = self.targets[label]
            tap: Tap
            if Transport(transport) == Transport.TCP:
                host = options.get("host", DEFAULT_HOST)
                tap = WireTap(host, int(options.get("port", DEFAULT_PORT)))
            else:
                tap = BROKER_TAPS[Transport(transport)](options)
            try:
                await tap.start()
            except BaseException:
                await tap.close()  # whatever half of it did start
                raise
            self._taps[label] = tap
            self._clients[label] = ClientProxyFactory.create(
                transport,
                {
                    **tap.client_options(options),
                    "id_prefix": ID_PREFIX,
                    "timeout": self.timeout,
                },
            )
        return self._taps[label], self._clients[label]

    async def _open(self, label: str) -> tuple[Tap, ClientProxy] | None:
        """``_endpoint``, or None after showing why a tap could not start (a broker is down)."""
        try:
            return await self._endpoint(label)
        except Exception as exc:
            self._show(describe_error(exc), [], failed=True)
            return None

    async def send(self) -> None:
        """Send the form as a request and show every reply value, or the error."""
        form = self._read_form()
        if form is not None:
            await self._send(*form)

    async def emit(self) -> None:
        """Emit the form as an event; there is no reply, only the frame that left."""
        form = self._read_form()
        if form is not None:
            await self._emit(*form)

    async def _send(self, pattern: Any, data: Any) -> None:
        async with self._lock:
            endpoint = await self._open(self.target_picker.value)
            if endpoint is None:
                return
            tap, client = endpoint
            mark = len(tap.records)
            try:
                values = [value async for value in client.send(pattern, data)]
            except Exception as exc:
                # The request went out; an RpcError also came back as one message.
                await tap.settle(mark + (2 if isinstance(exc, RpcError) else 1))
                self._show(describe_error(exc), tap.records[mark:], failed=True)
                return
            await tap.settle(mark + 1 + max(1, len(values)))
            lines = [json.dumps(value, ensure_ascii=False) for value in values]
            self._show("\n".join(lines) or "(completed without a value)", tap.records[mark:])

    async def _emit(self, pattern: Any, data: Any) -> None:
        async with self._lock:
            endpoint = await self._open(self.target_picker.value)
            if endpoint is None:
                return
            tap, client = endpoint
            mark = len(tap.records)
            try:
                await client.emit(pattern, data)
            except Exception as exc:
                self._show(describe_error(exc), tap.records[mark:], failed=True)
                return
            await tap.settle(mark + 1)
            self._show("(event emitted: an event gets no reply)", tap.records[mark:])

    def _show(self, reply: str, records: list[str], *, failed: bool = False) -> None:
        self.reply_text = reply
        self.wire_text = "\n".join(records) or "(nothing went over the wire)"
        self.reply_area.value = _pre(self.reply_text, "#b00020" if failed else "")
        self.wire_area.value = _pre(self.wire_text)

    async def close(self) -> None:
        """Let the last action finish, then close every client and tap it opened.

        The buttons turn grey and ``closed_note`` appears under them, so the
        form itself says why it no longer answers.
        """
        self.send_button.disabled = self.emit_button.disabled = True
        self.status_area.value = _pre(self.closed_note, "#555")
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        for client in self._clients.values():
            await client.close()
        for tap in self._taps.values():
            await tap.close()
        self._clients.clear()
        self._taps.clear()
