"""One SMTP connection as the MTA reports it: libmilter callbacks in, decisions out.

Thin by rule: every Python callback holds the GIL, so across all SMTP connections only
one callback runs at a time.  Callbacks here only record envelope data, append header
and body bytes to the spool file, and at decision points make one blocking request to
the multiplexor (a blocking recv releases the GIL).  No MIME parsing, no admin code.

State lives on the ``Session`` attached to libmilter's context (one per SMTP
connection), never in thread-locals: libmilter runs one connection's callbacks on
several OS threads.  What belongs to one transaction (MAIL FROM to end of message) is
an ``Envelope`` (aiosmtpd's split): a new one at MAIL FROM, thrown away at end of
message, abort and close, all in ``_end_transaction``.

What the MTA is asked for follows the hooks filter.py defines (``defang.core.hooks``):
stages with no hook are negotiated "no reply" (the MTA does not wait), and without
message hooks the MTA does not send headers or body at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import milter

from defang.core import hooks, wire
from defang.core.config import ReplySpec
from defang.core.transaction import Conversation
from defang.core.verdicts import Verdict
from defang.frontend import msglog
from defang.frontend.service import FrontEnd
from defang.frontend.spool import SpoolError, SpoolFile

log = logging.getLogger("defang.milter")

# Actions defang may apply at end of message; asked for only if the MTA offers them.
WANTED_ACTIONS = (
    milter.ADDHDRS | milter.CHGHDRS | milter.ADDRCPT | milter.DELRCPT | milter.CHGFROM
    | milter.CHGBODY | milter.QUARANTINE
)  # fmt: skip
# The "no reply" bit of each stage whose hook may be missing (hooks.Hook.skippable).
NO_REPLY = {"connect": milter.P_NR_CONN, "helo": milter.P_NR_HELO, "mail": milter.P_NR_MAIL}
_RC = {"continue": milter.CONTINUE, "accept": milter.ACCEPT, "discard": milter.DISCARD}


class Envelope:
    """One transaction: MAIL FROM, size, limits, spool file (recipients: ``Session.smtp``)."""

    __slots__ = ("sender", "sender_args", "size", "header_bytes", "header_count", "in_body",
                 "overflow", "spool", "would", "over_rcpts")  # fmt: skip

    def __init__(self, spool: SpoolFile, sender: str = "", sender_args: list[str] | None = None) -> None:
        self.sender = sender
        self.sender_args = sender_args or []
        self.would: list[str] = []  # refusals monitor mode noted at MAIL FROM and RCPT TO
        self.size = self.header_bytes = self.header_count = 0
        self.in_body = False
        self.overflow: ReplySpec | None = None  # past a limit: the reply at end of message
        self.spool = spool
        self.over_rcpts = 0  # RCPT TO refused over max_recipients: logged once, at the end


class Session:
    """One SMTP connection."""

    __slots__ = ("fe", "ctx", "id", "hooks", "protocol", "leadspc", "ip", "port", "hostname", "helo",
                 "macros", "notes", "hdr_rc", "body_rc", "env", "in_txn", "would", "connected", "odd", "lost",
                 "refusal", "smtp")  # fmt: skip

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
        # What header() and body() return: set by negotiate (an MTA that skips
        # negotiation gets a reply to everything).
        self.hdr_rc = self.body_rc = milter.CONTINUE
        self.env = Envelope(SpoolFile(fe.spool))
        self.in_txn = False
        self.would: list[str] = []  # refusals monitor mode noted at connect and HELO
        self.connected = False  # connect seen (or found lost: see undecodable)
        self.odd: set[str] = set()  # macros already logged as not UTF-8
        self.lost: list[str] = []  # stages pymilter could not hand us, decided at RCPT TO
        self.refusal: Verdict | None = None  # such a stage's refusal: every RCPT TO gets it
        self.smtp = Conversation(self.hooks, fe.cfg)  # the stages' rules (defang.core.transaction)

    # ------------------------------------------------------------ negotiation
    def negotiate(self, opts: list[int]) -> int:
        offered_actions, offered_proto = opts[0], opts[1]
        names = self.hooks
        with_message = bool(names & hooks.MESSAGE_SET)
        want = milter.P_NOUNKNOWN | milter.P_NOEOH | milter.P_HDR_LEADSPC
        if not (self.fe.inet and with_message):
            want |= milter.P_NODATA
        for stage, bit in NO_REPLY.items():
            if hooks.ENVELOPE[stage].name not in names:
                want |= bit
        if with_message:
            want |= milter.P_NR_HDR | milter.P_NR_BODY
        else:
            want |= milter.P_NOHDRS | milter.P_NOBODY
        self._use_protocol(offered_proto & want)
        opts[0] = offered_actions & WANTED_ACTIONS
        opts[1] = self.protocol
        opts[2] = opts[3] = 0
        key = (self.fe.hooks.gen, opts[0], opts[1])
        if self.fe.hooks.logged != key:
            self.fe.hooks.logged = key
            log.info("negotiated with the MTA: actions 0x%x, protocol 0x%x (%s)", opts[0],
                     opts[1], describe_protocol(self.protocol))  # fmt: skip
        return milter.CONTINUE

    def _use_protocol(self, protocol: int) -> None:
        self.protocol = protocol
        self.leadspc = bool(protocol & milter.P_HDR_LEADSPC)
        self.hdr_rc = self._reply_or_none(milter.P_NR_HDR, milter.CONTINUE)
        self.body_rc = self._reply_or_none(milter.P_NR_BODY, milter.CONTINUE)

    def adopt(self) -> None:
        """No negotiation of its own (QUIT_NC, see callbacks.py): the MTA goes on with what it
        negotiated; the last negotiation logged is the best guess, else every stage answered."""
        logged = self.fe.hooks.logged
        if logged is not None and logged[0] == self.fe.hooks.gen:
            self._use_protocol(logged[2])

    def _reply_or_none(self, nr_bit: int, rc: int) -> int:
        if self.protocol & nr_bit:
            return milter.NOREPLY
        return rc

    # ------------------------------------------------------------ envelope
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.connected = True
        self.hostname = hostname or ""
        if isinstance(hostaddr, tuple):
            self.ip, self.port = str(hostaddr[0]), int(hostaddr[1])
        elif hostaddr:
            self.ip = str(hostaddr)
        return self._stage("connect", lambda: wire.Connect(self._conn()))

    def hello(self, helo: Any) -> int:
        self.helo = _text(helo)
        return self._stage("helo", lambda: wire.Helo(self._conn()))

    def envfrom(self, sender: bytes, *args: bytes) -> int:
        self._end_transaction(another=True)
        env = self.env
        env.sender = _strip_brackets(_text(sender))
        env.sender_args = [_text(a) for a in args]
        return self._stage("mail", lambda: wire.Mail(self._conn(), env.sender, env.sender_args))

    def envrcpt(self, rcpt: bytes, *args: bytes) -> int:
        if self.lost:
            self._catch_up()
        if self.refusal is not None:
            return self._answer(self.refusal)
        env, to, esmtp = self.env, _strip_brackets(_text(rcpt)), [_text(a) for a in args]
        request = lambda: wire.Rcpt(self._conn(), to, env.sender, env.sender_args, esmtp)  # noqa: E731
        return self._stage("rcpt", request, to, esmtp)

    def _stage(self, stage: str, request: Callable[[], wire.DecisionRequest], *rcpt: Any) -> int:
        """An envelope stage as the transaction model rules it (``defang.core.transaction``);
        ``rcpt``: at RCPT TO, the recipient and its ESMTP arguments."""
        step = self.smtp.begin(stage, *rcpt)
        asked = step.ask is not None
        if asked:
            reply = self._decide_envelope(request())
            step = self.smtp.replied(reply.verdict, reply.policy)
        if step.why == "max_recipients":
            self.env.over_rcpts += 1  # one log line for the transaction, at its end
        elif step.why:
            log.info("conn %s: <%s> is of another policy group than the transaction's: %s %s", self.id,
                     rcpt[0], step.answer.code, step.answer.dsn)  # fmt: skip
        if not asked and step.answer.action == "continue" and stage in NO_REPLY:
            return self._reply_or_none(NO_REPLY[stage], milter.CONTINUE)
        return self._answer(step.answer)

    def _decide_envelope(self, request: wire.DecisionRequest) -> wire.Reply:
        reply = self.fe.decide(request, f"conn {self.id} {request.OP}")
        self._take_notes(reply)
        if reply.would:  # stamped on the message(s) at end of message: the connection's, or this one's
            held = self.would if isinstance(request, wire.Connect | wire.Helo) else self.env.would
            held.extend(reply.would)
        return reply

    def data(self) -> int:
        """DATA, asked for only on TCP milter sockets: without a reply to wait for, Postfix's
        write of the message waits (Nagle) for our delayed ACK of its DATA macros, ~40 ms."""
        return milter.CONTINUE

    # ------------------------------------------------------------ content
    def header(self, name: str, value: bytes) -> int:
        env = self.env
        if env.overflow is None:
            if b"\n" in value:
                value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            line = name.encode("ascii", "surrogateescape") + (
                b":" if self.leadspc else b": ") + value + b"\r\n"  # fmt: skip
            env.header_count += 1
            env.header_bytes += len(line)
            env.size += len(line)
            over = self.smtp.over_limit(env.size, env.header_count, env.header_bytes)
            if over is not None:
                self._overflow(over, "header or size limit")
            else:
                try:  # no method of our own between: this runs for every header of every message
                    env.spool.write(line)
                except SpoolError as exc:
                    self._overflow(self.fe.cfg.on_internal_error, str(exc))
        return self.hdr_rc

    def body(self, chunk: bytes) -> int:
        env = self.env
        if env.overflow is None:
            if not env.in_body:
                env.in_body = True
                self._write(b"\r\n")
                env.size += 2
            env.size += len(chunk)
            over = self.smtp.over_limit(env.size, 0, 0)
            if over is not None:
                self._overflow(over, "max_message_size")
            elif env.overflow is None:
                try:
                    env.spool.write(chunk)
                except SpoolError as exc:
                    self._overflow(self.fe.cfg.on_internal_error, str(exc))
        return self.body_rc

    def eom(self) -> int:
        try:
            return self._eom()
        finally:
            self._end_transaction()

    def _eom(self) -> int:
        env, smtp = self.env, self.smtp
        if env.overflow is None and smtp.message().ask is None:
            if self.would or env.would:
                self._stamp_would([])
            return milter.CONTINUE  # nothing to decide: no macros to read either
        self._collect_macros()
        queue_id = self.macros.get("i", "")
        if env.overflow is None and not env.in_body:
            self._write(b"\r\n")
            env.size += 2
        if env.overflow is None:
            try:
                path = env.spool.finish()
            except SpoolError as exc:
                self._overflow(self.fe.cfg.on_internal_error, str(exc))
        if env.overflow is not None:
            spec = env.overflow
            log.warning("%s: conn %s: message over a limit: %s %s", queue_id or "-", self.id, spec.code,
                        spec.dsn)  # fmt: skip
            msglog.log_message(self, queue_id, spec.verdict, None, 0.0, error="over a limit")
            return self._answer(spec.verdict)
        request = wire.EndOfMessage(self._conn(collect=False), path, env.sender, smtp.recipients, queue_id,
                                    env.size, env.sender_args, smtp.policy, smtp.recipient_args)  # fmt: skip
        spool = env.spool
        spool.reusable, spool.new_body = False, True  # until a worker's reply says otherwise
        began = time.monotonic()
        reply = self.fe.decide(request, f"{queue_id or '-'}: conn {self.id} eom")
        took = time.monotonic() - began
        self._take_notes(reply)
        verdict, actions = reply.verdict, reply.actions
        # A worker's own reply comes once it is done with the spool file, and it writes
        # <spool>.new only for a replace_body action.  Any error (its own, or no reply
        # from it: it may still be at work) and the file may be in use, .new half written.
        spool.reusable = not reply.error
        spool.new_body = bool(reply.error) or any(a[0] == "replace_body" for a in actions)
        stamped = 0
        if verdict.action in ("continue", "accept"):
            try:
                self._apply(actions)
                stamped = self._stamp_would(reply.would)
            except Exception as exc:  # an MTA that refused an action
                spec = self.fe.cfg.on_internal_error
                log.error("%s: conn %s: could not apply the filter's actions (%s): answering %s %s",
                          queue_id or "-", self.id, exc, spec.code, spec.dsn)  # fmt: skip
                msglog.log_message(self, queue_id, spec.verdict, reply, took, error=f"actions refused: {exc}")
                return self._answer(spec.verdict)
        msglog.log_message(self, queue_id, verdict, reply, took, stamped)
        return self._answer(verdict)

    def _apply(self, actions: list[list[Any]]) -> int:
        ctx = self.ctx
        for action in actions:
            name, args = action[0], action[1:]
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

    def _stamp_would(self, more: list[str]) -> int:
        """An ``X-Defang-Would`` header for each refusal monitor mode noted, from connect to
        end of message; how many."""
        would = [*self.would, *self.env.would, *more]
        for entry in would:
            self.ctx.addheader(wire.WOULD_HEADER, self._value(entry), -1)
        return len(would)

    def _value(self, value: str) -> str:
        """A header value as libmilter wants it: LF line breaks, and with leading-space
        preservation negotiated, the space after the colon is ours to send."""
        value = value.replace("\r\n", "\n")
        if self.leadspc and not value.startswith((" ", "\t")):
            value = " " + value
        return value

    # ------------------------------------------------------------ end
    def abort(self) -> int:
        self._end_transaction()
        return milter.CONTINUE

    def close(self) -> int:
        self._end_transaction()
        self.ctx = None
        return milter.CONTINUE

    def _end_transaction(self, *, another: bool = False) -> None:
        """The one place a transaction ends (end of message, abort, close, the next MAIL
        FROM): its spool file goes, a new envelope takes its place.  With ``another``
        (MAIL FROM) the next transaction begins at once and the count never drops."""
        spool = self.env.spool
        if self.env.over_rcpts:
            log.warning("conn %s: %d recipient(s) of from=<%s> over max_recipients %d refused", self.id,
                        self.env.over_rcpts, self.env.sender, self.fe.cfg.max_recipients)  # fmt: skip
        spool.discard(self.id, self.in_txn)  # and ready for the next transaction
        self.smtp.end()
        self._txn(another)
        self.env = Envelope(spool)

    def _txn(self, started: bool) -> None:
        """Count this connection's transaction in the spool's count (for reuse and drain)."""
        if started != self.in_txn:
            self.in_txn = started
            self.fe.spool.transaction(started)

    # ------------------------------------------------------------ helpers
    def _write(self, data: bytes) -> None:
        try:
            self.env.spool.write(data)
        except SpoolError as exc:
            self._overflow(self.fe.cfg.on_internal_error, str(exc))

    def _overflow(self, spec: ReplySpec, what: str) -> None:
        """Stop spooling at once; the reply comes at end of message."""
        self.env.overflow = spec
        self.env.spool.discard(self.id, self.in_txn)
        log.info("conn %s: message passed its %s; it will get %s %s", self.id, what, spec.code, spec.dsn)

    def _collect_macros(self) -> None:
        getsymval = self.ctx.getsymval
        for name in self.fe.cfg.macros:
            try:
                value = getsymval(name)
            except UnicodeDecodeError as exc:  # pymilter wants UTF-8: take the bytes, escaped
                # (not surrogates: the queue ID {i} names log lines, process titles, files)
                value = bytes(exc.object).decode("utf-8", "backslashreplace")
                if name not in self.odd:
                    self.odd.add(name)
                    log.warning("conn %s: macro %s is not UTF-8 (%r): passed on as %r", self.id, name,
                                bytes(exc.object)[:200], value[:200])  # fmt: skip
            if value is not None:
                self.macros[name.strip("{}")] = value

    # ------------------------------------------------------------ oddities (callbacks.py)
    def failed(self, stage: str, exc: Exception) -> int:
        """A callback of ours raised: one log line, and an answer in step with the protocol (on
        a "no reply" stage the refusal waits: for end of message, or RCPT TO)."""
        spec = self.fe.cfg.on_internal_error
        log.error("conn %s: %s: %s: %s: answering %s %s", self.id, stage, type(exc).__name__, exc, spec.code,
                  spec.dsn)  # fmt: skip
        if stage in ("abort", "close"):
            return milter.CONTINUE
        if stage == "negotiate":
            return milter.ALL_OPTS
        if stage in ("connect", "helo") and self.protocol & NO_REPLY[stage]:
            self.refusal = spec.verdict
            return milter.NOREPLY
        if stage in ("header", "body") or stage == "mail" and self.protocol & milter.P_NR_MAIL:
            if self.env.overflow is None:
                self.env.overflow = spec
                self.env.spool.discard(self.id, self.in_txn)
            return {"header": self.hdr_rc, "body": self.body_rc}.get(stage, milter.NOREPLY)
        return self._answer(spec.verdict)

    def undecodable(self, raw: bytes) -> None:
        """Not UTF-8 where pymilter wants a ``str`` (callbacks.py): the client's host name before
        connect, a header name in a transaction, else the HELO name.  Kept; a lost connect or
        HELO decision is asked at RCPT TO."""
        text = raw.decode("utf-8", "surrogateescape")
        if not self.connected:
            self.connected = True
            self.hostname = text
            self._collect_macros()
            self.ip = self.macros.get("client_addr", "")
            what, lost = "client host name", "connect"
        elif self.in_txn:
            what, lost = "header name", ""
        else:
            self.helo = text
            what, lost = "HELO name", "helo"
        hook = hooks.ENVELOPE[lost].name if lost else ""
        if hook in self.hooks:
            self.lost.append(lost)
        then = (f"kept; {hook} asked at RCPT TO" if hook in self.hooks else "kept" if lost
                else "the filter sees the message without that header")  # fmt: skip
        log.warning("conn %s: the MTA sent a %s that is not UTF-8 (%r): %s", self.id, what, raw[:200], then)

    def _catch_up(self) -> None:
        """Ask the decisions of the stages `undecodable` found lost; a refusal is kept."""
        lost, self.lost = self.lost, []
        for stage in lost:
            request = wire.Connect(self._conn()) if stage == "connect" else wire.Helo(self._conn())
            reply = self.fe.decide(request, f"conn {self.id} {request.OP}")
            self._take_notes(reply)
            if reply.verdict.action not in ("continue", "accept"):
                self.refusal = reply.verdict
                return

    def _conn(self, collect: bool = True) -> wire.ConnInfo:
        if collect:
            self._collect_macros()
        return wire.ConnInfo(self.id, self.ip, self.hostname, self.port, self.helo, self.macros, self.notes)

    def _take_notes(self, reply: wire.Reply) -> None:
        if reply.notes is not None:
            self.notes = reply.notes

    def _answer(self, verdict: Verdict) -> int:
        rc = _RC.get(verdict.action)
        if rc is not None:
            return rc
        reject = verdict.action == "reject"
        code = verdict.code or ("550" if reject else "451")
        dsn = verdict.dsn or ("5.7.1" if reject else "4.7.1")
        self._setreply(code, dsn, verdict.text or "")
        return milter.TEMPFAIL if code.startswith("4") else milter.REJECT

    def _setreply(self, code: str, dsn: str, text: str) -> None:
        # libmilter treats '%' as a format character: it must be doubled.
        lines = [line.replace("%", "%%") for line in text.split("\n")][:32] or [""]
        try:
            self.ctx.setreply(code, dsn, *lines)
        except Exception as exc:  # the reply code still goes out, with the MTA's text
            log.error("conn %s: MTA refused reply text %r: %s", self.id, text[:200], exc)


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


