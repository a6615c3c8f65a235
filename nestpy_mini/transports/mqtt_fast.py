"""MQTT's fast path: what paho does once per message, done once per loop pass.

Three seams under aiomqtt, each a workaround on a library's internals, kept here so that
``mqtt.py`` reads as plain aiomqtt and a reader can skip this file:

* ``handoff``: the ``queue_type`` aiomqtt takes hands each message over as paho decodes
  it; aiomqtt's ``messages`` costs a task per message.
* ``ReadAhead``: paho reads a packet in three ``recv`` calls, one packet per readable event.
* ``encode_publish`` and ``write``: a QoS 0 PUBLISH is encoded here (byte for byte paho's,
  tested), and a pass's worth goes to paho as one entry of its out-queue (``_out_packet``),
  written by paho's public ``loop_write``.  paho's ``publish`` costs, per message, an
  ``MQTTMessageInfo``, a byte to its socketpair, a ``send`` and aiomqtt's ``on_publish``.

A nestpy_mini pair on a private Mosquitto, 100 in flight: 4,240-4,540 req/s on aiomqtt's
API alone; 6,600-7,700 with the handoff and paho's ``publish``; 13,500-15,400 with all
three (2 interleaved runs each, 2026-12-06).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt


def handoff(deliver: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    class Handoff(asyncio.Queue[aiomqtt.Message]):  # aiomqtt calls only put_nowait
        def put_nowait(self, item: aiomqtt.Message) -> None:
            deliver(item)

    return Handoff


class ReadAhead:
    """paho's socket, read 64 KiB at a time; ``pending()``, the hook aiomqtt has for TLS,
    makes paho read on while bytes wait here."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.buffer, self.at = sock, b"", 0

    def __getattr__(self, name: str) -> Any:  # send, fileno, close ... as the socket's
        return getattr(self.sock, name)

    def recv(self, size: int) -> bytes:
        if self.at == len(self.buffer):
            self.buffer, self.at = self.sock.recv(max(size, 65536)), 0
        chunk = self.buffer[self.at:self.at + size]
        self.at += len(chunk)
        return chunk

    def pending(self) -> int:
        more = self.sock.pending() if hasattr(self.sock, "pending") else 0
        return len(self.buffer) - self.at + more


def encode_publish(topic: bytes, body: bytes, retain: bool, v5: bool) -> bytes:
    """A QoS 0 PUBLISH (MQTT 3.1.1 and 5.0, section 3.3): no packet id; in MQTT 5 no properties."""
    rest, length = len(topic) + 2 + v5 + len(body), bytearray()
    while True:  # the remaining length, 7 bits a byte, low first
        rest, byte = rest >> 7, rest & 0x7F
        length.append(byte | 0x80 if rest else byte)
        if not rest:
            return b"".join((bytes((0x30 | retain,)), length, len(topic).to_bytes(2, "big"),
                             topic, b"\0" if v5 else b"", body))


def write(client: aiomqtt.Client, packets: list[bytes]) -> None:
    """Queue encoded packets behind what paho has queued; paho writes what the socket
    does not take now when it can."""
    data, paho_client = b"".join(packets), client._client
    paho_client._out_packet.append({"command": 0, "mid": 0, "qos": 0, "pos": 0,
                                    "to_process": len(data), "packet": data, "info": None})
    paho_client.loop_write()
