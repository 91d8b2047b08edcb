"""The SMTP conversation's rules, sans-IO: envelope events in, steps out.

One model, two drivers: the milter session (``defang.frontend.session``: libmilter's
callbacks are the events, the MTA gets the answers) and the trial (``defang test`` and
``replay``, ``defang.cli.trial``: it plays the MTA).  So a trial never shows an answer
production would not give.  The model knows no hook by name: which hook a stage asks is
``defang.core.hooks`` (``ENVELOPE``, ``MESSAGE``), and a stage whose hook the filter does
not define is answered without asking.

An event (``begin``: connect, helo, mail, rcpt; ``data``; ``message``: end of data) gives a
``Step``: ask a hook (the driver sends the request and hands the reply to ``replied``,
which gives the next step), or answer the MTA; ``ends`` says what that answer ends.

The rules:

- ``accept()`` at connect or HELO accepts the connection, at MAIL FROM or RCPT TO the
  message, without further filtering (the MTA stops asking); ``discard()`` throws the
  message away: nothing later is asked;
- a reject or tempfail at connect or HELO ends the connection, at MAIL FROM the
  transaction; at RCPT TO it refuses that recipient only;
- ``max_recipients``, the header limits and ``max_message_size`` with their replies;
- policy groups: ``filter_recipient`` may give a recipient a policy key
  (``conn.policy("strict")``); a transaction takes only recipients whose key is that of
  its first accepted recipient (no key: the default group) and answers the others
  ``452 4.5.3`` (RFC 5321 3.3, 4.5.3.1.10: the client sends them again in a new
  transaction), so that one verdict at end of data fits every recipient present.
"""

from __future__ import annotations

from dataclasses import dataclass

from defang.core import hooks
from defang.core.config import Config, ReplySpec
from defang.core.verdicts import CONTINUE, Verdict

#: the answer to a recipient of another policy group than the transaction's
OTHER_GROUP = Verdict("tempfail", "452", "4.5.3", "Too many recipients")
#: the MTA's answer to DATA when no recipient was accepted (the trial plays the MTA)
NO_RECIPIENTS = Verdict("reject", "554", "5.5.1", "No valid recipients")
#: what an answer ends, by stage, when it is not "continue"
_ENDS = {"connect": "connection", "helo": "connection", "mail": "transaction", "rcpt": "recipient"}


@dataclass(frozen=True, slots=True)
class Step:
    """What to do next.

    ``ask``: the hook to ask (send its stage's request, then call ``replied``); else
    ``answer`` the MTA.  ``ends``: what the answer ends ("" nothing: the next stage
    follows; "recipient", "transaction" or "connection": nothing of it is asked again).
    ``why``: the rule that answered without the filter ("max_recipients", "policy group",
    "no recipients", a limit's name), "" when the filter did.
    """

    ask: hooks.Hook | None = None
    answer: Verdict = CONTINUE
    ends: str = ""
    why: str = ""


class Conversation:
    """One SMTP connection's transactions, as the front end rules them.

    ``defined``: the names of the hooks the filter defines.  ``recipients`` (with their
    RCPT TO ESMTP arguments in ``recipient_args``, space-separated as on the wire) and
    ``policy`` are the current transaction's accepted recipients and their group's key.
    """

    __slots__ = ("defined", "cfg", "ended", "stage", "recipients", "recipient_args", "policy", "_pending")

    def __init__(self, defined: frozenset[str] | set[str], cfg: Config) -> None:
        self.defined = frozenset(defined)
        self.cfg = cfg
        self.ended = ""  # "connection" or "transaction" once an answer ended it
        self.stage = ""
        self.recipients: list[str] = []
        self.recipient_args: list[str] = []
        self.policy: str | None = None
        self._pending: tuple[str, list[str]] = ("", [])

    def begin(self, stage: str, recipient: str = "", args: list[str] | None = None) -> Step:
        """An envelope event (``hooks.STAGES`` but end of message); ``mail`` begins a
        transaction; at ``rcpt``, the recipient and its ESMTP arguments."""
        if stage == "mail":
            self.end()
        self.stage, self._pending = stage, (recipient, list(args or []))
        if self.ended:  # the MTA no longer asks; a recipient is the message's
            if stage == "rcpt":
                self._take()
            return Step(ends=self.ended)
        if stage == "rcpt" and len(self.recipients) >= self.cfg.max_recipients:
            over = self.cfg.on_too_many_recipients.verdict
            return Step(answer=over, ends="recipient", why="max_recipients")
        hook = hooks.ENVELOPE[stage]
        if hook.name in self.defined:
            return Step(ask=hook)
        return self.replied(CONTINUE)

    def replied(self, verdict: Verdict, policy: str | None = None) -> Step:
        """The filter's verdict at the stage asked (and the recipient's policy key at RCPT)."""
        action, stage = verdict.action, self.stage
        if stage == "rcpt" and action in ("continue", "accept", "discard"):
            if self.recipients and policy != self.policy:
                return Step(answer=OTHER_GROUP, ends="recipient", why="policy group")
            if not self.recipients:
                self.policy = policy
            self._take()
        if action == "continue":
            return Step()
        if action in ("accept", "discard"):
            self.ended = "connection" if _ENDS[stage] == "connection" else "transaction"
        else:
            self.ended = "" if stage == "rcpt" else _ENDS[stage]
        return Step(answer=verdict, ends=self.ended or _ENDS[stage])

    def over_limit(self, size: int, header_count: int, header_bytes: int) -> ReplySpec | None:
        """The reply of the first front-end limit the message passes, or None."""
        cfg = self.cfg
        if size > cfg.max_message_size:
            return cfg.on_message_too_large
        if header_count > cfg.max_headers or header_bytes > cfg.max_header_bytes:
            return cfg.on_header_too_large
        return None

    def data(self) -> Step:
        """DATA, as the MTA answers it (the trial plays the MTA; the milter never sees a DATA
        the MTA refused): without an accepted recipient, no DATA."""
        if not self.recipients and not self.ended:
            return Step(answer=NO_RECIPIENTS, ends="transaction", why="no recipients")
        return Step()

    def message(self, over: ReplySpec | None = None) -> Step:
        """End of data; ``over``: the limit the message passed (``over_limit``), if any."""
        self.stage = "eom"
        if self.ended:
            return Step(ends=self.ended)
        if over is not None:
            return Step(answer=over.verdict, ends="transaction", why="limit")
        defined = [name for name in hooks.MESSAGE if name in self.defined]
        if defined:
            return Step(ask=hooks.BY_NAME[defined[0]])
        return Step()

    def end(self) -> None:
        """The transaction is over (end of message, abort): a later MAIL FROM begins anew."""
        self.recipients, self.recipient_args, self.policy = [], [], None
        if self.ended == "transaction":
            self.ended = ""

    def _take(self) -> None:
        recipient, args = self._pending
        self.recipients.append(recipient)
        self.recipient_args.append(" ".join(args))
