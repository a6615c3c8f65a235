"""Broker discovery: env URL first and loud, then a protocol probe, then an embedded broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nestpy_mini.dev import brokers


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Discovery from scratch, with no env URLs; the cache is restored afterwards."""
    saved = dict(brokers._found)
    brokers._found.clear()
    for name in brokers.ENV.values():
        monkeypatch.delenv(name, raising=False)
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
    assert brokers._probe(kind, "127.0.0.1", stranger) == (
        f"something at 127.0.0.1:{stranger} does not speak {kind}"
    )


@pytest.mark.parametrize("kind", ["redis", "nats", "mqtt"])
def test_embedded_brokers_start_answer_and_stop(kind: str) -> None:
    broker = brokers.start(kind)
    host, port = brokers._host_port(kind, broker.url)
    try:
        assert broker.embedded and host == "127.0.0.1"
        assert brokers._probe(kind, host, port) is None
    finally:
        broker.stop()
    assert brokers._probe(kind, host, port) is not None  # really gone


def test_rabbitmq_has_no_embedded_broker_and_says_so() -> None:
    with pytest.raises(
        brokers.BrokerUnavailable, match="rmq: no broker ships with pip; set AMQP_URL"
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
