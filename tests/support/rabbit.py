"""A throwaway RabbitMQ node for the restart test, booted while other tests run.

RabbitMQ ships with no pip package, so the test that stops and starts a
broker runs a private node of the machine's rabbitmq-server: own ports, own
epmd, own data dir.  The machine's broker is never touched.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from nestpy_mini.dev import brokers


def _amqp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(3) == b"\x01\x00\x00"
    except OSError:
        return False


def rabbit_missing() -> str | None:
    """Why a private RabbitMQ node cannot run here, or None."""
    if PrivateRabbit.script() is None:
        return "rabbitmq-server is not installed, so the broker restart test cannot run"
    if shutil.which("epmd") is None:
        return "epmd (Erlang) is not on PATH, so the broker restart test cannot run"
    return None


class PrivateRabbit:
    """A throwaway RabbitMQ node: free ports, its own epmd and data dir, guest/guest.

    Booting takes about 6 s, so it starts in a thread while other tests run.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nestpy-rabbit-"))
        self.port = brokers.free_port()
        epmd_port = brokers.free_port()
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "env.conf").write_text("")  # not the machine's rabbitmq-env.conf
        self.env = {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie goes here
            "RABBITMQ_NODENAME": f"nestpy{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(brokers.free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(epmd_port),
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}"
        # Our own epmd, in the foreground: one the node started would daemonize and linger.
        self.epmd: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["epmd", "-port", str(epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._boot: threading.Thread | None = None
        self._boot_error: BaseException | None = None
        atexit.register(self.close)

    @staticmethod
    def script() -> str | None:
        # Debian's /usr/sbin wrapper switches to the rabbitmq user, who could
        # not write our temp dir; the script it wraps runs as we are.
        real = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        return real if os.access(real, os.X_OK) else shutil.which("rabbitmq-server")

    def start(self, within: float = 30.0) -> None:
        """Boot the node (again, on the same ports and data) and wait until AMQP answers."""
        script = self.script()
        assert script is not None
        with open(self.dir / "out.log", "ab") as log:
            self.proc = subprocess.Popen(
                [script],
                env=self.env,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its Erlang children go with its group
            )
        deadline = time.monotonic() + within
        while not _amqp_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.dir / "out.log").read_text(errors="replace")[-1500:]
                self.stop()
                raise RuntimeError(f"private RabbitMQ did not start:\n{tail}")
            time.sleep(0.05)

    def start_in_background(self) -> None:
        def boot() -> None:
            try:
                self.start()
            except BaseException as exc:
                self._boot_error = exc

        self._boot = threading.Thread(target=boot, name="private-rabbit", daemon=True)
        self._boot.start()

    def wait_booted(self, within: float = 40.0) -> None:
        if self._boot is not None:
            self._boot.join(within)
            self._boot = None
        if self._boot_error is not None:
            raise self._boot_error

    def restart_app(self, step: str) -> None:
        """``stop_app`` or ``start_app``: the broker's own restart, minus the Erlang VM.

        Stopping the app closes every connection and listener and drops every
        transient queue, as a restart does; starting it again takes about 1 s,
        where booting the whole node again took 6.
        """
        ctl = Path(self.script() or "rabbitmq-server").with_name("rabbitmqctl")
        done = subprocess.run(
            [str(ctl), "-n", self.env["RABBITMQ_NODENAME"], step],
            env=self.env,
            cwd=self.dir,
            capture_output=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {step} failed: {done.stderr.decode()[-500:]}")
        if step == "start_app" and not _amqp_answers(self.port):
            raise RuntimeError("the private RabbitMQ started its app but AMQP does not answer")

    def stop(self, *, graceful: bool = True) -> None:
        """Stop the broker: cleanly (its script traps TERM; about 1 s), or kill
        its process group at once when the data is about to be deleted anyway."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if graceful:
            proc.terminate()
            try:
                proc.wait(20)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)  # the group start_new_session gave it
        proc.wait()

    def close(self) -> None:
        if self._boot is not None:
            self._boot.join(40)
        self.stop(graceful=False)
        epmd, self.epmd = self.epmd, None
        if epmd is not None:
            epmd.terminate()
            epmd.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
