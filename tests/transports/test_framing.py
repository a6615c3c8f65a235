"""Nest's JSON-socket framing: length in UTF-16 units, split and joined frames, bad input."""

from __future__ import annotations

import json

import pytest

from nestpy_mini.transports.json_socket import FrameDecoder, FrameError, encode_frame


def js_length(text: str) -> int:
    """What JavaScript's ``string.length`` says: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


@pytest.mark.parametrize(
    "message",
    [
        {"pattern": {"cmd": "sum"}, "data": [1, 2, 3], "id": "a1"},
        {"response": "张三", "isDisposed": True, "id": "x"},
        {"data": "emoji 😀 counts two", "pattern": "e"},
        {"data": "\u00e9\u0301 mixed \U0001f600\U0001f680 ascii", "pattern": "p"},
    ],
)
def test_prefix_counts_utf16_units_like_javascript(message: dict) -> None:
    frame = encode_frame(message)
    prefix, _, body = frame.partition(b"#")
    text = body.decode()
    assert int(prefix) == js_length(text)
    assert json.loads(text) == message
    # Nest writes non-ASCII as-is, not as \u escapes, and without spaces.
    assert text == json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def test_emoji_frame_length_is_two_units_per_emoji() -> None:
    assert encode_frame("😀") == '4#"😀"'.encode()
    assert encode_frame("中") == '3#"中"'.encode()


def test_decoder_handles_every_split_point() -> None:
    messages = [{"id": "1", "data": "中文 😀"}, {"id": "2", "data": [1, 2]}, "plain"]
    stream = b"".join(encode_frame(m) for m in messages)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == messages, cut
        assert not decoder.has_partial


def test_decoder_byte_by_byte() -> None:
    messages = [{"data": "😀" * 5, "id": str(i)} for i in range(3)]
    decoder = FrameDecoder()
    got = []
    for byte in b"".join(encode_frame(m) for m in messages):
        got += decoder.feed(bytes([byte]))
    assert got == messages


def test_partial_frame_is_reported() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b'8#{"a"') == []
    assert decoder.has_partial
    assert decoder.feed(b":12}") == [{"a": 12}]
    assert not decoder.has_partial


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"abc#{}", "corrupted length prefix"),
        (b"-5#{}", "corrupted length prefix"),
        (b"1234567890123456789", "no length prefix"),
        (b"99999999999#", "exceeds the limit"),
        (b"3#abc", "invalid JSON"),
        (b"2#{]", "invalid JSON"),
    ],
)
def test_broken_frames_raise_a_precise_error(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        FrameDecoder(max_size=1000).feed(data)


def test_length_ending_inside_a_surrogate_pair_is_rejected() -> None:
    # '"😀"' is 4 units; a prefix of 2 would cut the emoji in half.
    with pytest.raises(FrameError, match="inside a character"):
        FrameDecoder().feed('2#"😀"'.encode())


def test_invalid_utf8_counts_one_unit_per_byte_like_node() -> None:
    body = b'"\xff\xfe"'  # two invalid bytes: Node reads two replacement characters
    assert FrameDecoder().feed(b"4#" + body) == ["\ufffd\ufffd"]


def test_unserializable_values_raise() -> None:
    with pytest.raises(TypeError):
        encode_frame({"data": {1, 2}})
    with pytest.raises(ValueError):
        encode_frame({"data": float("nan")})
