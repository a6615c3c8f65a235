"""Command line: serve a module, or send a request / emit an event to a service.

    python -m nestpy_mini serve notebooks.math_service:AppModule --port 3001
    python -m nestpy_mini send --port 3001 '{"cmd": "sum"}' '[1, 2, 3]'
    python -m nestpy_mini emit --transport redis user_created '{"userId": "42"}'

Patterns and data are JSON; a pattern that is not valid JSON is a plain string.
TCP takes ``--host``/``--port``; a broker transport takes ``--url`` and, without
it, the env URL (``REDIS_URL``...) or Nest's default address, as in code.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from typing import Any

from . import ClientProxyFactory, NestFactory, RpcError, Transport
from .transports.tcp import DEFAULT_HOST, DEFAULT_PORT

# The option each broker transport names its broker with, as Nest names it.
_URL_OPTION = {
    Transport.REDIS: lambda url: {"url": url},
    Transport.NATS: lambda url: {"servers": url.split(",")},
    Transport.MQTT: lambda url: {"url": url},
    Transport.RMQ: lambda url: {"urls": url.split(",")},
    Transport.KAFKA: lambda url: {"client": {"brokers": url.split(",")}},
}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _options(args: argparse.Namespace) -> dict[str, Any]:
    transport = Transport[args.transport.upper()]
    options: dict[str, Any] = {}
    if transport is Transport.TCP:
        if args.url:
            raise SystemExit("error: TCP takes --host and --port, not --url")
        options = {"host": args.host or DEFAULT_HOST, "port": args.port or DEFAULT_PORT}
    elif args.host or args.port:
        raise SystemExit(f"error: {transport.name} takes --url (its broker), not --host/--port")
    elif args.url:
        options = _URL_OPTION[transport](args.url)
    if getattr(args, "timeout", None) is not None:
        options["timeout"] = args.timeout
    return options


async def _serve(args: argparse.Namespace) -> None:
    module_path, _, attr = args.module.partition(":")
    module = getattr(importlib.import_module(module_path), attr or "AppModule")
    app = await NestFactory.create_microservice(
        module, transport=Transport[args.transport.upper()], options=_options(args)
    )
    app.enable_shutdown_hooks()
    await app.start()
    print(f"serving {args.module} on {app.server.describe()}", flush=True)
    await app.listen()


async def _send(args: argparse.Namespace) -> int:
    client = ClientProxyFactory.create(Transport[args.transport.upper()], _options(args))
    try:
        async for value in client.send(_json(args.pattern), _json(args.data)):
            print(json.dumps(value, ensure_ascii=False))
    except RpcError as exc:
        print(f"error: {json.dumps(exc.error, ensure_ascii=False)}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    return 0


async def _emit(args: argparse.Namespace) -> int:
    client = ClientProxyFactory.create(Transport[args.transport.upper()], _options(args))
    try:
        await client.emit(_json(args.pattern), _json(args.data))
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nestpy_mini", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "send", "emit"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--transport", default="tcp", choices=[t.name.lower() for t in Transport])
        cmd.add_argument("--host", help=f"TCP only (default {DEFAULT_HOST})")
        cmd.add_argument("--port", type=int, help=f"TCP only (default {DEFAULT_PORT})")
        cmd.add_argument("--url", help="a broker transport's broker (default: env URL, Nest's)")
        if name == "serve":
            cmd.add_argument(
                "module", help="import path of the root module, e.g. pkg.app:AppModule"
            )
        else:
            cmd.add_argument("pattern", help='JSON pattern, e.g. \'{"cmd": "sum"}\'')
            cmd.add_argument("data", help="JSON data, e.g. '[1, 2, 3]'")
        if name == "send":
            cmd.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            asyncio.run(_serve(args))
            return 0
        return asyncio.run(_send(args) if args.command == "send" else _emit(args))
    except (ConnectionError, TimeoutError, NotImplementedError, ModuleNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
