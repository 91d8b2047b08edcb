"""The next hop of recipient verification (``defang.verify``): servers on loopback to probe.

``NextHop``: a private Postfix that knows its users (``relay_recipient_maps``: anyone else
gets Postfix's own ``550 5.1.1 ... User unknown in relay recipient table`` at RCPT) and
relays what it takes to a sink.  ``SinkServer``: Postfix's ``smtp-sink`` with its fault
options (``-r RCPT``: a 4xx to every RCPT, ``-Q RCPT``: 421 and hang up).  ``Silent``: a
listening socket that never says a word (a hung server).  ``Scripted``: a Python server
that sends fixed bytes and records every line it is sent (garbage, a trickle).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

from daemon import traversable_dir

from defang.testbed.ports import free_port
from defang.testbed.postfix import PrivatePostfix, find_program, wait_for_banner
from defang.testbed.sink import Sink

KNOWN = ("bob@example.org", "carol@example.org", "dave@example.org", "erin@example.org")


class NextHop:
    """Postfix on loopback that takes mail for ``known`` users of example.org only."""

    def __init__(self, known: tuple[str, ...] = KNOWN) -> None:
        self.dir = traversable_dir("defang-nexthop-")
        self.users = self.dir / "users"
        self.users.write_text("".join(f"{u} OK\n" for u in known))
        self.sink = Sink(self.dir / "sink", free_port())
        self.postfix = PrivatePostfix(self.dir / "postfix", free_port(), self.sink.port, extra={
            "relay_domains": "example.org", "relay_recipient_maps": f"texthash:{self.users}",
            "smtpd_reject_unlisted_recipient": "yes"})  # fmt: skip
        self.port = self.postfix.smtp_port

    def start(self) -> NextHop:
        try:
            self.sink.start()
            self.postfix.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for part in (self.postfix, self.sink):
            try:
                part.stop()
            except Exception:  # keep stopping the other
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NextHop:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SinkServer:
    """``smtp-sink`` on a free loopback port with extra options (e.g. ``-r RCPT``)."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([find_program("smtp-sink"), "-u", "postfix", *options,
                                      f"127.0.0.1:{self.port}", "10"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        wait_for_banner("127.0.0.1", self.port, 10)

    def __enter__(self) -> SinkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Silent:
    """A listening socket that never accepts: the kernel completes the handshake, then
    nothing (a hung server)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.sock.getsockname()[1]

    def __enter__(self) -> Silent:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


class Scripted:
    """A server that sends ``greeting`` (then ``reply`` to every line it gets), one byte at
    a time with ``drip`` seconds between bytes if ``drip``; ``lines`` has what it was sent."""

    def __init__(self, greeting: bytes, reply: bytes = b"250 ok\r\n", drip: float = 0.0) -> None:
        self.greeting, self.reply, self.drip = greeting, reply, drip
        self.lines: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # accept() looks at ``done`` this often (close() does not wake it)
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, conn: socket.socket, data: bytes) -> None:
        if not self.drip:
            conn.sendall(data)
            return
        for i in range(len(data)):
            if self.done.wait(self.drip):
                return
            conn.sendall(data[i : i + 1])

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with conn:
                try:
                    self._send(conn, self.greeting)
                    for line in conn.makefile("rb"):
                        self.lines.append(line)
                        self._send(conn, self.reply)
                except OSError:
                    pass

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.sock.close()
        self.thread.join(10)


def closed_port() -> int:
    """A loopback port nothing listens on (a server that is down)."""
    return free_port()


__all__ = ["KNOWN", "NextHop", "Scripted", "Silent", "SinkServer", "closed_port"]
