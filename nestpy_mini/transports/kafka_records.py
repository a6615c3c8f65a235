"""Kafka records as Nest writes and reads them: its serializer and ``KafkaParser``.

A value, key or header is JSON, or ``String(value)`` for a string or a number, so
``6`` travels as ``"6"``; a reader turns only objects and arrays back into JSON.
"""

from __future__ import annotations

import re
from typing import Any

from ..packets import dumps, js_number, loads
from ..patterns import normalize_pattern

TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
TOPIC_RULE = "only ASCII letters, digits, '.', '_' and '-'; use a string pattern such as 'math.sum'"

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int | None, int | None]


def encode(value: Any) -> bytes | None:
    """A value, key or header as Nest and kafkajs write it: JSON or ``String(value)``."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | float):
        return js_number(value).encode()
    return dumps(value).encode()


def decode(raw: bytes | None) -> Any:
    """A value, key or header as Nest's ``KafkaParser`` reads it."""
    if raw is None or raw[:1] == b"\x00":  # a zero byte: schema-registry framing, binary
        return raw
    text = raw.decode("utf-8", "replace")  # as Node's Buffer#toString replaces
    if text[:1] in ("{", "["):
        try:
            return loads(text)
        except (ValueError, RecursionError):
            pass  # Nest keeps the text when it is not JSON after all
    return text


def serialize(data: Any) -> Record:
    """``(key, value, headers, partition, timestamp_ms)``; a dict with a key or value is one."""
    if not (isinstance(data, dict) and ("key" in data or "value" in data)):
        return None, encode(data), [], None, None
    headers = [
        (str(name), encode(value) or b"")
        for name, values in (data.get("headers") or {}).items()
        for value in (values if isinstance(values, list | tuple) else [values])
    ]
    partition, timestamp = (data.get(k) for k in ("partition", "timestamp"))
    partition, timestamp = (None if n is None else int(n) for n in (partition, timestamp))
    return encode(data.get("key")), encode(data.get("value")), headers, partition, timestamp


def valid_topic(pattern: Any) -> str:
    """The topic of ``pattern``; a clear error now where aiokafka would retry till it times out."""
    topic = normalize_pattern(pattern)
    if not TOPIC.fullmatch(topic) or len(topic) > 249 - len(".reply"):
        why = f"a topic name has at most 243 characters (249 with '.reply'), {TOPIC_RULE}"
        raise ValueError(f"pattern {pattern!r} is the topic {topic!r}, which Kafka refuses: {why}")
    return topic



class KafkaMessage:
    """A record as Nest's parser leaves it: ``value``, ``key`` and ``headers`` decoded;
    ``offset`` and ``timestamp`` are ints (kafkajs gives strings); ``raw`` is aiokafka's."""

    def __init__(self, record: Any, value: Any) -> None:
        self.raw, self.value, self.key = record, value, decode(record.key)
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.timestamp: int = record.timestamp
        self.headers = {name: decode(raw) for name, raw in record.headers or ()}
