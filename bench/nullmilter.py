"""A do-nothing pymilter milter: the ceiling for any pymilter front end (scripts/bench).

It takes the message the way defang's front end must (headers and body, both
negotiated "no reply"), keeps nothing but a byte count, and at end of message adds one
header and accepts.  Whatever defang does beyond this -- spooling, the multiplexor
round trip, a worker -- is defang's own cost; this is what pymilter and libmilter cost.

    python bench/nullmilter.py unix:/path/milter.sock
    python bench/nullmilter.py inet:PORT@127.0.0.1

A Unix socket is made mode 0660, group postfix (Postfix's smtpd drops supplementary
groups).  Runs until SIGTERM/SIGINT (libmilter's signal thread ends milter.main).
"""

from __future__ import annotations

import grp
import os
import sys

import Milter
import milter


class NullMilter(Milter.Base):
    """Receives headers and body without replying, accepts with one added header."""

    def __init__(self) -> None:
        self.size = 0

    @Milter.noreply
    def header(self, name: str, value: bytes) -> int:
        self.size += len(name) + len(value) + 4
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        self.size += len(chunk)
        return Milter.CONTINUE

    def eom(self) -> int:
        self.addheader("X-Null-Milter", str(self.size))
        self.size = 0
        return Milter.ACCEPT


class ReplyAllMilter(NullMilter):
    """The same, but every stage gets a callback and a reply (no "no reply" stages, no
    skipped stages): Postfix then never writes a packet that the milter does not answer
    before its next write.  Used by ``scripts/bench --inet`` to test whether the MTA-side
    Nagle stall comes from the unanswered packets."""

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return Milter.CONTINUE

    def hello(self, hostname: str) -> int:
        return Milter.CONTINUE

    def envfrom(self, f: str, *s: str) -> int:
        return Milter.CONTINUE

    def envrcpt(self, to: str, *s: str) -> int:
        return Milter.CONTINUE

    def data(self) -> int:
        return Milter.CONTINUE

    def header(self, name: str, value: bytes) -> int:
        self.size += len(name) + len(value) + 4
        return Milter.CONTINUE

    def eoh(self) -> int:
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self.size += len(chunk)
        return Milter.CONTINUE


def main(argv: list[str]) -> int:
    """Serve on argv[1] until a signal stops libmilter (argv[2] == "reply-all": every stage replies)."""
    spec = argv[1]
    Milter.factory = ReplyAllMilter if argv[2:3] == ["reply-all"] else NullMilter
    Milter.set_flags(Milter.ADDHDRS)
    real_open, real_main = milter.opensocket, milter.main

    def opensocket(rmsock: bool) -> None:
        # A Unix socket must be mode 0660, group postfix: Postfix's smtpd drops groups.
        old = os.umask(0o117)
        try:
            real_open(rmsock)
        finally:
            os.umask(old)
        if spec.startswith(("unix:", "local:")):
            try:
                os.chown(spec.split(":", 1)[1], -1, grp.getgrnam("postfix").gr_gid)
            except KeyError:
                pass

    def main_ready() -> None:
        print("ready", flush=True)
        real_main()

    milter.opensocket, milter.main = opensocket, main_ready
    Milter.runmilter("nullmilter", spec, 600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
