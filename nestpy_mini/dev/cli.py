"""A service's command line: serve a module, or send a request / emit an event to one.

python -m nestpy_mini.dev serve notebooks.math_service:AppModule --port 3001
python -m nestpy_mini.dev send --port 3001 '{"cmd": "sum"}' '[1, 2, 3]'
python -m nestpy_mini.dev emit --transport redis user_created '{"userId": "42"}'

Each runs on ``nestpy_mini.run``: on uvloop where it imports, unless NESTPY_LOOP=asyncio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from .. import ClientProxyFactory, NestFactory, RpcError, Transport, run
from ..transports.tcp import DEFAULT_HOST, DEFAULT_PORT

# The option that names a broker transport's brokers, as Nest names it (Kafka's is in "client").
_URL_OPTION = {"redis": "url", "nats": "servers", "mqtt": "url", "rmq": "urls", "kafka": "brokers"}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _options(args: argparse.Namespace) -> dict[str, Any]:
    name = args.transport.upper()
    options: dict[str, Any] = {}
    if name == "TCP":
        if args.url:
            raise SystemExit("error: TCP takes --host and --port, not --url")
        options = {"host": args.host or DEFAULT_HOST, "port": args.port or DEFAULT_PORT}
    elif args.host or args.port:
        raise SystemExit(f"error: {name} takes --url (its broker), not --host/--port")
    elif args.url:
        key = _URL_OPTION.get(args.transport, "url")  # redis and mqtt take one URL, not a list
        options = {key: args.url if key == "url" else args.url.split(",")}
        if name == "KAFKA":
            options = {"client": options}
    if getattr(args, "timeout", None) is not None:
        options["timeout"] = args.timeout
    return options


async def _run(args: argparse.Namespace) -> None:
    transport, options = Transport[args.transport.upper()], _options(args)
    if args.command == "serve":
        path, _, attr = args.module.partition(":")
        module = getattr(importlib.import_module(path), attr or "AppModule")
        app = await NestFactory.create_microservice(module, transport=transport, options=options)
        app.enable_shutdown_hooks()
        await app.start()
        print(f"serving {args.module} on {app.server.describe()}", flush=True)
        await app.listen()
        return
    client = ClientProxyFactory.create(transport, options)
    try:
        if args.command == "emit":
            await client.emit(args.pattern, args.data)
        else:
            async for value in client.send(args.pattern, args.data):
                print(json.dumps(value, ensure_ascii=False))
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser("python -m nestpy_mini.dev", description=description)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--transport", default="tcp", choices=[t.name.lower() for t in Transport])
    common.add_argument("--host", help=f"TCP only (default {DEFAULT_HOST})")
    common.add_argument("--port", type=int, help=f"TCP only (default {DEFAULT_PORT})")
    common.add_argument("--url", help="a broker transport's broker (default: its env URL, Nest's)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common]).add_argument("module", help="e.g. pkg.app:AppModule")
    for name in ("send", "emit"):
        cmd = sub.add_parser(name, parents=[common])
        cmd.add_argument("pattern", type=_json, help='JSON or a string, e.g. \'{"cmd": "sum"}\'')
        cmd.add_argument("data", type=_json, help="JSON or a string, e.g. '[1, 2, 3]'")
        cmd.add_argument("--timeout", type=float, help="seconds to wait for the service")
    args = parser.parse_args(argv)
    try:
        run(_run(args))  # uvloop where it imports; NESTPY_LOOP=asyncio turns it off
        return 0
    except RpcError as exc:
        print(f"error: {json.dumps(exc.error, ensure_ascii=False)}", file=sys.stderr)
    # ValueError and ModuleNotFoundError include a bad NESTPY_LOOP and a missing uvloop.
    except (
        ConnectionError,
        TimeoutError,
        NotImplementedError,
        ModuleNotFoundError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
