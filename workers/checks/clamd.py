"""clamd's protocol, sans I/O: ``zINSTREAM`` and ``zFILDES`` requests, their answers.

``z`` commands end in NUL, and so does the answer; clamd closes the connection after it.

- ``zFILDES``: the command, then the open file passed as SCM_RIGHTS ancillary data (on a
  Unix socket only).  clamd reads the file itself: no byte of the message is copied, and
  clamd's own limits (``MaxFileSize``, ``MaxScanSize``) apply.  The cheapest path, used
  for the spool file when clamd is local.
- ``zINSTREAM``: the bytes in chunks, each after its length (4 bytes, big-endian), then a
  zero length.  clamd refuses more than its ``StreamMaxLength``: it answers ``INSTREAM
  size limit exceeded. ERROR`` and closes, so the client caps what it sends (``max_size``)
  and reads that answer when clamd stops reading early.

Answers: ``stream: OK``, ``stream: Eicar-Signature FOUND`` (one line per signature with
AllMatchScanning), ``fd[10]: OK``, ``... ERROR`` for clamd's own failures.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from defang.workers.checks.exchange import PassFd
from defang.workers.checks.results import VirusResult

CHUNK = 64 * 1024


def instream(chunks: Iterable[bytes]) -> Iterator[bytes]:
    yield b"zINSTREAM\0"
    for chunk in chunks:
        for start in range(0, len(chunk), CHUNK):
            piece = chunk[start:start + CHUNK]
            yield struct.pack(">I", len(piece)) + piece
    yield struct.pack(">I", 0)


def fildes(fd: int) -> Iterator[bytes | PassFd]:
    yield b"zFILDES\0"
    yield PassFd(fd)


def parse(answer: bytes, seconds: float = 0.0) -> VirusResult:
    """clamd's answer as a result (an ``error`` one for ERROR or anything unexpected)."""
    text = answer.decode("utf-8", "replace").replace("\0", "\n").strip()
    if not text:
        return VirusResult(error="clamd closed the connection without an answer", seconds=seconds)
    viruses = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.endswith(" ERROR"):
            return VirusResult(error=f"clamd: {line[:-6].strip()}", seconds=seconds)
        subject, sep, verdict = line.rpartition(": ")
        if not sep:
            return VirusResult(error=f"clamd answered {line[:80]!r}", seconds=seconds)
        if verdict.endswith(" FOUND"):
            viruses.append(verdict[:-6].strip())
        elif verdict != "OK":
            return VirusResult(error=f"clamd answered {line[:80]!r}", seconds=seconds)
    return VirusResult(infected=bool(viruses), viruses=viruses, seconds=seconds)
