"""Run one decision request through the admin's hooks and build the reply.

All of the worker's error handling for admin code is here, in one mapping: an
exception in a hook, a hook returning something that is not a verdict, notes that
cannot be sent back, a reply that is not JSON -- each becomes the configured
``on_filter_error`` verdict with the actions dropped, the notes as they arrived,
an ``error`` text in the reply, and one ERROR log line with the hook, the queue ID
and the connection, followed by the traceback.  ``handle`` itself never raises
(``KeyboardInterrupt`` excepted), so the worker loop stays a loop.

A request the worker cannot make sense of (not a decision request of this protocol:
``handle_body``) is not the admin's fault: it gets a fixed tempfail and a
``bad request`` error instead.

A message past a ``[mime]`` limit (``MimeLimitError``, from the walk or an archive
helper) is not a filter error either: it gets ``[mime] on_limit`` and a WARNING line
with its queue ID.  After the hooks, the message's quarantine entry is written and,
if the filter changed parts, the body rebuilt (``defang.workers.mime.rebuild``); a failure there
is a local problem and gets a fixed tempfail, so no mail is lost.

Each request runs on a CPU budget (``[filter] max_cpu_seconds``, ``defang.workers.budget``):
checked before each hook, each part and the rebuild, with a timer behind it for a hook
that never comes back.  Past it, the request gets ``[filter] on_cpu_limit`` (the
filter's actions dropped, a quarantine entry already asked for still written) and a
WARNING line with the queue ID.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

from defang.core import hooks, wire
from defang.core.config import FilterSection, default_runtime_dir
from defang.core.verdicts import CONTINUE, Verdict, tempfail
from defang.workers.api import services, split
from defang.workers.api.conn import DEFAULT_MAX_NOTES_BYTES, Connection, NotesError, encode_notes
from defang.workers.api.decision import Decision, FilterError
from defang.workers.api.message import Message
from defang.workers.api.notify import Notice
from defang.workers.api.services import ServiceSettings
from defang.workers.budget import CpuBudget, OverBudget
from defang.workers.loader import FilterLoadError, LoadedFilter
from defang.workers.mime.limits import MimeLimitError, MimeLimits
from defang.workers.stores.quarantine import QuarantineError, QuarantineStore, quarantine_dir
from defang.workers.stores.submit import Submission, SubmitError, submit

log = logging.getLogger("defang.worker")

BAD_REQUEST = tempfail("Temporary local problem, please try again later", "451", "4.3.0")
LOCAL_PROBLEM = tempfail("Temporary local problem, please try again later", "451", "4.3.0")
# a runner given no config (a test, a script) uses the declared defaults
DEFAULT_ON_LIMIT = MimeLimits().on_limit.verdict
DEFAULT_MAX_CPU_SECONDS = FilterSection().max_cpu_seconds
DEFAULT_ON_CPU_LIMIT = FilterSection().on_cpu_limit.verdict


class FilterRunner:
    """The hooks of one loaded filter, applied to one request at a time."""

    def __init__(
        self,
        loaded: LoadedFilter,
        *,
        on_filter_error: Verdict,
        max_notes_bytes: int = DEFAULT_MAX_NOTES_BYTES,
        config: Any = None,
    ) -> None:
        if not isinstance(on_filter_error, Verdict):
            raise TypeError("on_filter_error must be a Verdict")
        self.loaded = loaded
        self.on_filter_error = on_filter_error
        self.max_notes_bytes = max_notes_bytes
        cfg = config
        if cfg is not None:
            self.limits = cfg.section(MimeLimits)
            self.on_limit = cfg.mime_on_limit.verdict
            self.budget = CpuBudget(cfg.max_cpu_seconds)
            self.on_cpu_limit = cfg.on_cpu_limit.verdict
            self.quarantine_store = QuarantineStore(quarantine_dir(cfg), max_files=cfg.quarantine_max_files,
                                                    max_bytes=cfg.quarantine_max_bytes)  # fmt: skip
            self.monitor_all = cfg.filter_mode == "monitor"
            self.monitor_rules = frozenset(cfg.monitor_rules)
            self.services = ServiceSettings.from_config(cfg)
            self.submission = Submission.for_notices(cfg)
            self.split_submission = Submission.for_split(cfg)
            services.CURRENT = self.services
        else:
            self.limits = MimeLimits()
            self.on_limit = DEFAULT_ON_LIMIT
            self.budget, self.on_cpu_limit = CpuBudget(DEFAULT_MAX_CPU_SECONDS), DEFAULT_ON_CPU_LIMIT
            self.quarantine_store = QuarantineStore(default_runtime_dir() / "quarantine")
            self.monitor_all, self.monitor_rules = False, frozenset()
            self.services, self.submission = ServiceSettings(), Submission()
            self.split_submission = Submission()
        #: the notices of the last message, sent after its reply (``send_notices``)
        self.outbox: list[Notice] = []
        #: set by ``defang test`` and ``replay``: the hooks see ``conn.trial`` and ``msg.trial``
        self.trial = False
        self._outbox_queue_id = "-"
        self._hooks: dict[str, Callable[..., Any]] = dict(loaded.hooks)
        self.hooks: frozenset[str] = frozenset(self._hooks)
        self._walks = "filter_part" in self._hooks or "filter_multipart" in self._hooks

    @classmethod
    def from_config(cls, loaded: LoadedFilter, cfg: Any) -> FilterRunner:
        """The runner as the daemons configure it ([replies], [filter], [mime], [quarantine])."""
        return cls(loaded, on_filter_error=cfg.on_filter_error.verdict,
                   max_notes_bytes=cfg.max_notes_bytes, config=cfg)  # fmt: skip

    def prepare(self) -> None:
        """What the filter's libraries need read before any message (``defang.auth``: its
        signing keys, its public suffix list): FilterLoadError, one line, when they cannot
        be used; so a bad key refuses a start or a reload, not every message."""
        auth = sys.modules.get("defang.workers.api.auth")
        if auth is None:
            return
        try:
            auth.prepare()
        except auth.SigningError as exc:
            raise FilterLoadError(f"{self.loaded.path}: {exc}") from None

    def initialize(self) -> None:
        """Run ``filter_initialize``; an exception means the worker must not boot."""
        fn = self._hooks.get("filter_initialize")
        if fn is not None:
            fn()

    def cleanup(self) -> None:
        """Run ``filter_cleanup``; the worker is exiting anyway, so only log failures."""
        fn = self._hooks.get("filter_cleanup")
        if fn is None:
            return
        try:
            fn()
        except Exception:
            log.error("filter error in filter_cleanup: %s", traceback.format_exc())

    # --- requests ---

    def read(self, body: bytes) -> wire.DecisionRequest | wire.Reply:
        """The decision request in a frame's ``body``, or (logged) the reply to a bad one."""
        try:
            request = wire.decode(body, wire.REQUESTS)
            if isinstance(request, wire.Hello):
                raise wire.ProtocolError("hello is for the multiplexor")
        except wire.ProtocolError as exc:
            return self._bad_request(body, exc)
        return request

    def handle_body(self, body: bytes) -> wire.Reply:
        """The reply to the request in a frame's ``body``; never raises."""
        request = self.read(body)
        return request if isinstance(request, wire.Reply) else self.handle(request)

    def handle(self, request: wire.DecisionRequest) -> wire.Reply:
        """The reply to one decision request; never raises."""
        self.outbox = []
        if isinstance(request, wire.Tick):
            return self._tick(request)
        conn = Connection.from_request(request)
        conn.trial = self.trial
        received_notes = conn.notes
        try:
            with self.budget.running():
                return self._handle(request, conn, received_notes)
        except OverBudget as exc:
            self.budget.stop()
            self.outbox = []
            return self._over_budget(None, conn, received_notes, exc)

    def _handle(self, request: wire.DecisionRequest, conn: Connection,
                received_notes: dict[str, Any]) -> wire.Reply:  # fmt: skip
        if isinstance(request, wire.EndOfMessage):
            return self._message(request, conn, received_notes)
        hook = hooks.FOR_REQUEST[type(request)]
        fn = self._hooks.get(hook.name)
        if fn is None:
            return self._reply(CONTINUE, [], conn, received_notes, hook.name, None)
        decision = conn.decision = self._decision(conn.macros.get("i", ""))
        decision.where = hook.name if hook.argument != "recipient" else f"{hook.name} <{request.recipient}>"
        _own_notes(conn)
        try:
            if hook.argument is None:
                result = fn(conn)
            else:
                result = fn(conn, getattr(request, hook.argument))
            _decide(decision, hook.name, result)
        except (Exception, SystemExit) as exc:
            return self._failed(hook.name, exc, conn, received_notes, None)
        reply = self._reply(decision.verdict, [], conn, received_notes, hook.name, None, decision)
        reply.policy = conn.policy_key  # conn.policy(): the recipient's group (defang.core.transaction)
        return reply

    def _tick(self, request: wire.Tick) -> wire.Reply:
        """``filter_tick(n)``: its result is not a verdict; an exception is a filter error."""
        fn = self._hooks.get("filter_tick")
        try:
            if fn is not None:
                fn(request.n)
        except (Exception, SystemExit) as exc:
            return self._failed("filter_tick", exc, Connection(id=f"tick {request.n}"), {}, None)
        return wire.Reply(CONTINUE)

    def _decision(self, queue_id: str) -> Decision:
        return Decision(monitor_all=self.monitor_all, monitor_rules=self.monitor_rules, queue_id=queue_id)

    def _message(self, request: wire.EndOfMessage, conn: Connection,
                 received_notes: dict[str, Any]) -> wire.Reply:  # fmt: skip
        msg = Message.from_request(request, conn)
        msg.limits = self.limits
        msg.services = self.services
        try:
            try:
                reply = self._run_message(msg, conn, received_notes)
            except OverBudget as exc:
                self.budget.stop()
                reply = self._over_budget(msg, conn, received_notes, exc)
            if msg._scans is not None:  # for the per-message log line and the metrics
                reply.checks = msg._scans.outcomes()
            return reply
        finally:
            if msg._scans is not None:
                msg._scans.close()

    def _run_message(self, msg: Message, conn: Connection, received_notes: dict[str, Any]) -> wire.Reply:
        decision = msg.decision = conn.decision = self._decision(msg.queue_id or "")
        _own_notes(conn)
        hooks = self._hooks
        check = self.budget.check
        hook = ran = "message hooks"  # hook: what is running; ran: the last hook that returned
        try:
            fn = hooks.get("filter_begin")
            if fn is not None:
                hook = decision.where = "filter_begin"
                _decide(decision, hook, fn(msg))
                ran = hook
            if self._walks and not decision.decided:  # the first decision stands: no more hooks
                on_part = hooks.get("filter_part")
                on_multipart = hooks.get("filter_multipart")
                hook = "part walk"
                decision.where = "the part walk"  # parsing: what the budget's log line says
                for part in msg.parts:
                    fn = on_multipart if part.is_multipart else on_part
                    if fn is None:
                        continue
                    hook = "filter_multipart" if part.is_multipart else "filter_part"
                    decision.where = f"{hook}, part {part.index}"
                    check()
                    _decide(decision, hook, fn(msg, part))
                    ran = hook
                    if decision.decided:
                        break
                    hook = "part walk"
            fn = hooks.get("filter_end")
            if fn is not None and not decision.decided:
                hook = decision.where = "filter_end"
                check()
                _decide(decision, hook, fn(msg))
                ran = hook
            hook = ran
            verdict = decision.verdict
        except MimeLimitError as exc:
            return self._over_limit(msg, exc, hook, conn, received_notes)
        except (Exception, SystemExit) as exc:
            return self._failed(hook, exc, conn, received_notes, msg.queue_id)
        try:
            actions = self._commit(msg, verdict)
            if msg.split_copies and verdict.action == "discard":  # split after accept (workers/api/split.py)
                self.budget.stop()  # copies handed to the MTA are not taken back: never stopped halfway
                verdict, shown = split.carry_out(msg, self.split_submission, self.trial)
                actions = actions + shown
        except Exception as exc:
            return self._local_problem(msg, exc, conn, received_notes)
        self.outbox, self._outbox_queue_id = msg.notices, msg.queue_id or "-"
        return self._reply(verdict, actions, conn, received_notes, ran, msg.queue_id, decision)

    def send_notices(self) -> int:
        """Send the last message's notices (the worker calls this after its reply); a
        failure is a WARNING, nothing more: the verdict was given."""
        sent = 0
        for notice in self.outbox:
            try:
                via = submit(self.submission, "", list(notice.recipients), notice.data)
            except SubmitError as exc:
                log.warning("%s: could not send the %s: %s", self._outbox_queue_id, notice, exc)
                continue
            log.info("%s: sent the %s via %s", self._outbox_queue_id, notice, via)
            sent += 1
        self.outbox = []
        return sent

    def _commit(self, msg: Message, verdict: Verdict) -> list[Any]:
        """What the hooks asked for beyond actions: the new body, the quarantine entry.

        The body first: if the quarantine write fails after it, the message gets a
        4xx and nothing was stored, so its retry does not leave a second entry.
        """
        actions = msg.actions
        if msg.changed and verdict.action in ("continue", "accept"):
            from defang.workers.mime.rebuild import rebuild  # lazily: as the part actions (mime.part)

            msg.decision.where = "the rebuild"
            self.budget.check()
            new_body = str(msg.path) + wire.NEW_BODY_SUFFIX
            actions = actions + rebuild(msg, new_body)
        if msg._last_steps and verdict.action in ("continue", "accept"):
            for step in msg._last_steps:  # signing: over the message as it will leave
                actions = actions + step(msg, actions)
        if msg._quarantine is not None:
            self._store(msg)
        return actions

    def _store(self, msg: Message) -> None:
        """Write the message's quarantine entry, outside the CPU budget: the entry is
        capped (``[quarantine] max_files``, ``max_bytes``), and the message kept."""
        assert msg._quarantine is not None
        self.budget.stop()
        path = self.quarantine_store.write(msg, msg._quarantine)
        log.info("%s: quarantined as %s (%s)", msg.queue_id or "-", msg._quarantine.id, path)
        left = len(msg._quarantine.left_out)
        if left:
            store, qid = self.quarantine_store, msg._quarantine.id
            log.warning("%s: quarantine entry %s: %d of %d part files left out ([quarantine] max_files %d, "
                        "max_bytes %d); message.eml holds them", msg.queue_id or "-", qid, left,
                        len(msg._quarantine.parts), store.max_files, store.max_bytes)  # fmt: skip

    def _over_limit(self, msg: Message, exc: MimeLimitError, hook: str, conn: Connection,
                    received_notes: dict[str, Any]) -> wire.Reply:  # fmt: skip
        """A message past a [mime] limit: on_limit, the filter's actions dropped."""
        v = self.on_limit
        log.warning("%s: conn %s: message passed a MIME limit in %s: %s; answering %s %s",
                    msg.queue_id or "-", conn.id, hook, exc, v.code, v.dsn)  # fmt: skip
        try:
            if msg._quarantine is not None:  # asked for before the limit was hit
                self._store(msg)
        except Exception as qexc:
            return self._local_problem(msg, qexc, conn, received_notes)
        return self._reply(v, [], conn, received_notes, hook, msg.queue_id)

    def _over_budget(self, msg: Message | None, conn: Connection, received_notes: dict[str, Any],
                     exc: OverBudget) -> wire.Reply:  # fmt: skip
        """A request past its CPU budget: on_cpu_limit, the filter's actions dropped, one
        WARNING line; a quarantine entry the hooks asked for is still written."""
        v = self.on_cpu_limit
        queue_id = (msg.queue_id if msg is not None else None) or conn.macros.get("i") or "-"
        decision = conn.decision
        where = decision.where if decision is not None and decision.where else "the request"
        log.warning("%s: conn %s: over the CPU budget in %s (%s); answering %s %s",
                    queue_id, conn.id, where, exc, v.code, v.dsn)  # fmt: skip
        if msg is not None and msg._quarantine is not None:
            try:
                self._store(msg)
            except Exception as qexc:
                return self._local_problem(msg, qexc, conn, received_notes)
        return wire.Reply(v, [], received_notes, f"over the CPU budget: in {where}")

    def _local_problem(self, msg: Message, exc: Exception, conn: Connection,
                       received_notes: dict[str, Any]) -> wire.Reply:  # fmt: skip
        """Quarantine or rewrite failed (disk full, a bug): tempfail, the sender retries.

        A QuarantineError says all there is to say in its text: one line, no traceback."""
        if isinstance(exc, QuarantineError):
            detail = str(exc)
        else:
            detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        log.error("%s: conn %s: could not store or rewrite the message: %s", msg.queue_id or "-", conn.id,
                  detail)  # fmt: skip
        return wire.Reply(LOCAL_PROBLEM, [], received_notes,
                          f"local problem after the hooks: {type(exc).__name__}: {exc}"[:1000])

    # --- replies ---

    def _reply(
        self,
        verdict: Verdict,
        actions: list[Any],
        conn: Connection,
        received_notes: dict[str, Any],
        hook: str,
        queue_id: str | None,
        decision: Decision | None = None,
    ) -> wire.Reply:
        """The reply, proven JSON-encodable here rather than failing in the frame encoder."""
        notes = conn.notes
        try:
            # What arrived was JSON already, and so is an empty dict: no encoding to prove it.
            if notes is not received_notes and not (type(notes) is dict and not notes):
                encode_notes(notes, self.max_notes_bytes)
            # Nor for a verdict of plain strings and no actions (the common reply).
            fields = (verdict.action, verdict.code, verdict.dsn, verdict.text)
            if actions or not all(v is None or type(v) is str for v in fields):
                json.dumps([fields, actions], ensure_ascii=False, allow_nan=False)
        except NotesError as exc:
            return self._failed(hook, exc, conn, received_notes, queue_id, show_tb=False)
        except (TypeError, ValueError, RecursionError) as exc:
            error = FilterError(f"the reply is not JSON-encodable: {exc}")
            return self._failed(hook, error, conn, received_notes, queue_id, show_tb=False)
        if decision is None:
            return wire.Reply(verdict, actions, notes)
        return wire.Reply(verdict, actions, notes, would=decision.would, tags=decision.tags)

    def _failed(
        self,
        hook: str,
        exc: BaseException,
        conn: Connection,
        received_notes: dict[str, Any],
        queue_id: str | None,
        show_tb: bool | None = None,
    ) -> wire.Reply:
        if queue_id is None:
            queue_id = conn.macros.get("i")
        where = f"queue {queue_id}, conn {conn.id}" if queue_id else f"conn {conn.id}"
        contract = isinstance(exc, FilterError | NotesError)  # no traceback worth showing
        summary = str(exc) if contract else f"{type(exc).__name__}: {exc}"
        if show_tb is None:
            show_tb = not contract
        if show_tb:
            tb = exc.__traceback__
            # the first frame is this module calling the hook: not the admin's business
            if tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            detail = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()
        else:
            detail = summary
        log.error("filter error in %s (%s): %s", hook, where, detail)
        error = f"filter error in {hook}: {summary}"[:1000]
        return wire.Reply(self.on_filter_error, [], received_notes, error)

    def _bad_request(self, body: bytes, exc: Exception) -> wire.Reply:
        """Not a request of this protocol: a tempfail, the notes left as they were."""
        log.error("bad request (%d bytes: %r): %s: %s", len(body), body[:60], type(exc).__name__, exc)
        return wire.Reply(BAD_REQUEST, [], None, f"bad request: {type(exc).__name__}: {exc}"[:1000])


def _own_notes(conn: Connection) -> None:
    """Give the hooks a copy of the notes, so a failing hook cannot leave half an edit."""
    conn.notes = copy.deepcopy(conn.notes) if conn.notes else {}


def _decide(decision: Decision, hook: str, result: Any) -> None:
    decision.take_result(hook, result)

