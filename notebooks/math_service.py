"""The chapter's math service (section 2.2), as a standalone process.

Run it from a terminal, from this folder or the repository root:

    python notebooks/math_service.py --port 3001

then call it from another terminal:

    python -m nestpy_mini.dev send --port 3001 '{"cmd": "sum"}' '[1, 2, 3]'
"""

from __future__ import annotations

import argparse

from nestpy_mini import (
    Controller,
    EventPattern,
    MessagePattern,
    Module,
    NestFactory,
    Transport,
    run,
)


@Controller()
class AppController:
    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        return sum(data or [])

    @EventPattern("user_created")
    def handle_user_created(self, data: dict) -> None:
        print("User created", data.get("userId"), flush=True)


@Module(controllers=[AppController])
class AppModule:
    pass


async def bootstrap(host: str, port: int) -> None:
    app = await NestFactory.create_microservice(
        AppModule, transport=Transport.TCP, options={"host": host, "port": port}
    )
    app.enable_shutdown_hooks()  # Ctrl-C and SIGTERM close it gracefully
    await app.start()
    print(f"math service listening on {host}:{app.server.port}", flush=True)
    await app.listen()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3001)
    args = parser.parse_args()
    run(bootstrap(args.host, args.port))  # on uvloop where it is installed
