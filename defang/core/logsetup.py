"""One log format and destination for every defang process (``[log]``).

Formats: ``text`` (``time name[pid] LEVEL: message``, then a structured line's fields as
``key=value``), ``kv`` (every line as logfmt ``key=value`` pairs) and ``json`` (one
object per line).  A structured line (the one per message) hands its fields in
``extra={"fields": {...}}``; the other lines are free text whose first word is the queue
ID or ``conn N`` when they are about a message or a connection.

Destinations: ``stderr`` (systemd's journal), ``syslog`` (a Unix datagram socket,
``/dev/log``, with a configurable facility) or ``file``.  A file is reopened on SIGUSR1
and when its name no longer leads to the open file (logrotate's rename: checked at most
once a second, so processes that never see the signal, the workers, follow too).  A
destination that fails (syslog's socket gone, a full disk) never stops mail: the line
and the ones after it go to stderr, and one line there says why; the destination is
tried again on the next SIGUSR1 or rotation.

The handler is set up once, before ``defang run`` forks and gives up root, and every
process inherits it (a reload's zygote only takes its generation's log level).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

FORMATS = ("text", "kv", "json")
DESTINATIONS = ("stderr", "syslog", "file")
#: syslog facilities by name ([log] syslog_facility)
FACILITIES = logging.handlers.SysLogHandler.facility_names
TEXT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
RECHECK = 1.0  # seconds between two looks at whether the log file was renamed


def kv(fields: dict[str, Any]) -> str:
    """``key=value`` pairs (logfmt): a value with a space, a quote, ``=`` or nothing is quoted."""
    out = []
    for key, value in fields.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:.6f}".rstrip("0").rstrip(".") or "0"
        value = str(value)
        if not value or any(c in value for c in ' "=\\') or not value.isprintable():
            value = json.dumps(value, ensure_ascii=False)
        out.append(f"{key}={value}")
    return " ".join(out)


class Formatter(logging.Formatter):
    """Renders a record in one of ``FORMATS``; a structured record's fields follow its text."""

    def __init__(self, fmt: str = "text", *, bare: bool = False) -> None:
        # bare: syslog stamps the time, name and pid itself
        super().__init__("%(levelname)s: %(message)s" if bare else TEXT_FORMAT)
        self.kind = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        if self.kind == "text":
            line = super().format(record)
            return f"{line} {kv(fields)}" if fields else line
        record.message = record.getMessage()
        head = {"time": self.formatTime(record), "proc": record.name, "pid": record.process,
                "level": record.levelname.lower(), "msg": record.message}  # fmt: skip
        if record.exc_info:
            head["exc"] = self.formatException(record.exc_info)
        if self.kind == "json":
            return json.dumps({**head, **fields}, ensure_ascii=False, default=str)
        return kv({**head, **fields})


class _Switchable(logging.Handler):
    """A destination with stderr behind it: the first failure switches to stderr, and says
    so there once; ``reopen`` (SIGUSR1, a rotated file) tries the destination again."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.fallback = logging.StreamHandler(sys.stderr)
        self.failed = False
        self.reopen_pending = False

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 (logging's name)
        super().setFormatter(fmt)
        self.fallback.setFormatter(Formatter(fmt.kind) if isinstance(fmt, Formatter) else fmt)

    def emit(self, record: logging.LogRecord) -> None:
        if self.reopen_pending or self._rotated():
            self.reopen_pending = False
            self._reopen()
        if not self.failed:
            try:
                self._emit(record)
                return
            except Exception as exc:  # OSError mostly; a log line must never stop mail
                self._fail(exc)
        self.fallback.emit(record)

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        try:
            sys.stderr.write(f"defang[{os.getpid()}]: log: {self.what} failed ({exc}); logging to standard "
                             "error until SIGUSR1 or a rotation\n")  # fmt: skip
            sys.stderr.flush()
        except Exception:
            pass

    def _reopen(self) -> None:
        try:
            self._open()
            self.failed = False
        except OSError as exc:
            if not self.failed:
                self._fail(exc)

    def _rotated(self) -> bool:
        return False

    def after_fork(self) -> None:
        """In a child whose inherited descriptors were closed: open the destination again
        (as the child's user), without touching the old descriptor's number."""
        self._forget()
        self.failed = False
        self._reopen()

    def _forget(self) -> None:
        raise NotImplementedError

    def _emit(self, record: logging.LogRecord) -> None:
        raise NotImplementedError

    def _open(self) -> None:
        raise NotImplementedError


class FileDestination(_Switchable):
    """Appends to a file; reopens it when it was renamed or on ``reopen_pending``."""

    def __init__(self, path: str) -> None:
        super().__init__(f"log file {path}")
        self.path = path
        self.stream: Any = None
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.checked = time.monotonic()
        self._reopen()

    def _open(self) -> None:
        # The descriptor is ours to close (closefd=False): after a fork that closed it
        # (child.fork), the stream is forgotten, never closed: its number may be a socket by then.
        # O_NONBLOCK for the open only: a FIFO with no reader is ENXIO (stderr then), not a
        # daemon that never starts; writes block as they always did.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o640)
        os.set_blocking(fd, True)
        stream = open(fd, "a", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        old, old_fd = self.stream, self.fd
        self.stream, self.fd = stream, fd
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        if old is not None:
            try:
                old.close()
                os.close(old_fd)
            except OSError:
                pass

    def _forget(self) -> None:
        self.stream = self.fd = None

    def _rotated(self) -> bool:
        now = time.monotonic()
        if now - self.checked < RECHECK:
            return False
        self.checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.ident

    def _emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            raise OSError("not open")
        self.stream.write(self.format(record) + "\n")
        self.stream.flush()


class SyslogDestination(_Switchable):
    """A Unix datagram socket (``/dev/log``); each line one datagram, RFC 3164's ``<PRI>``."""

    def __init__(self, address: str, facility: str) -> None:
        super().__init__(f"syslog {address}")
        self.address = address
        self.facility = FACILITIES[facility]
        self.sock: socket.socket | None = None
        self._reopen()

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        old, self.sock = self.sock, sock
        if old is not None:
            old.close()

    def _forget(self) -> None:
        if self.sock is not None:
            self.sock.detach()  # closed by the fork already: its number is not ours any more
        self.sock = None

    def _emit(self, record: logging.LogRecord) -> None:
        if self.sock is None:
            raise OSError("not connected")
        priority = logging.handlers.SysLogHandler.priority_names.get(
            logging.handlers.SysLogHandler.priority_map.get(record.levelname, "warning"), 4)
        ident = f"{record.name}[{record.process}]: "
        body = self.format(record)
        self.sock.send(f"<{self.facility << 3 | priority}>{ident}{body}".encode("utf-8", "replace"))


_current: _Switchable | None = None


def reopen() -> bool:
    """Reopen the destination before the next line (SIGUSR1; safe in a signal handler);
    False when there is none (standard error)."""
    if _current is None:
        return False
    _current.reopen_pending = True
    return True


def _on_usr1(signum: int, frame: Any) -> None:
    reopen()


def setup(level: str = "info", fmt: str = "text", destination: str = "stderr", *, path: str = "",
          facility: str = "mail", syslog_address: str = "/dev/log") -> None:  # fmt: skip
    """Route every logger's lines to one destination, in one format (the ``[log]`` options)."""
    global _current
    # Our format uses none of these, and each costs a lookup on every log record
    # (the caller's frame, the thread's name, the multiprocessing process name).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    if destination == "file":
        handler = _current = FileDestination(path)
    elif destination == "syslog":
        handler = _current = SyslogDestination(syslog_address, facility)
    else:
        handler, _current = logging.StreamHandler(sys.stderr), None
    handler.setFormatter(Formatter(fmt, bare=destination == "syslog" and fmt == "text"))
    root = logging.getLogger()
    for old in root.handlers:
        if old is not handler:
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if _current is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _on_usr1)


def after_fork() -> None:
    """``child.fork`` closed every inherited descriptor, the destination's too: reopen it."""
    if _current is not None:
        _current.after_fork()


def set_level(level: str) -> None:
    """A reload's ``[daemon] log_level``, in the zygote, the multiplexor and the milter alike;
    the destination is kept as it is: it was opened before root was given up, and the
    [log] options need a restart anyway."""
    logging.getLogger().setLevel(level.upper())


def configure(cfg: Any) -> None:
    """``setup`` with a ``Config``'s ``[daemon] log_level`` and ``[log]`` options."""
    setup(cfg.log_level, cfg.log_format, cfg.log_destination, path=str(cfg.log_file),
          facility=cfg.log_syslog_facility, syslog_address=str(cfg.log_syslog_socket))  # fmt: skip
