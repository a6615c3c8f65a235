"""Properties of the frame parser, checked with hypothesis over generated streams.

The decoder is compared with ``reference_decode``: a slow, obvious reading of
the same rules over a whole stream at once.  The decoder sees the stream in
arbitrary pieces and keeps state between them, which is where bugs hide.
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from nestpy_mini.packets import loads
from nestpy_mini.transports.json_socket import (
    DEFAULT_MAX_BUFFER_SIZE,
    FrameDecoder,
    FrameError,
    encode_frame,
)

# A value from the wire never holds a high surrogate followed by a low one as
# two characters: JSON joins such a pair into one.  Lone ones are fine.
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
ANY_TEXT = st.text(st.characters(blacklist_categories=())).filter(lambda s: not _PAIR.search(s))
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | ANY_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
PACKETS = st.dictionaries(ANY_TEXT, JSON, max_size=4)  # what Nest sends: objects


def js_length(text: str) -> int:
    """JavaScript's ``string.length``, counted by hand: two units above U+FFFF."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> tuple[list[Any], bool]:
    """Packets until the stream ends or breaks, and whether it broke."""
    got: list[Any] = []
    for chunk in chunks:
        try:
            got += decoder.feed(chunk)
        except FrameError as exc:
            return got + exc.packets, True
    return got, False


def assert_damage_spares_what_came_before(
    got: list[Any], broke: bool, damaged: bytes, sent: list[dict[str, Any]], intact: int
) -> None:
    """The ``intact`` frames before the damage come out as sent, in order; what follows
    is what a plain reading of the damaged bytes gives.

    The framing has no checksum, so damage inside a body can leave valid JSON that
    nobody sent (a ``}`` put in, and the last ``}`` pushed out of the frame's length):
    Node reads the same bytes the same way.  What a reader must never do is lose or
    change a packet that arrived whole before the damage.
    """
    assert got[:intact] == sent[:intact], "a packet before the damage was lost or changed"
    expected, outcome = reference_decode(damaged, DEFAULT_MAX_BUFFER_SIZE)
    assert got == expected and broke == (outcome == "error")


def frames_before(frames: list[bytes] | list[str], at: int) -> int:
    """How many of ``frames``, laid end to end, end at or before offset ``at``."""
    end = count = 0
    for frame in frames:
        end += len(frame)
        if end > at:
            break
        count += 1
    return count


def reference_decode(stream: bytes, max_size: int) -> tuple[list[Any], str]:
    """The framing rules, read plainly: ``(packets, "complete"|"waiting"|"error")``.

    A frame is ASCII digits (at most 12), ``#``, then a body of that many
    UTF-16 units.  A byte that is not UTF-8 counts one unit; a character cut
    off by the end of the data is not there yet; a length that ends inside a
    two-unit character is an error.  The body is then JSON, with bad bytes
    read as U+FFFD.
    """
    packets: list[Any] = []
    pos = 0
    while pos < len(stream):
        hash_at = stream.find(b"#", pos, pos + 13)
        if hash_at < 0:
            return packets, "error" if len(stream) - pos > 12 else "waiting"
        prefix = stream[pos:hash_at]
        if not prefix.isdigit() or int(prefix) > max_size:
            return packets, "error"
        length, start = int(prefix), hash_at + 1
        text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(stream[start:])
        units = taken = 0
        for ch in text:
            if units == length:
                break
            units += 2 if ord(ch) > 0xFFFF else 1
            taken += 1
        if units < length:
            return packets, "waiting"
        if units > length:
            return packets, "error"
        end = start + len(text[:taken].encode("utf-8", "surrogateescape"))
        try:
            packets.append(loads(stream[start:end].decode("utf-8", "replace")))
        except (ValueError, RecursionError):
            return packets, "error"
        pos = end
    return packets, "complete"


# --- valid streams ----------------------------------------------------------------


@given(st.lists(JSON, max_size=8), st.lists(st.integers(0, 10**6), max_size=12))
def test_any_messages_split_anywhere_decode_to_the_same_list(
    messages: list[Any], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    decoder = FrameDecoder()
    got, broke = feed_all(decoder, pieces(stream, cuts))
    assert not broke
    assert got == messages
    assert not decoder.has_partial


@given(JSON)
def test_the_prefix_is_javascripts_string_length_of_well_formed_utf8(message: Any) -> None:
    prefix, _, body = encode_frame(message).partition(b"#")
    text = body.decode("utf-8")  # strict: a lone surrogate must have left as an escape
    assert int(prefix) == js_length(text) == len(text.encode("utf-16-le")) // 2
    assert loads(text) == message


# For node: no floats (JavaScript prints 1.0 as 1), integers it holds exactly,
# and no index-like keys (JavaScript puts those first).
NODE_KEYS = ANY_TEXT.filter(lambda k: not re.fullmatch(r"0|[1-9][0-9]{0,8}", k))
NODE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NODE_KEYS, inner, max_size=4),
    max_leaves=12,
)
# One line in, one line out: the values of an example, each written by JSON.stringify.
NODE_STRINGIFY = """
require('readline').createInterface({ input: process.stdin }).on('line', (line) => {
  const out = JSON.parse(line).map((value) => {
    const s = JSON.stringify(value);
    return [s.length, s];
  });
  process.stdout.write(JSON.stringify(out) + '\\n');
});
"""


@pytest.fixture(scope="module")
def node_stringify() -> Iterator[Callable[[list[Any]], list[Any]]]:
    """One node process for every example: starting one per example took most of the time."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    node = subprocess.Popen(
        ["node", "-e", NODE_STRINGIFY], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert node.stdin is not None and node.stdout is not None

    def stringify(values: list[Any]) -> list[Any]:
        assert node.stdin is not None and node.stdout is not None
        node.stdin.write(json.dumps(values).encode() + b"\n")  # ASCII: read unambiguously
        node.stdin.flush()
        line = node.stdout.readline()
        assert line, f"node exited with {node.wait()}"
        return json.loads(line)

    try:
        yield stringify
    finally:
        node.stdin.close()
        node.wait(10)
        node.stdout.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(NODE_JSON, min_size=1, max_size=40))
def test_frames_match_what_node_writes_byte_for_byte(
    node_stringify: Callable[[list[Any]], list[Any]], values: list[Any]
) -> None:
    """JSON.stringify's text and its ``.length`` are exactly our body and prefix."""
    for value, (length, text) in zip(values, node_stringify(values), strict=True):
        # JSON.stringify writes a lone surrogate as a \u escape, so text is well formed.
        assert encode_frame(value) == b"%d#%s" % (length, text.encode())


# --- any bytes at all -------------------------------------------------------------

MAX = 64  # small, so that streams often cross the limit
SEGMENTS = st.one_of(
    st.builds(encode_frame, JSON),
    st.binary(max_size=40),
    st.builds(lambda n, body: b"%d#" % n + body, st.integers(0, 2 * MAX), st.binary(max_size=40)),
    st.builds(
        lambda n, text: b"%d#" % n + text.encode("utf-8", "surrogatepass"),
        st.integers(0, 2 * MAX),
        ANY_TEXT,
    ),
    st.sampled_from([b"#", b"-1#", b"0#", b"\xf0\x9f\x98\x80", b"\xe4\xb8", b"\xff", b"{}", b'"']),
)
STREAMS = st.lists(SEGMENTS, max_size=8).map(b"".join)


@given(STREAMS, st.lists(st.integers(0, 10**6), max_size=12))
@settings(max_examples=200)
def test_the_decoder_reads_any_bytes_as_the_reference_does(stream: bytes, cuts: list[int]) -> None:
    """Never anything but FrameError; the same packets and the same end as the
    reference; after an error, nothing more; and never more held than a frame."""
    expected, outcome = reference_decode(stream, MAX)
    decoder = FrameDecoder(MAX)
    got: list[Any] = []
    broke = False
    for chunk in pieces(stream, cuts):
        try:
            got += decoder.feed(chunk)
        except FrameError as exc:
            got += exc.packets  # the whole frames before the break, in the same read
            broke = True
            break
        held = len(decoder._buf)
        assert held <= (3 * MAX + 1 if not stream.isascii() else MAX) or held <= 12
    if broke:
        assert outcome == "error"
        assert got == expected
        with pytest.raises(FrameError):
            decoder.feed(encode_frame({"after": "the break"}))
        assert not decoder.has_partial and not decoder._buf
    else:
        assert outcome != "error"
        assert got == expected
        assert decoder.has_partial == (outcome == "waiting")


@given(st.binary(max_size=3000), st.lists(st.integers(0, 10**6), max_size=30))
def test_random_bytes_raise_frame_error_or_wait_and_never_hold_much(
    stream: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(MAX)
    for chunk in pieces(stream, cuts):
        try:
            decoder.feed(chunk)
        except FrameError:
            return
        assert len(decoder._buf) <= 3 * MAX + 1


# --- damaged streams keep what came before the damage ----------------------------

ASCII_PACKETS = st.dictionaries(
    st.text(st.characters(max_codepoint=127), max_size=6),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(st.characters(max_codepoint=127)),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(st.characters(max_codepoint=127)), inner, max_size=3)
        ),
        max_leaves=6,
    ),
    max_size=4,
)


@given(
    st.lists(ASCII_PACKETS, min_size=1, max_size=5),
    st.integers(0, 10**6),
    st.integers(0, 255),
    st.booleans(),
    st.lists(st.integers(0, 10**6), max_size=8),
)
@settings(max_examples=250)
def test_one_byte_inserted_or_lost_spares_the_packets_before_it(
    messages: list[dict[str, Any]], where: int, byte: int, insert: bool, cuts: list[int]
) -> None:
    """One byte put in or taken out anywhere, the stream read in arbitrary pieces."""
    frames = [encode_frame(m) for m in messages]
    stream = bytearray(b"".join(frames))
    at = where % (len(stream) + (1 if insert else 0))
    if insert:
        stream.insert(at, byte)
    else:
        del stream[at]
    got, broke = feed_all(FrameDecoder(), pieces(bytes(stream), cuts))
    assert_damage_spares_what_came_before(
        got, broke, bytes(stream), messages, frames_before(frames, at)
    )


@given(
    st.lists(PACKETS, min_size=1, max_size=5),
    st.integers(0, 10**6),
    st.sampled_from(["x", "}", "#", "1", "é", "中", "😀"]),
    st.booleans(),
    st.lists(st.integers(0, 10**6), max_size=8),
)
# A "}" put in after 1, and the last "}" pushed out: {"a": {"b": 1}, "c": 2}, valid and unsent.
@example([{"a": {"b": 1, "c": 2}}], len('19#{"a":{"b":1'), "}", True, [])
@settings(max_examples=250)
def test_a_character_inserted_or_lost_spares_the_packets_before_it(
    messages: list[dict[str, Any]], where: int, char: str, insert: bool, cuts: list[int]
) -> None:
    """The same for any text, damaged a whole character at a time."""
    frames = [encode_frame(m).decode("utf-8") for m in messages]
    text = "".join(frames)
    assume(text)
    at = where % (len(text) + (1 if insert else 0))
    damaged = (text[:at] + char + text[at:] if insert else text[:at] + text[at + 1 :]).encode()
    got, broke = feed_all(FrameDecoder(), pieces(damaged, cuts))
    assert_damage_spares_what_came_before(got, broke, damaged, messages, frames_before(frames, at))
