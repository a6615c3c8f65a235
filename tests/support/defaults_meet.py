"""Two processes with default options, on a machine with no broker service: they meet or both fail.

Run inside a private network namespace (``unshare -n``), where only loopback
exists and no broker listens on any default port:

    python tests/support/defaults_meet.py redis

Prints one JSON object: what the server and the client process did, first
with no broker at all, then with ``python -m nestpy_mini.dev broker KIND``
running on the broker's default port, as a user would start it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

SERVE = """
import asyncio, sys
from nestpy_mini import Controller, MessagePattern, Module, NestFactory, Transport

@Controller()
class Math:
    @MessagePattern("sum")
    def sum(self, data):
        return sum(data)

@Module(controllers=[Math])
class AppModule: ...

async def main():
    app = await NestFactory.create_microservice(AppModule, transport=Transport[sys.argv[1]])
    await app.start()
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    await app.close()

asyncio.run(main())
"""

SEND = """
import asyncio, sys
from nestpy_mini import ClientProxyFactory, Transport

async def main():
    client = ClientProxyFactory.create(Transport[sys.argv[1]])
    try:
        print(await client.send("sum", [1, 2, 3]), flush=True)
    finally:
        await client.close()

asyncio.run(main())
"""


def run_pair(kind: str) -> dict[str, object]:
    """Start a server, then a client, both with default options; report what each did."""
    began = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, kind.upper()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    ready = server.stdout.readline().strip()
    client = subprocess.run(
        [sys.executable, "-c", SEND, kind.upper()], capture_output=True, text=True, timeout=60
    )
    try:
        _, server_err = server.communicate("", timeout=30)  # closes its stdin: it stops
    except subprocess.TimeoutExpired:
        server.kill()
        _, server_err = server.communicate()
    return {
        "server_ready": ready == "READY",
        "server_error": (server_err.strip().splitlines() or [""])[-1],
        "client_output": client.stdout.strip(),
        "client_error": (client.stderr.strip().splitlines() or [""])[-1],
        "seconds": round(time.monotonic() - began, 2),
    }


def main(kind: str) -> None:
    results: dict[str, object] = {"without_broker": run_pair(kind)}
    broker = subprocess.Popen(
        [sys.executable, "-m", "nestpy_mini.dev", "broker", kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert broker.stdout is not None
    results["broker_said"] = broker.stdout.readline().strip()
    try:
        results["with_broker"] = run_pair(kind)
    finally:
        broker.terminate()
        broker.wait(10)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
