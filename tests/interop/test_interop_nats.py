"""NATS-only interop with real NestJS 12; the checks every transport shares
are in ``test_interop.py``.

There, the python->nest runs also prove that a Nest server answers our
client's one wildcard inbox (Nest's client makes one inbox per request).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.nest import NestServer, nest_missing

from nestpy_mini import ClientProxyFactory, Transport

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(nest_missing() is not None, reason=str(nest_missing())),
]


async def test_client_headers_reach_a_nest_server(broker_url: Callable[[str], str]) -> None:
    """Requests with headers go out as HPUB; Nest's server reads them and still replies."""
    nats_url = broker_url("nats")
    server = await NestServer("nats", url=nats_url).start()
    client = ClientProxyFactory.create(
        Transport.NATS, {"servers": nats_url, "timeout": 5, "headers": {"x-trace": "abc"}}
    )
    try:
        assert await client.send({"cmd": "sum"}, [4, 5]) == 9
        assert await client.send({"cmd": "ctx"}, 1) == '{"cmd":"ctx"}'
    finally:
        await client.close()
        await server.stop()
