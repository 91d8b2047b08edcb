"""What the hooks decided about a message or an envelope stage, and what they noted on it.

The rule (docs/filters.md, "Which verdict wins"): **the first decision stands**.  A
hook's return value and ``msg.accept()``, ``reject()``, ``tempfail()``, ``discard()`` are
decisions; the first one that is not "continue" decides the message, no later hook runs
(the part walk stops), and a later one is ignored with a log line.  The actions recorded
before it are carried out if it lets the message through.  Why not the last one wins:
an allow list checked at the end could then undo a virus reject made earlier; the order
of the checks is the order of the hooks, as in SMTP itself.

A refusal in monitor mode (``reject(..., monitor=True)``, a part action with
``monitor=True``, or ``[filter] mode = "monitor"`` for every refusal) decides nothing: it
becomes a *would* entry, logged with the queue ID and stamped on the message in an
``X-Defang-Would`` header, and the hooks go on.  Tags (``msg.tag("spam_block")``) name
what fired, for the counters of ``defangctl status``.  Any text is a tag: it is often
made from what fired (a content type, a virus name), and a tag that raised would
tempfail the message on every retry; so it is cleaned (``clean_tag``), never refused.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from defang.core.verdicts import ACTIONS, CONTINUE, REFUSALS, Verdict

log = logging.getLogger("defang.filter")

_TAG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_NOT_IN_TAG = re.compile(r"[^A-Za-z0-9_.:-]+")
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")
MAX_TAG = 64  # characters
MAX_TAGS = 32  # per message: tags travel in every reply
_EXPECTED = "expected a verdict (accept(), reject(...), tempfail(...), discard()) or None"


class FilterError(Exception):
    """Admin code did something the contract does not allow (no traceback to show)."""


class Decision:
    """One message's (or one stage's) verdict so far, would-be refusals and tags."""

    __slots__ = ("verdict", "by", "where", "rule", "would", "tags", "monitor_all", "monitor_rules",
                 "queue_id")  # fmt: skip

    def __init__(self, *, monitor_all: bool = False, monitor_rules: frozenset[str] = frozenset(),
                 queue_id: str = "") -> None:  # fmt: skip
        self.verdict: Verdict = CONTINUE
        self.by = ""  # where the verdict came from
        self.where = ""  # the hook running now (set by the runner)
        self.rule = ""  # the rule of a defang.Chain running now (set by the chain)
        self.would: list[str] = []
        self.tags: list[str] = []
        self.monitor_all = monitor_all  # [filter] mode = "monitor"
        self.monitor_rules = monitor_rules  # [filter] monitor_rules (for defang.Chain)
        self.queue_id = queue_id

    @property
    def decided(self) -> bool:
        return self.verdict.action != "continue"

    @property
    def monitoring(self) -> bool:
        """Refusals are only noted now: the whole filter, or the running rule, is in monitor mode."""
        return self.monitor_all or (bool(self.rule) and self.rule in self.monitor_rules)

    @property
    def at(self) -> str:
        """Where the running code is, for log lines and would entries."""
        return f"{self.where}, rule {self.rule}" if self.rule else self.where

    def take_result(self, hook: str, result: Any) -> None:
        """What a hook returned: None goes on; a verdict is a decision (the first stands);
        anything else is the filter's mistake (FilterError)."""
        if result is None:
            return
        if not (isinstance(result, Verdict) and result.action in ACTIONS):
            shown = repr(result)
            shown = shown[:77] + "..." if len(shown) > 80 else shown
            raise FilterError(f"{hook} returned {shown}; {_EXPECTED}")
        self.take(result)

    def take(self, verdict: Verdict) -> None:
        """A decision from the running hook: the first stands; a monitored refusal is noted."""
        if verdict.action in REFUSALS and (verdict.monitor or self.monitoring):
            self.note(str(verdict))
            return
        if verdict.action == "continue":
            return
        if self.decided:
            log.warning("%s: %s: %s ignored: the message was decided already (%s in %s)",
                        self.queue_id or "-", self.at, verdict, self.verdict, self.by)  # fmt: skip
            return
        self.verdict, self.by = verdict, self.at

    def note(self, what: str) -> None:
        """A refusal not carried out (monitor mode): logged, and stamped on the message."""
        what = _LINE_BREAKS.sub(" ", what)  # a multi-line reply text: the entry is a header value
        entry = f"{what} ({self.at})" if self.at else what
        self.would.append(entry)
        log.info("%s: monitor: would %s", self.queue_id or "-", entry)

    def tag(self, name: str) -> None:
        """Count the message under ``name`` (cleaned: ``clean_tag``); at most ``MAX_TAGS``."""
        if not isinstance(name, str):
            raise TypeError(f"a tag must be a str, not {type(name).__name__}")
        name = name if _TAG.fullmatch(name) else clean_tag(name)
        if name not in self.tags and len(self.tags) < MAX_TAGS:
            self.tags.append(name)


def clean_tag(name: str) -> str:
    """``name`` as a tag of the log and the counters: each run of characters other than
    letters, digits, ``_ . : -`` becomes ``_``, cut to ``MAX_TAG``; "" becomes ``_``.
    ``message/partial`` is counted as ``message_partial``."""
    return _NOT_IN_TAG.sub("_", name)[:MAX_TAG] or "_"
