"""The milter front end: libmilter callbacks in, multiplexor requests out.

Thin by rule: every Python callback holds the GIL, so across all SMTP connections
only one callback runs at a time.  Callbacks here only record envelope data, append
header and body bytes to the spool file, and at decision points make one blocking
request to the multiplexor (a blocking recv releases the GIL).  No MIME parsing, no
regexes, no admin code.

State lives on the ``Session`` attached to libmilter's context (one per SMTP
connection), never in thread-locals: libmilter runs one connection's callbacks on
several OS threads.

What the MTA is asked for follows the hooks filter.py defines (DESIGN rule 4): stages
with no hook are negotiated "no reply" (the MTA does not wait), and without message
hooks the MTA does not send headers or body at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import milter

from defang import protocol
from defang.config import Config, ReplySpec
from defang.mxclient import MultiplexorClient, MultiplexorError

log = logging.getLogger("defang.milter")

MESSAGE_HOOKS = frozenset({"filter_begin", "filter_part", "filter_multipart", "filter_end"})
STAGE_HOOK = {"connect": "filter_relay", "helo": "filter_helo", "mail": "filter_sender",
              "rcpt": "filter_recipient"}  # fmt: skip

# Actions defang may apply at end of message; asked for only if the MTA offers them.
WANTED_ACTIONS = (
    milter.ADDHDRS | milter.CHGHDRS | milter.ADDRCPT | milter.DELRCPT | milter.CHGFROM
    | milter.CHGBODY | milter.QUARANTINE
)  # fmt: skip
HOOKS_MAX_AGE = 5.0  # seconds before the hook list is asked for again
# Header and body bytes are kept in memory up to this much and the spool file is taken
# at the first flush: at end of message for a small one, then one write (no buffered
# file object: no fstat, lseek, flush).  Below malloc's mmap threshold (128 KiB): a bigger
# buffer costs an mmap and munmap, and fresh page faults, per message.  Body chunks (up
# to 64 KiB) that do not fit are written straight through.
SPOOL_BUFFER = 16 * 1024
SPOOL_FREE_MAX = 256  # free spool files kept for reuse (see FrontEnd.take_spool)
# Earlier messages' bytes left in free spool files, in all (see FrontEnd.give_spool).
SPOOL_KEEP_BYTES = 64 * 2**20


class HookCache:
    """Which hooks the running filter defines, refreshed from the multiplexor.

    Asked again when a reply comes from a newer filter generation (a reload) or when
    the answer is older than HOOKS_MAX_AGE.  Unknown (multiplexor down): every hook is
    assumed, so every stage asks for a decision and gets a tempfail, never an accept.
    """

    ALL = frozenset(STAGE_HOOK.values()) | MESSAGE_HOOKS

    def __init__(self, client: MultiplexorClient) -> None:
        self.client = client
        self.gen = -1
        self.hooks: frozenset[str] = self.ALL
        self.fetched = 0.0
        self.lock = threading.Lock()
        self.logged: tuple[int, int, int] | None = None

    def current(self) -> frozenset[str]:
        if time.monotonic() - self.fetched > HOOKS_MAX_AGE:
            self.refresh()
        return self.hooks

    def seen_gen(self, gen: Any) -> None:
        if isinstance(gen, int) and gen > self.gen:
            self.refresh()

    def refresh(self) -> None:
        with self.lock:
            try:
                reply = self.client.request({"v": protocol.VERSION, "op": "hello"})
            except MultiplexorError as exc:
                if self.gen != -1 or self.fetched == 0.0:
                    log.error("multiplexor unreachable (%s): every message gets a tempfail", exc)
                self.gen, self.hooks = -1, self.ALL
                self.fetched = time.monotonic()
                return
            gen, hooks = reply.get("gen", 0), frozenset(reply.get("hooks") or ())
            if gen != self.gen:
                log.info("filter generation %s: hooks %s", gen, ", ".join(sorted(hooks)) or "none")
            self.gen, self.hooks, self.fetched = gen, hooks, time.monotonic()


class FrontEnd:
    """Shared by all sessions: config, the multiplexor client, counters."""

    def __init__(self, cfg: Config, client: MultiplexorClient) -> None:
        self.cfg = cfg
        self.client = client
        self.hooks = HookCache(client)
        self.spool = Path(cfg.spool_dir)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self.pid = os.getpid()
        # Over TCP the DATA stage is answered (see Session.data), never skipped.
        self.inet = cfg.milter_socket.startswith(("inet:", "inet6:"))
        self.in_progress = 0  # transactions between MAIL FROM and end of message/abort/close
        self._txn_lock = threading.Lock()  # also guards the spool free list
        # (path, fd, length of the earlier message still in it), for the next message
        self._spool_free: list[tuple[str, int, int]] = []
        self._spool_kept = 0  # the sum of those lengths
        self._spool_seq = 0

    def next_id(self) -> str:
        with self._seq_lock:
            self._seq += 1
            return f"{self.pid:x}.{self._seq}"

    def transaction(self, started: bool) -> None:
        with self._txn_lock:
            self.in_progress += 1 if started else -1
            idle = self.in_progress <= 0 and self._spool_free
        if idle:
            self._remove_free_spool()

    # ------------------------------------------------------------ spool files
    def take_spool(self) -> tuple[str, int, int]:
        """A spool file for a message: ``(path, fd open for writing, length)``, where the
        first ``length`` bytes are an earlier message's, to be written over.

        Spool files are reused while mail flows instead of being created and removed
        for every message: creating a file is the kernel's costliest step here.  On
        ext4 without a journal (the VM the benchmarks run on) each new inode is looked
        for past every inode freed in the last minute or more (``recently_deleted``),
        which took half the front end's CPU behind Postfix, growing with the mail rate.
        A file is reused only if no worker can still be reading it (``give_spool``);
        when no transaction is in progress the free ones are removed, so an idle spool
        is empty.  Raises OSError.
        """
        with self._txn_lock:
            if self._spool_free:
                path, fd, length = self._spool_free.pop()
                self._spool_kept -= length
                return path, fd, length
            self._spool_seq += 1
            n = self._spool_seq
        path = f"{self.spool}/{self.pid:x}.{n}.eml"
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 0

    def spool_wanted(self, mine: bool) -> bool:
        """Is a spool file worth keeping: is a transaction besides the caller's under
        way?  (One message at a time creates and removes its file.)"""
        return self.in_progress - mine > 0 and len(self._spool_free) < SPOOL_FREE_MAX

    def give_spool(self, path: str, fd: int, length: int) -> None:
        """Take back a spool file of ``length`` bytes that no worker holds, for the next
        message.

        Its bytes stay, for the next message to write over: writing over pages already
        in the page cache costs a fourth of allocating them, filling them and freeing
        them again at the end of the message (7 MB: 0.6-1.0 against 2.9-4.1 ms of CPU,
        on ext4 and on tmpfs; the front end's CPU per 7 MB message went from 8.8-10.3
        to 5.2-6.2 ms).  Only past SPOOL_KEEP_BYTES in all is a file cut short (rarely:
        under the lock, so nobody takes it half cut).
        """
        with self._txn_lock:
            # kept only while a transaction is in progress: the last one to end removes it
            if self.in_progress > 0 and len(self._spool_free) < SPOOL_FREE_MAX:
                keep = min(length, SPOOL_KEEP_BYTES - self._spool_kept)
                if keep == length or _cut(fd, keep):
                    self._spool_free.append((path, fd, keep))
                    self._spool_kept += keep
                    return
        _remove_spool(path, fd)

    def _remove_free_spool(self) -> None:
        with self._txn_lock:
            if self.in_progress > 0:
                return
            free, self._spool_free = self._spool_free, []
            self._spool_kept = 0
        for path, fd, _ in free:
            _remove_spool(path, fd)

    def drain(self, timeout: float) -> int:
        """After libmilter stopped listening: wait for the messages still in progress.

        libmilter's ``smfi_main`` returns at most 5 s after SIGTERM (its listener polls
        for the stop flag every 5 s) without waiting for its connection threads, and the
        process would then exit under them: a message whose decision took longer got
        "451 4.7.1" from Postfix instead of its verdict.  The connection threads keep
        working after ``main()`` returns (each has its own thread state; only new
        connections would need pymilter's interpreter pointer, and there are none: the
        listening socket is closed), so we just wait, at most ``timeout`` seconds.
        Returns how many were still in progress when we gave up.
        """
        if self.in_progress:
            log.info("milter: %d message(s) in progress: waiting for them (at most %.0fs)",
                     self.in_progress, timeout)  # fmt: skip
        deadline = time.monotonic() + timeout
        while self.in_progress > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        left = max(self.in_progress, 0)
        if left:
            log.warning("milter: %d message(s) still in progress after %.0fs: stopping anyway "
                        "(the MTA answers them with its milter_default_action)", left, timeout)  # fmt: skip
        return left

    def clean_spool(self) -> None:
        """Remove what a previous run left behind (a crash, a kill -9)."""
        self.spool.mkdir(parents=True, exist_ok=True)
        stale = 0
        for entry in self.spool.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # left by an older layout
            else:
                entry.unlink(missing_ok=True)
            stale += 1
        if stale:
            log.info("removed %d stale spool entries from %s", stale, self.spool)

    def decide(self, request: dict[str, Any], what: str) -> dict[str, Any]:
        """One decision from the multiplexor, or the internal-error reply and a log line."""
        try:
            reply = self.client.request(request)
        except MultiplexorError as exc:
            log.error("%s: no decision from the multiplexor (%s): answering %s %s", what, exc,
                      self.cfg.on_internal_error.code, self.cfg.on_internal_error.dsn)  # fmt: skip
            spec = self.cfg.on_internal_error
            return protocol.error_reply(spec.code, spec.dsn, spec.text, "multiplexor")
        self.hooks.seen_gen(reply.get("gen"))
        return reply


class Session:
    """One SMTP connection as the MTA reports it to us."""

    __slots__ = (
        "fe", "ctx", "id", "hooks", "protocol", "leadspc", "ip", "port", "hostname", "helo",
        "macros", "notes", "sender", "sender_args", "recipients", "spool_path",
        "spool_fd", "spool_at", "spool_old", "buf", "buffered", "reusable", "new_body", "size",
        "header_bytes", "header_count", "in_body", "overflow", "in_txn", "hdr_rc", "body_rc",
    )  # fmt: skip

    def __init__(self, fe: FrontEnd, ctx: Any) -> None:
        self.fe = fe
        self.ctx = ctx
        self.id = fe.next_id()
        self.hooks: frozenset[str] = fe.hooks.current()
        self.protocol = 0
        self.leadspc = False
        self.ip = self.hostname = self.helo = ""
        self.port = 0
        self.macros: dict[str, str] = {}
        self.notes: dict[str, Any] = {}
        self.spool_fd = -1  # the spool file, once created
        self.spool_path: str | None = None
        self.spool_at = 0  # this message's bytes written to it so far
        self.spool_old = 0  # bytes of an earlier message in it (see FrontEnd.give_spool)
        self.buf: list[bytes] = []  # spool bytes not yet written ...
        self.buffered = 0  # ... and their length
        self.reusable = True  # no worker can still be reading the spool file
        self.new_body = False  # a worker may have written <spool_path>.new
        self.in_txn = False
        # What header() and body() return: set by negotiate (an MTA that skips
        # negotiation gets a reply to everything).
        self.hdr_rc = self.body_rc = milter.CONTINUE
        self._reset_message()

    # ------------------------------------------------------------ negotiation
    def negotiate(self, opts: list[int]) -> int:
        offered_actions, offered_proto = opts[0], opts[1]
        hooks = self.hooks
        want = milter.P_NOUNKNOWN | milter.P_NOEOH | milter.P_HDR_LEADSPC
        if not (self.fe.inet and hooks & MESSAGE_HOOKS):
            want |= milter.P_NODATA
        for stage, bit in (("connect", milter.P_NR_CONN), ("helo", milter.P_NR_HELO),
                           ("mail", milter.P_NR_MAIL)):  # fmt: skip
            if STAGE_HOOK[stage] not in hooks:
                want |= bit
        # RCPT always needs a reply: max_recipients is enforced there.
        if hooks & MESSAGE_HOOKS:
            want |= milter.P_NR_HDR | milter.P_NR_BODY
        else:
            want |= milter.P_NOHDRS | milter.P_NOBODY
        self.protocol = offered_proto & want
        self.leadspc = bool(self.protocol & milter.P_HDR_LEADSPC)
        self.hdr_rc = self._reply_or_none(milter.P_NR_HDR, milter.CONTINUE)
        self.body_rc = self._reply_or_none(milter.P_NR_BODY, milter.CONTINUE)
        opts[0] = offered_actions & WANTED_ACTIONS
        opts[1] = self.protocol
        opts[2] = opts[3] = 0
        key = (self.fe.hooks.gen, opts[0], opts[1])
        if self.fe.hooks.logged != key:
            self.fe.hooks.logged = key
            log.info("negotiated with the MTA: actions 0x%x, protocol 0x%x (%s)", opts[0],
                     opts[1], describe_protocol(self.protocol))  # fmt: skip
        return milter.CONTINUE

    def _reply_or_none(self, nr_bit: int, rc: int) -> int:
        if self.protocol & nr_bit:
            return milter.NOREPLY
        return rc

    # ------------------------------------------------------------ envelope
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.hostname = hostname or ""
        if isinstance(hostaddr, tuple):
            self.ip, self.port = str(hostaddr[0]), int(hostaddr[1])
        elif hostaddr:
            self.ip = str(hostaddr)
        if "filter_relay" in self.hooks:
            return self._decide_envelope("connect", {})
        return self._reply_or_none(milter.P_NR_CONN, milter.CONTINUE)

    def hello(self, helo: Any) -> int:
        self.helo = _text(helo)
        if "filter_helo" in self.hooks:
            return self._decide_envelope("helo", {})
        return self._reply_or_none(milter.P_NR_HELO, milter.CONTINUE)

    def envfrom(self, sender: bytes, *args: bytes) -> int:
        self._discard_spool()
        self._reset_message()
        self._txn(True)
        self.sender = _strip_brackets(_text(sender))
        self.sender_args = [_text(a) for a in args]
        if "filter_sender" in self.hooks:
            return self._decide_envelope("mail", {"sender": self.sender, "args": self.sender_args})
        return self._reply_or_none(milter.P_NR_MAIL, milter.CONTINUE)

    def envrcpt(self, rcpt: bytes, *args: bytes) -> int:
        recipient = _strip_brackets(_text(rcpt))
        if len(self.recipients) >= self.fe.cfg.max_recipients:
            log.warning("conn %s: recipient %s over max_recipients %d", self.id, recipient,
                        self.fe.cfg.max_recipients)  # fmt: skip
            return self._answer_spec(self.fe.cfg.on_too_many_recipients)
        rc = milter.CONTINUE
        if "filter_recipient" in self.hooks:
            rc = self._decide_envelope(
                "rcpt",
                {"sender": self.sender, "sender_args": self.sender_args, "recipient": recipient,
                 "args": [_text(a) for a in args]},
            )
        if rc in (milter.CONTINUE, milter.ACCEPT):
            self.recipients.append(recipient)
        return rc

    def _decide_envelope(self, op: str, fields: dict[str, Any]) -> int:
        request = {"v": protocol.VERSION, "op": op, "conn": self._conn(), **fields}
        reply = self.fe.decide(request, f"conn {self.id} {op}")
        self._take_notes(reply)
        return self._answer(reply.get("verdict") or {})

    def data(self) -> int:
        """DATA, asked for only on TCP milter sockets, where it saves ~40 ms per message.

        At DATA Postfix sends that stage's macros and flushes, then writes the whole
        message once the client has sent it.  Without a reply to wait for, that second
        write waits (Nagle, on Postfix's socket) for our kernel's delayed ACK of the
        first: ~40 ms.  Answering DATA makes the ACK ride on our reply at once.
        """
        return milter.CONTINUE

    # ------------------------------------------------------------ content
    def header(self, name: str, value: bytes) -> int:
        if self.overflow is None:
            if b"\n" in value:
                value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            line = name.encode("ascii", "surrogateescape") + (
                b":" if self.leadspc else b": ") + value + b"\r\n"  # fmt: skip
            self.header_count += 1
            self.header_bytes += len(line)
            self.size += len(line)
            cfg = self.fe.cfg
            if self.header_count > cfg.max_headers or self.header_bytes > cfg.max_header_bytes:
                self._overflow(cfg.on_header_too_large, "header limit")
            else:
                self._write(line)
        return self.hdr_rc

    def body(self, chunk: bytes) -> int:
        if self.overflow is None:
            if not self.in_body:
                self.in_body = True
                self._write(b"\r\n")
                self.size += 2
            self.size += len(chunk)
            if self.size > self.fe.cfg.max_message_size:
                self._overflow(self.fe.cfg.on_message_too_large, "max_message_size")
            elif self.overflow is None:
                self._write(chunk)
        return self.body_rc

    def eom(self) -> int:
        try:
            return self._eom()
        finally:
            self._discard_spool()
            self._txn(False)

    def _eom(self) -> int:
        if self.overflow is None and not (self.hooks & MESSAGE_HOOKS):
            return milter.CONTINUE  # nothing to decide: no macros to read either
        self._collect_macros()
        queue_id = self.macros.get("i", "")
        if self.overflow is not None:
            spec = self.overflow
            log.warning("%s: conn %s: message over a limit: %s %s", queue_id or "-", self.id,
                        spec.code, spec.dsn)  # fmt: skip
            return self._answer_spec(spec)
        if not self.in_body:
            self._write(b"\r\n")
            self.size += 2
        self._flush()
        if self.overflow is None and self.spool_old > self.spool_at:  # an earlier message's tail
            if _cut(self.spool_fd, self.spool_at):
                self.spool_old = self.spool_at
            else:
                self._overflow(self.fe.cfg.on_internal_error, "spool truncate")
        if self.overflow is not None:  # the spool could not be written
            return self._answer_spec(self.overflow)
        path = self.spool_path
        request = {
            "v": protocol.VERSION, "op": "eom", "conn": self._conn(collect=False),
            "sender": self.sender, "sender_args": self.sender_args,
            "recipients": self.recipients, "queue_id": queue_id, "spool": path, "size": self.size,
        }  # fmt: skip
        self.reusable, self.new_body = False, True  # until a worker's reply says otherwise
        reply = self.fe.decide(request, f"{queue_id or '-'}: conn {self.id} eom")
        self._take_notes(reply)
        verdict = reply.get("verdict") or {}
        action = verdict.get("action", "continue")
        actions = reply.get("actions") or []
        # A worker's own reply comes once it is done with the spool file, and it writes
        # <spool>.new only for a replace_body action.  Any error (its own, or no reply
        # from it: it may still be at work) and the file may be in use, .new half written.
        self.reusable = not reply.get("error")
        self.new_body = (
            bool(reply.get("error"))
            or not isinstance(actions, list)
            or any(isinstance(a, list) and a[:1] == ["replace_body"] for a in actions)
        )
        applied = 0
        if action in ("continue", "accept"):
            try:
                applied = self._apply(actions)
            except Exception as exc:  # an MTA that refused an action, a bad action
                spec = self.fe.cfg.on_internal_error
                log.error("%s: conn %s: could not apply the filter's actions (%s): answering %s "
                          "%s", queue_id or "-", self.id, exc, spec.code, spec.dsn)  # fmt: skip
                return self._answer_spec(spec)
        log.info("%s: conn %s from=<%s> rcpts=%d size=%d verdict=%s%s actions=%d", queue_id or "-",
                 self.id, self.sender, len(self.recipients), self.size, action,
                 _reply_suffix(verdict), applied)  # fmt: skip
        return self._answer(verdict)

    def _apply(self, actions: list[list[Any]]) -> int:
        ctx = self.ctx
        for action in actions:
            name, args = action[0], action[1:]
            if protocol.ACTIONS.get(name) != len(args):
                raise ValueError(f"malformed action {action!r}")
            if name == "add_header":
                ctx.addheader(args[0], self._value(args[1]), -1)
            elif name == "insert_header":
                ctx.addheader(args[1], self._value(args[2]), int(args[0]))
            elif name == "change_header":
                ctx.chgheader(args[0], int(args[2]), self._value(args[1]))
            elif name == "delete_header":
                ctx.chgheader(args[0], int(args[1]), None)
            elif name == "add_recipient":
                ctx.addrcpt(f"<{args[0]}>", args[1])
            elif name == "delete_recipient":
                ctx.delrcpt(f"<{args[0]}>")
            elif name == "change_sender":
                ctx.chgfrom(f"<{args[0]}>", args[1])
            elif name == "hold":
                ctx.quarantine(args[0] or "held by defang")
            elif name == "replace_body":
                with open(args[0], "rb") as f:
                    while chunk := f.read(65536):
                        ctx.replacebody(chunk)
        return len(actions)

    def _value(self, value: str) -> str:
        """A header value as libmilter wants it: LF line breaks, and with leading-space
        preservation negotiated, the space after the colon is ours to send."""
        value = value.replace("\r\n", "\n")
        if self.leadspc and not value.startswith((" ", "\t")):
            value = " " + value
        return value

    # ------------------------------------------------------------ end
    def abort(self) -> int:
        self._discard_spool()
        self._reset_message()
        self._txn(False)
        return milter.CONTINUE

    def close(self) -> int:
        self._discard_spool()
        self._txn(False)
        self.ctx = None
        return milter.CONTINUE

    def _txn(self, started: bool) -> None:
        """Count this connection's transaction in the front end's in_progress (for drain)."""
        if started != self.in_txn:
            self.in_txn = started
            self.fe.transaction(started)

    # ------------------------------------------------------------ helpers
    def _reset_message(self) -> None:
        self.sender = ""
        self.sender_args: list[str] = []
        self.recipients: list[str] = []
        self.size = self.header_bytes = self.header_count = 0
        self.in_body = False
        self.overflow: ReplySpec | None = None

    def _open_spool(self) -> None:
        """One flat file per message in flight, ``<spool>/<pid>.<n>.eml`` (FrontEnd.take_spool).

        Flat, not a directory per message: on a disk-backed spool every mkdir, rmdir and
        unlink costs kernel time, and a directory per message tripled them (measured:
        the front end's largest cost per 2 KB message).  A worker that rebuilds the body
        writes it beside the file, as ``<same name>.new``.
        """
        try:
            self.spool_path, self.spool_fd, self.spool_old = self.fe.take_spool()
            self.spool_at = 0
        except OSError as exc:
            self._overflow(self.fe.cfg.on_internal_error, f"spool ({exc})")

    def _write(self, data: bytes) -> None:
        """Append to the spool: to the buffer while it fits, else out to the file."""
        if self.buffered + len(data) <= SPOOL_BUFFER:
            self.buf.append(data)
            self.buffered += len(data)
        else:
            self._flush(data)

    def _flush(self, data: bytes = b"") -> None:
        """Write the buffer, then ``data``, to the spool file (taken at the first flush)."""
        if self.overflow is not None:
            return
        if self.spool_fd < 0:
            self._open_spool()
            if self.overflow is not None:
                return
        try:
            if self.buf:
                self.spool_at = _write_all(self.spool_fd, b"".join(self.buf), self.spool_at)
                self.buf.clear()
                self.buffered = 0
            if data:
                self.spool_at = _write_all(self.spool_fd, data, self.spool_at)
        except OSError as exc:  # disk full, spool removed under us: never accept blind
            self.reusable = False  # how much of it was written is not known: not reused
            self._overflow(self.fe.cfg.on_internal_error, f"spool write ({exc})")

    def _discard_spool(self) -> None:
        """Done with the message's spool file: given back for the next message, or
        removed if a worker may still hold it."""
        self.buf.clear()
        self.buffered = 0
        path, fd = self.spool_path, self.spool_fd
        if path is not None:
            length = max(self.spool_at, self.spool_old)
            self.spool_path, self.spool_fd, self.spool_at, self.spool_old = None, -1, 0, 0
            if self.new_body:
                _unlink(path + ".new", self.id)
            if self.reusable and self.fe.spool_wanted(self.in_txn):
                self.fe.give_spool(path, fd, length)
            else:
                _remove_spool(path, fd, self.id)
        self.reusable, self.new_body = True, False

    def _overflow(self, spec: ReplySpec, what: str) -> None:
        """Stop spooling at once; the reply comes at end of message."""
        self.overflow = spec
        self._discard_spool()
        log.info("conn %s: message passed its %s; it will get %s %s", self.id, what, spec.code,
                 spec.dsn)  # fmt: skip

    def _collect_macros(self) -> None:
        getsymval = self.ctx.getsymval
        for name in self.fe.cfg.macros:
            value = getsymval(name)
            if value is not None:
                self.macros[name.strip("{}")] = value

    def _conn(self, collect: bool = True) -> dict[str, Any]:
        if collect:
            self._collect_macros()
        return {"id": self.id, "ip": self.ip, "hostname": self.hostname, "port": self.port,
                "helo": self.helo, "macros": self.macros, "notes": self.notes}  # fmt: skip

    def _take_notes(self, reply: dict[str, Any]) -> None:
        notes = reply.get("notes")
        if isinstance(notes, dict):
            self.notes = notes

    def _answer(self, verdict: dict[str, Any]) -> int:
        action = verdict.get("action", "continue")
        if action == "continue":
            return milter.CONTINUE
        if action == "accept":
            return milter.ACCEPT
        if action == "discard":
            return milter.DISCARD
        code = verdict.get("code") or ("550" if action == "reject" else "451")
        dsn = verdict.get("dsn") or ("5.7.1" if action == "reject" else "4.7.1")
        self._setreply(code, dsn, verdict.get("text") or "")
        if code.startswith("4"):
            return milter.TEMPFAIL
        return milter.REJECT

    def _answer_spec(self, spec: ReplySpec) -> int:
        return self._answer({"action": "reject", "code": spec.code, "dsn": spec.dsn,
                             "text": spec.text})  # fmt: skip

    def _setreply(self, code: str, dsn: str, text: str) -> None:
        # libmilter treats '%' as a format character: it must be doubled.
        lines = [line.replace("%", "%%") for line in text.split("\n")][:32] or [""]
        try:
            self.ctx.setreply(code, dsn, *lines)
        except Exception as exc:  # the reply code still goes out, with the MTA's text
            log.error("conn %s: MTA refused reply text %r: %s", self.id, text[:200], exc)


def _cut(fd: int, length: int) -> bool:
    """Truncate the file to ``length`` bytes; False if that failed."""
    try:
        os.ftruncate(fd, length)
    except OSError:
        return False
    return True


def _remove_spool(path: str, fd: int, conn_id: str = "-") -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    _unlink(path, conn_id)


def _unlink(path: str, conn_id: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("conn %s: cannot remove spool file %s: %s", conn_id, path, exc)


def _write_all(fd: int, data: bytes, offset: int) -> int:
    """Write ``data`` at ``offset``; returns the offset past it."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
    return offset


def describe_protocol(p: int) -> str:
    names = []
    for label, bit in (("no-connect-reply", milter.P_NR_CONN), ("no-helo-reply", milter.P_NR_HELO),
                       ("no-mail-reply", milter.P_NR_MAIL), ("no-header-reply", milter.P_NR_HDR),
                       ("no-body-reply", milter.P_NR_BODY), ("no-headers", milter.P_NOHDRS),
                       ("no-body", milter.P_NOBODY), ("no-eoh", milter.P_NOEOH),
                       ("no-data", milter.P_NODATA), ("leading-space", milter.P_HDR_LEADSPC)):
        if p & bit:
            names.append(label)
    return ", ".join(names) or "every stage with a reply"  # fmt: skip


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value or ""


def _strip_brackets(addr: str) -> str:
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        return addr[1:-1]
    return addr


def _reply_suffix(verdict: dict[str, Any]) -> str:
    if verdict.get("code"):
        return f" ({verdict['code']} {verdict.get('dsn') or ''} {verdict.get('text') or ''})"
    return ""


# ---------------------------------------------------------------- libmilter glue
def install_callbacks(fe: FrontEnd) -> None:
    """Route libmilter's callbacks to the Session attached to each context."""

    def negotiate(ctx, opts):
        session = Session(fe, ctx)
        ctx.setpriv(session)
        return session.negotiate(opts)

    def connect(ctx, hostname, family, hostaddr):
        session = ctx.getpriv()
        if session is None:  # an MTA without negotiation
            session = Session(fe, ctx)
            ctx.setpriv(session)
        return session.connect(hostname, family, hostaddr)

    def close(ctx):
        session = ctx.getpriv()
        if session is None:
            return milter.CONTINUE
        try:
            return session.close()
        finally:
            ctx.setpriv(None)

    milter.set_connect_callback(connect)
    milter.set_helo_callback(lambda ctx, helo: ctx.getpriv().hello(helo))
    milter.set_envfrom_callback(lambda ctx, *a: ctx.getpriv().envfrom(*a))
    milter.set_envrcpt_callback(lambda ctx, *a: ctx.getpriv().envrcpt(*a))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header(f, v))
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(close)
    milter.register("defang", negotiate=negotiate, data=lambda ctx: ctx.getpriv().data())
