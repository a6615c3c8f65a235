"""One instance of the chapter's sum service, as a process of its own (notebook 08).

Notebook 08 starts three of these with ``course.start_processes``; one can also run by hand:

    python notebooks/adder.py --name "instance 1" --transport NATS \
        --options '{"servers": ["nats://127.0.0.1:4222"], "queue": "adders"}'

It prints ``ready`` once it serves, then ``ran <n>`` each time its handler starts on
request ``n`` (the first number of the data), so that whoever started it can count which
instance ran what, even for an instance that is then killed.  SIGTERM and SIGINT close it
gracefully; so does the end of its standard input, so that it never outlives a notebook
kernel that started it and then died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from nestpy_mini import Controller, MessagePattern, Module, NestFactory, Transport, run


def sum_module(name: str, pattern: Any, work: float, ack: bool) -> type:
    """A module with one handler for ``pattern``: the chapter's sum, signed with ``name``.

    ``work`` seconds of pretend work let a kill find requests in the middle of a run;
    ``ack`` acknowledges a RabbitMQ message once the work is done (``no_ack: False``).
    """

    @Controller()
    class SumController:
        @MessagePattern(pattern)
        async def sum(self, data: list[int], ctx: Any) -> dict[str, Any]:
            print(f"ran {data[0]}", flush=True)
            if work:
                await asyncio.sleep(work)
            if ack:
                await ctx.get_message().ack()
            return {"sum": sum(data), "by": name}

    @Module(controllers=[SumController])
    class SumModule:
        pass

    return SumModule


async def main(args: argparse.Namespace) -> None:
    module = sum_module(args.name, json.loads(args.pattern), args.work, args.ack)
    app = await NestFactory.create_microservice(
        module, transport=Transport[args.transport], options=json.loads(args.options)
    )
    app.enable_shutdown_hooks()
    await app.start()
    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []

    def stdin_readable() -> None:
        if not sys.stdin.buffer.read1(4096):  # end of input: whoever started us is gone
            loop.remove_reader(sys.stdin.fileno())
            closing.append(asyncio.ensure_future(app.close()))

    if not sys.stdin.isatty():
        loop.add_reader(sys.stdin.fileno(), stdin_readable)
    print("ready", flush=True)
    await app.listen()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--transport", required=True, choices=[t.name for t in Transport])
    parser.add_argument("--options", default="{}", help="the transport's options, as JSON")
    parser.add_argument("--pattern", default='{"cmd": "sum"}', help="the handler's pattern, JSON")
    parser.add_argument("--work", type=float, default=0.0, help="seconds of work per request")
    parser.add_argument("--ack", action="store_true", help="ack each RabbitMQ message when done")
    run(main(parser.parse_args()))
