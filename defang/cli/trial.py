"""``defang test MESSAGE``: what defang would do with one message, without an MTA.

The trial plays the MTA and drives the front end's own transaction model
(``defang.core.transaction``: which hook each stage asks, the accept and discard
short-cuts, ``max_recipients``, policy groups, the header and size limits), so it asks
the filter at each SMTP stage as the milter would and stops where the MTA would stop: it
never shows an answer production would not give.  A recipient refused at RCPT TO (or
answered 452 for another policy group) is not in ``msg.recipients``; with no recipient
left there is no DATA.

The message is spooled as the front end spools it.  ``Trial`` loads the filter once and
runs any number of messages (``defang replay`` runs one per worker process).

A trial changes nothing outside itself unless asked: the quarantine is not written (it
says what would be stored), and the filter's notices are listed, not sent, unless
``send_mail`` (``--send-mail``).  The hooks see ``conn.trial`` and ``msg.trial`` True, so
that a filter which sends mail by itself can hold back too.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import ipaddress
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defang.core import hooks, wire
from defang.core.config import Config
from defang.core.transaction import Conversation
from defang.core.verdicts import CONTINUE, Verdict
from defang.workers.loader import FilterLoadError, load_filter
from defang.workers.runner import FilterRunner
from defang.workers.stores.submit import SubmitError, submit

#: exit codes of ``defang test``, by how the message ended
EXIT = {"continue": 0, "accept": 0, "reject": 1, "tempfail": 2, "discard": 3}
EXIT_ERROR = 4


@dataclass
class Envelope:
    """What the trial's MTA says about the message: the client, the envelope, macros."""

    sender: str = "sender@example.org"
    recipients: list[str] = field(default_factory=lambda: ["postmaster@example.org"])
    ip: str = "192.0.2.1"
    hostname: str = ""
    helo: str = "client.example.org"
    macros: dict[str, str] = field(default_factory=dict)
    mail_args: list[str] = field(default_factory=list)
    rcpt_args: list[str] = field(default_factory=list)
    queue_id: str = "TEST"

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.ip)  # ValueError: "... does not appear to be an IPv4 or IPv6 address"
        self.hostname = self.hostname or f"[{self.ip}]"


@dataclass
class Result:
    """One message's trial: each stage asked, where it ended, what the MTA would do."""

    filter: str
    hooks: list[str]
    file: str = ""
    stages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (stage, verdict)
    outcome: dict[str, Any] = field(default_factory=lambda: wire.verdict_to_wire(CONTINUE))
    ended: str = "end of message"  # the stage that decided
    why: str = ""  # what the MTA does at that stage
    recipients: list[str] = field(default_factory=list)  # those the message went to
    actions: list[list[Any]] = field(default_factory=list)
    would: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    quarantine: list[str] = field(default_factory=list)  # the reasons, had the filter run for real
    notices: list[str] = field(default_factory=list)  # what would be sent after the reply
    sent: list[str] = field(default_factory=list)  # with send_mail: per notice, "via ..." or why not
    error: str | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_ERROR if self.error else EXIT[self.outcome["action"]]


class Trial:
    """The filter loaded once; ``run`` a message through it as an MTA and the front end would."""

    def __init__(self, cfg: Config, spool_dir: str | None = None, *, send_mail: bool = False) -> None:
        self.cfg = cfg
        self.send_mail = send_mail
        loaded = load_filter(str(cfg.filter))  # FilterLoadError: the caller says it in one line
        self.warnings = loaded.warnings
        self.runner = FilterRunner.from_config(loaded, cfg)
        self.runner.trial = True
        self.runner.prepare()  # FilterLoadError: a signing key that cannot sign, in one line
        self.quarantined = self.runner.quarantine_store = DryRunQuarantine()
        try:
            self.runner.initialize()
        except Exception as exc:
            raise FilterLoadError(f"{cfg.filter}: filter_initialize raised {type(exc).__name__}: {exc}"
                                  ) from None  # fmt: skip
        # A replay's processes share its directory (and it removes it: a pool's process
        # ends without running finalizers); ``defang test`` has its own.
        self._dir = None if spool_dir else tempfile.TemporaryDirectory(prefix="defang-trial-")
        base = Path(spool_dir) if spool_dir else Path(self._dir.name)
        self._spool = base / f"{os.getpid()}.{id(self):x}.eml"

    def close(self) -> None:
        self.runner.cleanup()
        if self._dir is not None:
            self._dir.cleanup()

    def run(self, raw: bytes, env: Envelope, name: str = "", body_out: str | None = None) -> Result:
        """The trial of one message; never raises (but for KeyboardInterrupt).

        A rewritten body is described in the ``replace_body`` action by its size and
        SHA-256 (two trials of one message compare equal) and saved to ``body_out``.
        """
        start = time.monotonic()
        result = Result(str(self.cfg.filter), sorted(self.runner.hooks), name)
        self.quarantined.reasons = []
        timeout = self.cfg.busy_timeout
        previous = signal.signal(signal.SIGALRM, _timed_out) if timeout else None
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            self._run(raw, env, result, body_out)
        except TrialTimeout:
            v = self.cfg.on_internal_error
            result.outcome, result.ended = wire.verdict_to_wire(v.verdict), "busy_timeout"
            result.error = (f"the filter ran past [multiplexor] busy_timeout ({timeout:g}s): in production "
                            f"the worker is killed and the MTA gets {v.code} {v.dsn}")  # fmt: skip
        except OSError as exc:  # the spool file
            result.error = f"{self._spool}: {exc.strerror or exc}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if previous is not None:
                signal.signal(signal.SIGALRM, previous)
            result.seconds = time.monotonic() - start
        result.quarantine = self.quarantined.reasons
        return result

    def _run(self, raw: bytes, env: Envelope, r: Result, body_out: str | None) -> None:
        notes: dict[str, Any] = {}
        smtp = Conversation(self.runner.hooks, self.cfg)

        def conn() -> wire.ConnInfo:
            return wire.ConnInfo("test", env.ip, env.hostname, 0, env.helo, env.macros, notes)

        requests = {"connect": lambda rcpt: wire.Connect(conn()), "helo": lambda rcpt: wire.Helo(conn()),
                    "mail": lambda rcpt: wire.Mail(conn(), env.sender, env.mail_args),
                    "rcpt": lambda rcpt: wire.Rcpt(conn(), rcpt, env.sender, env.mail_args, env.rcpt_args)}

        def ask(label: str, request: wire.DecisionRequest) -> wire.Reply:
            nonlocal notes
            reply = self.runner.handle(request)
            notes = reply.notes if reply.notes is not None else notes
            r.stages.append((label, wire.verdict_to_wire(reply.verdict)))
            r.would += reply.would
            r.tags += reply.tags
            if reply.error and (reply.error.startswith("filter error") or request.OP == "eom"):
                r.error = r.error or reply.error
            return reply

        def end(stage: str, verdict: Verdict, why: str) -> None:
            r.outcome, r.ended, r.why = wire.verdict_to_wire(verdict), stage, why

        deferred: Verdict | None = None  # a recipient answered 4xx: the sender retries it
        for stage in hooks.STAGES[:-1]:
            for rcpt in env.recipients if stage == "rcpt" else [""]:
                label = f"rcpt {rcpt}" if rcpt else stage
                step = smtp.begin(stage, rcpt, env.rcpt_args)
                if step.ask is not None:
                    reply = ask(label, requests[stage](rcpt))
                    step = smtp.replied(reply.verdict, reply.policy)
                    if step.why:  # the front end answers otherwise than the filter
                        r.stages.append((label, wire.verdict_to_wire(step.answer)))
                elif step.why:
                    r.stages.append((label, wire.verdict_to_wire(step.answer)))
                if stage == "rcpt" and step.answer.action == "tempfail" and deferred is None:
                    deferred = step.answer
                if step.ends in ("connection", "transaction") and step.answer.action != "continue":
                    r.recipients = list(smtp.recipients)
                    if stage == "rcpt":
                        r.recipients += env.recipients[env.recipients.index(rcpt) + 1:]
                    return end(label, step.answer, _why(stage, step.answer))
        r.recipients = list(smtp.recipients)
        step = smtp.data()
        if step.why and deferred is not None:  # what the sender meets: try again later
            return end("rcpt", deferred, "no recipient was accepted, one deferred (4xx): the sending MTA "
                                         "keeps the message and retries")  # fmt: skip
        if step.why:
            return end("rcpt", step.answer, "no recipient was accepted: the MTA refuses DATA")
        size = spool_message(raw, self._spool)
        step = smtp.message(smtp.over_limit(size, *_header_size(self._spool, self.cfg.max_header_bytes)))
        if step.why:
            return end("end of message", step.answer, "the message passed a front-end limit")
        if step.ask is not None:
            request = wire.EndOfMessage(conn(), str(self._spool), env.sender, r.recipients, env.queue_id,
                                        size, env.mail_args, smtp.policy, smtp.recipient_args)  # fmt: skip
            reply = ask("end of message", request)
            end("end of message", reply.verdict, _at_eom(reply.verdict, len(r.recipients)))
            r.actions = [self._body(a, body_out) if a[0] == "replace_body" else a for a in reply.actions]
            copies = sum(1 for a in r.actions if a[0] == "split")
            if copies:
                r.why = f"split into {copies} copies, each filtered again; the original discarded once queued"
            r.notices = [str(n) for n in self.runner.outbox]  # shown; sent only with send_mail
            if self.send_mail:
                r.sent = [self._send(n) for n in self.runner.outbox]
            self.runner.outbox = []
        if r.outcome["action"] in ("continue", "accept"):
            r.actions += [["add_header", wire.WOULD_HEADER, entry] for entry in r.would]

    def _send(self, notice: Any) -> str:
        """Send one notice as the worker would after its reply: ``via ...`` or why not."""
        try:
            return "via " + submit(self.runner.submission, "", list(notice.recipients), notice.data)
        except SubmitError as exc:
            return f"not sent: {exc}"

    @staticmethod
    def _body(action: list[Any], body_out: str | None) -> list[Any]:
        path = action[1]
        try:
            data = Path(path).read_bytes()
            if body_out:
                Path(body_out).write_bytes(data)
        finally:
            os.unlink(path)
        return ["replace_body", f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"]


def _header_size(path: Path, max_bytes: int) -> tuple[int, int]:
    """The header section's field count and size (with its CRLF), as the front end counts them."""
    with open(path, "rb") as f:
        head = f.read(max_bytes + 1).split(b"\r\n\r\n", 1)[0]
    fields = sum(1 for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t"))
    return fields, len(head) + 2


def _why(stage: str, v: Verdict) -> str:
    """What the MTA does when the answer at ``stage`` ends the conversation."""
    if stage in ("connect", "helo"):
        return f"the {'connection' if v.action != 'discard' else 'mail'} is {_done(v)} at {stage}"
    return f"the message is {_done(v)} at {'MAIL FROM' if stage == 'mail' else 'RCPT TO'}"


def _done(v: Verdict) -> str:
    return {"accept": "accepted without further filtering", "reject": "refused", "tempfail": "deferred",
            "discard": "thrown away"}[v.action]  # fmt: skip


def _at_eom(v: Verdict, recipients: int) -> str:
    if v.action in ("continue", "accept"):
        return f"the MTA delivers it to {recipients} recipient{'s' if recipients != 1 else ''}"
    return f"the message is {_done(v)} at end of message"


def spool_message(raw: bytes, dest: Path) -> int:
    """Write ``raw`` in spool form (CRLF line ends, header / blank line / body)."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, body = data, b""
    out = head.rstrip(b"\r\n") + b"\r\n\r\n" + body
    dest.write_bytes(out)
    return len(out)


def read_message(name: str) -> bytes:
    """The message file named on the command line (``-``: standard input); OSError says why not."""
    if name == "-":
        return sys.stdin.buffer.read()
    if os.path.isdir(name):
        raise IsADirectoryError(errno.EISDIR, "a directory: defang replay takes a directory")
    with open(name, "rb") as f:
        return f.read()


class TrialTimeout(BaseException):
    """The filter ran past busy_timeout (BaseException: the runner must not take it for a
    filter error, as in production the worker is killed, not answered)."""


def _timed_out(signum: int, frame: Any) -> None:
    raise TrialTimeout


class DryRunQuarantine:
    """The quarantine store of a trial: it notes what would be stored and stores nothing
    (``defang test`` and ``replay`` must not fill the production quarantine)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def write(self, msg: Any, pending: Any) -> str:
        self.reasons = list(pending.reasons)
        return "(not stored: a trial)"


def envelope_from_args(args: argparse.Namespace) -> Envelope:
    return Envelope(sender=args.sender, recipients=args.rcpt or ["postmaster@example.org"], ip=args.ip,
                    hostname=args.hostname, helo=args.helo, macros=dict(args.macro),
                    mail_args=args.mail_arg, rcpt_args=args.rcpt_arg, queue_id=args.queue_id)  # fmt: skip


def main(cfg: Config, args: argparse.Namespace) -> int:
    """``defang test``: exit 0 continue/accept, 1 reject, 2 tempfail, 3 discard, 4 error."""
    try:
        raw = read_message(args.message)
    except OSError as exc:
        print(f"{args.message}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        trial = Trial(cfg, send_mail=args.send_mail)
    except FilterLoadError as exc:
        print(exc, file=sys.stderr)
        return EXIT_ERROR
    try:
        for line in trial.warnings:
            print(line, file=sys.stderr)
        result = trial.run(raw, envelope_from_args(args), args.message, args.body_out)
    finally:
        trial.close()
    print(json.dumps(as_json(result), indent=2, ensure_ascii=False) if args.json else render(result))
    if result.error:
        print(f"{args.message}: {result.error.splitlines()[0]}", file=sys.stderr)
    return result.exit_code


def as_json(r: Result) -> dict[str, Any]:
    """The trial for scripts: each stage asked (``connect``, ``helo``, ``mail``, ``rcpt``
    by address, ``eom``), the outcome, and what it means."""
    out: dict[str, Any] = {"file": r.file, "filter": r.filter, "hooks": r.hooks}
    for stage, verdict in r.stages:
        if stage.startswith("rcpt "):
            out.setdefault("rcpt", {})[stage[5:]] = verdict
        elif stage == "end of message":
            out["eom"] = {"verdict": verdict, "actions": r.actions}
        else:
            out[stage] = verdict
    out.update(outcome=r.outcome, ended=r.ended, why=r.why, recipients=r.recipients, actions=r.actions,
               would=r.would, tags=r.tags, quarantine=r.quarantine, notices=r.notices, sent=r.sent,
               error=r.error, exit=r.exit_code, seconds=round(r.seconds, 6))  # fmt: skip
    return out


def verdict_text(v: dict[str, Any]) -> str:
    if v.get("code"):
        return f"{v['action']} {v['code']} {v.get('dsn') or ''} {v.get('text') or ''}".rstrip()
    return v["action"]


def render(r: Result) -> str:
    """The trial as an admin reads it: one line per SMTP stage asked, the actions, the outcome."""
    lines = [f"filter: {r.filter} (hooks: {', '.join(r.hooks) or 'none'})"]
    for stage, verdict in r.stages:
        lines.append(f"{stage:<15} {verdict_text(verdict)}")
    if not r.stages:
        lines.append("(no hook was asked: the filter defines none that applies)")
    refused = r.outcome["action"] not in ("continue", "accept")
    if r.actions and refused and not any(a[0] == "split" for a in r.actions):
        lines.append("  (the actions below are not applied: the message is refused)")
    for action in r.actions:
        lines.append(f"  {action[0]}: {', '.join(str(a) for a in action[1:])}")
    for reason in r.quarantine:
        lines.append(f"  quarantine: {reason}  (a trial stores nothing)")
    for i, notice in enumerate(r.notices):
        how = f"sent {r.sent[i]}" if i < len(r.sent) else "not sent: a trial; --send-mail sends it"
        lines.append(f"  {notice}  ({how})")
    for entry in r.would:
        lines.append(f"  monitor: would {entry}")
    if r.tags:
        lines.append(f"  tags: {', '.join(r.tags)}")
    lines.append(f"outcome: {verdict_text(r.outcome)}{' (' + r.why + ')' if r.why else ''}")
    if not refused and r.recipients:
        lines.append(f"recipients: {', '.join(r.recipients)}")
    if r.error:
        lines.append(f"error: {r.error}")
    return "\n".join(lines)
