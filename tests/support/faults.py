"""A TCP microservice run as a real child process, for the fault and load tests.

Run alone (``python tests/fault_service.py --port 0``) it prints
``listening on <host>:<port>`` and serves until SIGTERM/SIGINT.  The tests
import ``ServiceProcess`` from here to start it, kill it with SIGKILL, start
it again on the same port, and read its resident memory from ``/proc``: a
child process is what a crash really kills, and its RSS is not mixed with
the test's own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nestpy_mini import Controller, MessagePattern, Module, NestFactory, RpcException, Transport

HERE = Path(__file__).resolve()


@Controller()
class FaultController:
    """Handlers that answer, echo, hang or fail, on request."""

    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        return sum(data)

    @MessagePattern({"cmd": "echo"})
    async def echo(self, data: dict[str, Any]) -> dict[str, Any]:
        # A short wait makes requests overlap in the server and return out
        # of order, so a reply routed to the wrong caller would show.
        await asyncio.sleep(data.get("delay", 0))
        return {"token": data["token"], "sum": sum(data["nums"])}

    def __init__(self) -> None:
        self._arrived: dict[Any, int] = {}
        self._all_in: dict[Any, asyncio.Event] = {}

    @MessagePattern({"cmd": "hold"})
    async def hold(self, data: dict[str, Any]) -> dict[str, Any]:
        """``echo``, once ``data["of"]`` requests of ``data["round"]`` have all arrived:
        the load test needs every request of a burst held at once, whatever the timing."""
        key = data["round"]
        self._arrived[key] = self._arrived.get(key, 0) + 1
        all_in = self._all_in.setdefault(key, asyncio.Event())
        if self._arrived[key] >= data["of"]:
            all_in.set()
            del self._arrived[key], self._all_in[key]
        try:
            await asyncio.wait_for(all_in.wait(), 20)
        except TimeoutError:
            raise RpcException(f"only some of round {key}'s requests arrived") from None
        return await self.echo(data)

    @MessagePattern({"cmd": "hang"})
    async def hang(self, data: object) -> None:
        await asyncio.sleep(3600)

    @MessagePattern({"cmd": "boom"})
    def boom(self, data: object) -> None:
        raise ValueError("a bug in the handler")

    @MessagePattern({"cmd": "refuse"})
    async def refuse(self, data: object) -> None:
        await asyncio.sleep(0)
        raise RpcException({"status": "error", "message": f"refused {data}"})

    @MessagePattern({"cmd": "gc"})
    def collect(self, data: object) -> dict[str, int]:
        """Collect garbage now, so an RSS read afterwards sees what is really kept;
        the count of live objects shows a leak that allocator noise in RSS would hide."""
        gc.collect()
        return {"pid": os.getpid(), "objects": len(gc.get_objects())}


@Module(controllers=[FaultController])
class FaultModule:
    pass


async def serve(host: str, port: int, close_grace: float) -> None:
    app = await NestFactory.create_microservice(
        FaultModule,
        transport=Transport.TCP,
        options={"host": host, "port": port, "close_grace": close_grace},
    )
    app.enable_shutdown_hooks()
    await app.start()
    print(f"listening on {host}:{app.server.port}", flush=True)
    await app.listen()


# --- the test side --------------------------------------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` from /proc (``VmRSS`` now, ``VmHWM`` its peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` (Linux 4.0+); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class ServiceProcess:
    """This script as a child process: started, killed, restarted; never left running."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", close_grace: float = 0.5) -> None:
        self.host = host
        self.port = port
        self.close_grace = close_grace  # short: stop() should not wait on hanging handlers
        self.proc: subprocess.Popen[str] | None = None

    def start(self, within: float = 15.0) -> ServiceProcess:
        """Start the child and wait for its "listening" line; raise with its stderr if none."""
        errors = tempfile.TemporaryFile(mode="w+")
        self.proc = proc = subprocess.Popen(
            [
                *(sys.executable, str(HERE), "--host", self.host, "--port", str(self.port)),
                *("--close-grace", str(self.close_grace)),
            ],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + within
        line = ""
        try:
            # select() first, so a child that never prints cannot block us past the deadline.
            while not line and proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    break
                line = proc.stdout.readline()  # the child prints one line, then nothing
        finally:
            errors.seek(0)
            stderr = errors.read()
            errors.close()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"fault_service did not start: {line!r} {stderr[-2000:]}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no handler runs, no reply is sent, the kernel resets the sockets."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """SIGTERM (a graceful close), then SIGKILL if it does not end within 5 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--close-grace", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.close_grace))
