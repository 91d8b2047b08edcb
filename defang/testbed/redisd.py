"""A private Redis on loopback for the shared-state tests and benchmarks.

Debian's ``redis-server``, started by us in the foreground with its own directory, on
``127.0.0.1:PORT`` only, nothing saved to disk (``--save ""``, no append-only file), and
stopped by PID.  ``stop()`` then ``start()`` again is a Redis that went away and came back
on the same port (what the tests of ``[state] on_error`` need).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from defang.testbed.ports import free_port
from defang.testbed.procs import stop_process, wait_ready


def redis_available() -> str | None:
    """None when redis-server is installed, else what is missing."""
    if shutil.which("redis-server") or Path("/usr/bin/redis-server").exists():
        return None
    return "not installed: redis-server (scripts/bootstrap installs it)"


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port``, in ``dir`` (made here and removed by
    ``close`` unless given)."""

    proc: subprocess.Popen[bytes] | None = None

    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        self.own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="defang-redis-"))
        self.port = port or free_port()
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.log), "--databases", "4"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            wait_ready(self.proc, self.ping, timeout, "redis-server",
                       lambda: self.log.read_text() if self.log.exists() else "")  # fmt: skip
        except RuntimeError:
            self.stop()
            raise
        return self

    def ping(self) -> bool:
        """Whether the server answers PING now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(100).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the PID we started (SIGKILL if it lingers); the directory is kept."""
        stop_process(self.proc, timeout)
        self.proc = None

    def close(self) -> None:
        """``stop``, and our directory removed."""
        self.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
