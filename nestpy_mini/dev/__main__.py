"""The dev tools, from a terminal.

    python -m nestpy_mini.dev send --port 3001 '{"cmd": "sum"}' '[1, 2, 3]'   # also emit, serve
    python -m nestpy_mini.dev broker redis       # a broker from pip, on its default port
    python -m nestpy_mini.dev bench --help       # nestpy_mini against NestJS
    python -m nestpy_mini.dev fuzz --help        # hostile input against a TCP service
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..transports import DEFAULT_URL


def broker(argv: list[str]) -> int:
    from . import brokers

    parser = argparse.ArgumentParser(
        prog="python -m nestpy_mini.dev broker",
        description="Run a broker shipped by pip in the foreground, as its own server would run.",
    )
    parser.add_argument("kind", choices=sorted(brokers.PIP_BROKER))
    parser.add_argument("--port", type=int, default=None, help="default: the broker's own port")
    parser.add_argument("--tied", action="store_true", help="stop when stdin reaches its end")
    parser.add_argument(
        "--engine", choices=["mosquitto"], help="mqtt: the mosquitto on PATH, not amqtt"
    )
    args = parser.parse_args(argv)
    if args.engine and args.kind != "mqtt":
        parser.error("--engine mosquitto is an MQTT broker")
    port = args.port or int(DEFAULT_URL[args.kind].rsplit(":", 1)[1])
    try:
        asyncio.run(brokers.run(args.kind, port, args.tied, args.engine))
    except brokers.BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command == "broker":
        return broker(rest)
    if command in ("serve", "send", "emit"):
        from .cli import main as cli

        return cli(argv)
    if command == "bench":
        from .bench import main as bench

        return bench(rest)
    if command == "fuzz":
        from .fuzz import main as fuzz

        return fuzz(rest)
    print(__doc__.strip(), file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
