"""Broker discovery: env URL first and loud, then a protocol probe, then an embedded broker."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from conftest import wait_until

from nestpy_mini import ClientProxyFactory, Transport
from nestpy_mini.dev import brokers


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Discovery from scratch, with no env URLs; the cache is restored afterwards."""
    saved = dict(brokers._found)
    brokers._found.clear()
    for name in brokers.ENV.values():
        # set, then deleted: monkeypatch then restores the variable as it was before,
        # also when find() sets it during the test.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield
    for broker in brokers._found.values():
        broker.stop()
    brokers._found.clear()
    brokers._found.update(saved)


def test_env_url_that_does_not_answer_fails_loudly(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = brokers.free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://app:hunter2@127.0.0.1:{port}/0")
    with pytest.raises(brokers.BrokerUnavailable) as info:
        brokers.find("redis")
    message = str(info.value)
    assert message.startswith(f"REDIS_URL=redis://app:***@127.0.0.1:{port}/0 is set, but nothing")
    assert "hunter2" not in message  # credentials never reach a message


@pytest.mark.parametrize("kind", ["redis", "nats", "mqtt", "rmq"])
def test_probe_rejects_a_port_that_speaks_another_protocol(kind: str, stranger: int) -> None:
    assert brokers.probe(kind, "127.0.0.1", stranger) == (
        f"something at 127.0.0.1:{stranger} does not speak {kind}"
    )


@pytest.mark.parametrize("kind", ["redis", "nats", "mqtt"])
def test_embedded_brokers_start_answer_and_stop(kind: str) -> None:
    broker = brokers.start(kind)
    [(host, port)] = brokers._addresses(kind, broker.url)
    try:
        assert broker.embedded and host == "127.0.0.1"
        assert brokers.probe(kind, host, port) is None
    finally:
        broker.stop()
    assert brokers.probe(kind, host, port) is not None  # really gone


def test_rabbitmq_has_no_embedded_broker_and_says_so() -> None:
    with pytest.raises(
        brokers.BrokerUnavailable, match="rmq: no broker ships with pip; set AMQP_URL or run one"
    ):
        brokers.start("rmq")


def test_env_url_wins_and_is_reported(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = brokers.start("nats")
    try:
        monkeypatch.setenv("NATS_URL", broker.url)
        found = brokers.find("nats")
        assert (found.url, found.source) == (broker.url, "env NATS_URL")
        assert brokers.find("nats") is found  # cached per process
    finally:
        broker.stop()


def test_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown broker kind 'zeromq'"):
        brokers.find("zeromq")


async def test_a_started_broker_is_exported_so_default_options_meet_it(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where nothing serves the default port, find() starts one and sets the env URL, which
    every transport with default options in this process and its children then uses."""
    nobody = f"redis://127.0.0.1:{brokers.free_port()}"
    monkeypatch.setitem(brokers.DEFAULT_URL, "redis", nobody)  # as on a laptop: no service
    broker = brokers.find("redis")
    assert broker.embedded and broker.url != nobody
    assert os.environ["REDIS_URL"] == broker.url
    client = ClientProxyFactory.create(Transport.REDIS, {"timeout": 2})
    try:
        await client.connect()
        assert client.describe() == broker.url
    finally:
        await client.close()


async def test_a_nats_cluster_carries_messages_across_nodes_and_survives_a_node() -> None:
    """Three nodes, each routed to both others: a subscriber on B hears a publisher on C,
    and after A is killed, B and C still route to each other and still carry messages."""
    import nats

    cluster = await asyncio.to_thread(brokers.nats_cluster)
    try:
        assert [node.name for node in cluster] == ["A", "B", "C"]
        assert [node.peers() for node in cluster] == [2, 2, 2]
        on_b, on_c = await nats.connect(cluster[1].url), await nats.connect(cluster[2].url)
        try:
            sub = await on_b.subscribe("cluster.hello")
            await on_b.flush()

            async def heard_from_c(text: bytes) -> bool:
                """Publish on C until B hears it (B's interest crosses the route first)."""
                for _ in range(40):
                    await on_c.publish("cluster.hello", text)
                    try:
                        while (await sub.next_msg(timeout=0.05)).data != text:
                            pass  # an earlier text, sent again before it was heard
                        return True
                    except nats.errors.TimeoutError:
                        continue
                return False

            assert await heard_from_c(b"before")
            cluster[0].kill()
            assert [node.running for node in cluster] == [False, True, True]
            await wait_until(lambda: [node.peers() for node in cluster[1:]] == [1, 1], within=5)
            assert await heard_from_c(b"after A died")
        finally:
            await on_b.close()
            await on_c.close()
    finally:
        cluster.stop()
    assert not any(node.running for node in cluster)
