"""Split after accept: one copy of the message per recipient (or per domain), each filtered
again with its recipient's policy (issue 30, approach 2; MIMEDefang's
``stream_by_recipient``, ``stream_by_domain`` and ``resend_message``).

``msg.split_by_recipient()`` in a message hook decides the message (the first decision
stands: no later hook runs).  After the hooks, the runner hands each copy to the MTA by
``[split]`` (``Submission.for_split``), a path that leads through defang again, and only
when every copy was taken is the original discarded.  If the MTA does not take one, the
original gets ``451 4.3.0`` and the client retries: the copies already queued arrive
twice, but nothing is lost.  A copy has one recipient (or one domain), so it is never
split again.

The copy is the message as received, with ``X-Defang-Split: QUEUE-ID i/n`` on top, for
tracing only: anyone can write that header, so a filter must not trust it.  A copy the
filter refuses becomes a bounce from our MTA (backscatter, when the sender was forged);
policy groups (``conn.policy``, ``defang.core.transaction``) refuse before accepting and
do not create any.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from defang.core import verdicts
from defang.core.verdicts import Verdict
from defang.workers.stores.submit import Submission, SubmitError, submit

log = logging.getLogger("defang.filter")

#: the header each copy carries: the original's queue ID, which copy of how many
MARKER = "X-Defang-Split"
#: what the original gets when a copy could not be handed over
NOT_QUEUED = verdicts.tempfail("Temporary local problem, please try again later", "451", "4.3.0")


def groups(recipients: list[str], by: str) -> list[list[str]]:
    """The recipients of each copy: one each (``by`` "recipient"), or one list per domain
    (case-insensitive), in the order first seen."""
    if by == "recipient":
        return [[r] for r in dict.fromkeys(recipients)]
    out: dict[str, list[str]] = {}
    for rcpt in recipients:
        out.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
    return list(out.values())


def ask(msg: Any, by: str) -> bool:
    """``msg.split_by_recipient()``/``split_by_domain()``: True if the message will be split
    (two copies or more, at most ``[split] max_copies``, and not decided already)."""
    copies = groups(list(msg.recipients), by)
    if len(copies) < 2 or msg.decision.decided:
        return False
    if len(copies) > msg.services.split_max_copies:
        log.warning("%s: not split: %d copies (by %s) would pass [split] max_copies %d; the filter "
                    "decides the message as a whole", msg.queue_id or "-", len(copies), by,
                    msg.services.split_max_copies)  # fmt: skip
        return False
    msg.decision.take(verdicts.discard())  # the original, once every copy is queued
    msg.split_copies = copies
    return True


def carry_out(msg: Any, how: Submission, trial: bool) -> tuple[Verdict, list[list[Any]]]:
    """Hand each copy to the MTA; the original's verdict (discard, or ``NOT_QUEUED``) and,
    in a trial (which hands over nothing), one ``split`` action per copy to show."""
    copies: list[list[str]] = msg.split_copies
    queue_id = msg.queue_id or "-"
    if trial:
        return verdicts.discard(), [["split", ", ".join(c)] for c in copies]
    original = Path(msg.path).read_bytes()
    for i, rcpts in enumerate(copies, 1):
        data = f"{MARKER}: {queue_id} {i}/{len(copies)}\r\n".encode() + original
        to = ", ".join(rcpts)
        try:
            via = submit(how, msg.sender, rcpts, data)
        except SubmitError as exc:
            again = f" (copies 1-{i - 1} were queued: the retry sends them again)" if i > 1 else ""
            log.error("%s: split: copy %d of %d (to %s) not queued: %s; the original gets %s %s%s", queue_id,
                      i, len(copies), to, exc, NOT_QUEUED.code, NOT_QUEUED.dsn, again)  # fmt: skip
            return NOT_QUEUED, []
        log.info("%s: split: copy %d of %d to %s queued via %s", queue_id, i, len(copies), to, via)
    return verdicts.discard(), []
