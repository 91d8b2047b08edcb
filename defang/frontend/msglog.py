"""The one structured line per message, at INFO, written by the front end at end of message.

The front end is the one process that knows everything about a message: the client and
its HELO from the connection, the envelope and size it spooled, the reply it gives the
MTA, and what the worker's reply carries (actions, tags, scanner outcomes, its pid and
its time in the filter).  The line's fields (``[log] format`` renders them:
``defang.core.logsetup``)::

    qid conn client client_name helo from rcpts size verdict code dsn reply
    actions tags checks worker queued filter total error

``queued`` is the decision's time outside the filter (the multiplexor's queue and the
hops between the processes): ``total`` less the worker's own ``filter`` time.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from defang.core import wire
from defang.core.verdicts import Verdict

log = logging.getLogger("defang.milter")


def verdict_name(verdict: Verdict) -> str:
    """The verdict as an admin counts it: at end of message "continue" is an accept."""
    return "accept" if verdict.action == "continue" else verdict.action


def actions_summary(actions: list[list[Any]], stamped: int = 0) -> str:
    """``add_header:2,hold:1``: each action's name and how many times."""
    counts = Counter(a[0] for a in actions if a)
    if stamped:
        counts["would_header"] += stamped
    return ",".join(f"{name}:{n}" for name, n in counts.items())


def log_message(session: Any, queue_id: str, verdict: Verdict, reply: wire.Reply | None, total: float,
                stamped: int = 0, error: str | None = None) -> None:  # fmt: skip
    """The per-message line (``reply``: None when the front end answered on its own, e.g. a
    message past a limit)."""
    if not log.isEnabledFor(logging.INFO):
        return
    env = session.env
    fields: dict[str, Any] = {
        "qid": queue_id or "-", "conn": session.id, "client": session.ip, "client_name": session.hostname,
        "helo": session.helo, "from": f"<{env.sender}>", "rcpts": len(session.smtp.recipients),
        "size": env.size,
        "verdict": verdict_name(verdict),
    }  # fmt: skip
    if verdict.code:
        fields.update(code=verdict.code, dsn=verdict.dsn or "", reply=verdict.text or "")
    if reply is not None:
        fields["actions"] = actions_summary(reply.actions, stamped)
        fields["tags"] = reply.tags
        fields["checks"] = [c.replace(" ", "=", 1) for c in reply.checks]
        fields["worker"] = reply.pid
        fields["queued"] = round(max(total - reply.elapsed, 0.0), 6)
        fields["filter"] = reply.elapsed
        error = error or reply.error
    fields["total"] = round(total, 6)
    if error:
        fields["error"] = error
    log.info("%s: conn %s: message", queue_id or "-", session.id, extra={"fields": fields})
