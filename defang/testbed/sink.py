"""A capturing SMTP sink: Postfix's ``smtp-sink`` writing one file per message.

``smtp-sink -R DIR -u postfix -d /%H%M%S. -m 500 127.0.0.1:PORT 1000`` accepts every
transaction and dumps it to ``DIR/<HHMMSS>.<8 hex digits>``.  It ships with Postfix, is
written in C and event-driven, so the sink is unlikely to be what ``scripts/bench``
ends up measuring, and it needs no Python thread in the test process.

What smtp-sink writes (checked against its source, postfix/src/smtpstone/smtp-sink.c,
and by experiment with Postfix 3.7.11):

* At MAIL FROM it creates the file (mode 0644, owner ``postfix``) and writes LF-terminated
  records: ``X-Client-Addr:``, ``X-Client-Proto:``, ``X-Helo-Args:`` (if the client sent
  HELO/EHLO), ``X-Mail-Args:`` (everything after "MAIL FROM:", e.g.
  ``<a@b> SIZE=123 BODY=8BITMIME``), then one ``X-Rcpt-Args:`` per RCPT.  Command
  arguments pass through Postfix's ``printable()``, so non-ASCII bytes in envelope
  addresses may appear as "?".
* At DATA: a three-line ``Received: from HELO ([ADDR])`` / ``\\tby smtp-sink (smtp-sink)
  with ESMTP id ID;`` / ``\\tDATE`` header.
* Then the message, byte by byte, with dot-stuffing undone and **every CR dropped**:
  CRLF line ends become LF, and a bare CR inside a line would vanish.  The terminating
  ``CRLF.CRLF`` leaves one extra LF at the end (the "empty line" of its manual page).
* The file is closed when the final "." arrives, before the 250 reply; an aborted
  transaction (RSET, disconnect) deletes it.

`SinkMessage.raw` undoes the line-ending change: it is the message part with the extra
final LF removed and every LF turned back into CRLF.  That is exactly the bytes received
provided the sender sent no bare CR or bare LF inside the DATA -- true for Postfix's SMTP
client, which emits each stored line followed by CRLF, and for
`defang.testbed.smtpclient.send` (it normalizes to CRLF).  The one thing this sink
cannot show is a bare CR in the middle of a line (say, inserted by a milter's body
replacement): smtp-sink drops it.  Long lines (200 KB and more), NUL bytes, 8-bit bytes
and 20 MB messages pass through intact (the data path has no line limit).

Files that smtp-sink still holds open (a transaction in progress) are found through
``/proc/PID/fd`` and skipped, so `Sink.messages` only returns complete messages.

Permissions: smtp-sink drops to ``postfix`` after binding, and the dump directory may sit
below a directory ``postfix`` cannot traverse (pytest's ``tmp_path`` is under
``/tmp/pytest-of-root``, mode 0700).  So smtp-sink is started with ``-R DUMPDIR``: it
chroots into the dump directory while still root and writes ``/%H%M%S.*`` inside it.
Only the dump directory itself must be writable by ``postfix`` (we chown it); nothing
above it is touched.  (Adding o+x to the parents is not robust: every new pytest session
resets ``pytest-of-root`` to 0700, which killed a running smtp-sink in our first version
when two test sessions overlapped.)  Inside the chroot there is no /etc/localtime, so
dump file names and smtp-sink's own Received date are in UTC.  Needs root.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from defang.testbed.ports import LOOPBACK
from defang.testbed.postfix import (
    TestbedError,
    chown_postfix,
    find_program,
    require_root,
    wait_for_banner,
)


def _angle_addr(args: str) -> str:
    """The address in "<addr> PARAM=..." (MAIL/RCPT arguments); "" for "<>"."""
    args = args.strip()
    if args.startswith("<"):
        end = args.find(">")
        return args[1:end] if end >= 0 else args[1:]
    return args.split(" ", 1)[0]


@dataclass
class SinkMessage:
    """One message captured by the sink.

    ``raw`` is the message exactly as sent after DATA (CRLF line ends, no dot-stuffing,
    smtp-sink's own records and Received header removed); it starts with the
    ``Received:`` header the relaying Postfix prepended.
    """

    mail_from: str
    rcpts: list[str]
    helo: str | None
    raw: bytes
    mail_args: str = ""
    rcpt_args: list[str] = field(default_factory=list)
    client_addr: str = ""
    path: Path | None = None

    def strip_received(self, count: int = 1) -> bytes:
        """``raw`` minus its first ``count`` header fields, which must be Received.

        The relaying Postfix prepends exactly one ``Received:`` header; this removes it
        (with its folded continuation lines) so the rest can be compared with what the
        client sent.  Raises ValueError if a removed field is not a Received header.
        """
        data = self.raw
        for _ in range(count):
            if not data[:9].lower() == b"received:":
                raise ValueError(f"expected a Received header, got {data[:60]!r}")
            pos = 0
            while True:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    return b""
                pos = nl + 2
                if data[pos : pos + 1] not in (b" ", b"\t"):
                    break
            data = data[pos:]
        return data


def parse_dump(blob: bytes, path: Path | None = None) -> SinkMessage:
    """Parse one smtp-sink ``-d`` dump file (see the module docstring for the format)."""
    pos = 0
    mail_args = ""
    rcpt_args: list[str] = []
    helo: str | None = None
    client_addr = ""
    while True:
        nl = blob.find(b"\n", pos)
        if nl < 0:
            raise ValueError(f"{path}: no Received line in smtp-sink dump")
        line = blob[pos:nl].decode("utf-8", errors="replace")
        pos = nl + 1
        name, _, value = line.partition(": ")
        if name == "Received":
            # Two more lines: "\tby HOST (smtp-sink) with PROTO id ID;" and "\tDATE".
            for _ in range(2):
                nl = blob.find(b"\n", pos)
                if nl < 0 or blob[pos : pos + 1] != b"\t":
                    raise ValueError(f"{path}: truncated smtp-sink Received header")
                pos = nl + 1
            break
        if name == "X-Mail-Args":
            mail_args = value
        elif name == "X-Rcpt-Args":
            rcpt_args.append(value)
        elif name == "X-Helo-Args":
            helo = value
        elif name == "X-Client-Addr":
            client_addr = value
        elif name not in ("X-Client-Proto",):
            raise ValueError(f"{path}: unexpected smtp-sink record {line!r}")
    body = blob[pos:]
    if not body.endswith(b"\n"):
        raise ValueError(f"{path}: smtp-sink dump does not end with LF (incomplete?)")
    return SinkMessage(
        mail_from=_angle_addr(mail_args),
        rcpts=[_angle_addr(a) for a in rcpt_args],
        helo=helo,
        raw=body[:-1].replace(b"\n", b"\r\n"),
        mail_args=mail_args,
        rcpt_args=rcpt_args,
        client_addr=client_addr,
        path=path,
    )


class Sink:
    """``smtp-sink`` on ``127.0.0.1:port`` dumping each message under ``workdir/dump``.

    Use as a context manager (``with Sink(tmp_path / "sink", port) as sink:``), or
    `start`/`stop`.  Needs root (smtp-sink switches to the ``postfix`` user).
    """

    def __init__(self, workdir: Path, port: int, backlog: int = 1000) -> None:
        if port == 25:
            raise ValueError("the test bed never uses port 25")
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.backlog = backlog
        self.dump_dir = self.workdir / "dump"
        self.log_path = self.workdir / "smtp-sink.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> None:
        """Start smtp-sink and wait until it answers with a 220 greeting."""
        require_root("Sink")
        if self.proc is not None:
            raise TestbedError("sink already started")
        program = find_program("smtp-sink")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dump_dir.mkdir(exist_ok=True)
        chown_postfix(self.dump_dir, 0o755)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    program,
                    "-R", str(self.dump_dir),  # chroot here (as root), then ...
                    "-u", "postfix",  # ... drop to postfix
                    "-d", "/%H%M%S.",  # relative to the chroot
                    "-m", "500",  # concurrent sessions (default 256); 2 fds each
                    f"{LOOPBACK}:{self.port}",
                    str(self.backlog),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a ^C in the terminal is for the test runner
            )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise TestbedError(
                        f"smtp-sink exited with {self.proc.returncode}: {self.log_text()}"
                    )
                try:
                    wait_for_banner(LOOPBACK, self.port, 0.2)
                    return
                except TestbedError:
                    if time.monotonic() > deadline:
                        raise
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10) -> None:
        """Terminate smtp-sink (SIGTERM, then SIGKILL) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def log_text(self) -> str:
        """smtp-sink's stderr (warnings such as "lost connection")."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _open_files(self) -> set[str]:
        """Paths smtp-sink has open right now (transactions in progress)."""
        if self.proc is None:
            return set()
        fd_dir = f"/proc/{self.proc.pid}/fd"
        paths: set[str] = set()
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            return paths
        for fd in fds:
            try:
                paths.add(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                continue
        return paths

    def _complete_files(self) -> list[Path]:
        """Dump files of finished transactions, oldest first.

        The directory is listed *before* the open-file check: a file that is listed and
        then closed is complete; one created after the listing is simply not seen yet.
        """
        try:
            entries = list(os.scandir(self.dump_dir))
        except FileNotFoundError:
            return []
        busy = self._open_files()
        done: list[tuple[int, str, Path]] = []
        for e in entries:
            if e.path in busy or not e.is_file():
                continue
            try:
                done.append((e.stat().st_mtime_ns, e.name, Path(e.path)))
            except FileNotFoundError:  # aborted transaction, unlinked meanwhile
                continue
        return [p for _, _, p in sorted(done)]

    def messages(self) -> list[SinkMessage]:
        """All completely received messages, oldest first."""
        out: list[SinkMessage] = []
        for p in self._complete_files():
            try:
                blob = p.read_bytes()
            except FileNotFoundError:
                continue
            out.append(parse_dump(blob, p))
        return out

    def count(self) -> int:
        """Number of completely received messages (cheap: no parsing)."""
        return len(self._complete_files())

    def wait_for(self, count: int, timeout: float = 30) -> list[SinkMessage]:
        """Wait until at least ``count`` messages arrived; return all of them.

        Raises TimeoutError (with the number seen) if they do not arrive in time, and
        `TestbedError` with smtp-sink's last words at once if smtp-sink has died.
        """
        deadline = time.monotonic() + timeout
        while True:
            n = self.count()
            if n >= count:
                return self.messages()
            if self.proc is not None and self.proc.poll() is not None:
                raise TestbedError(
                    f"smtp-sink exited ({self.proc.returncode}) after {n} of {count} "
                    f"messages: {self.log_text().strip()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink got {n} of {count} messages within {timeout}s")
            time.sleep(0.02)

    def clear(self) -> int:
        """Delete every completely received message; return how many there were."""
        files = self._complete_files()
        for p in files:
            p.unlink(missing_ok=True)
        return len(files)

    def __enter__(self) -> Sink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
