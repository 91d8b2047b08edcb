"""The hooks a ``filter.py`` may define: one table that every side reads.

The loader checks a hook's arity against it, the runner finds the hook for a request in
it, the front end negotiates with the MTA from it (a stage whose hook the filter does not
define is skipped or answered without waiting), and the multiplexor reports the hook
names.  A new hook is one row here plus its call in the runner (and, for a new stage, a
request class in ``defang.core.wire``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from defang.core import wire

#: milter stages, in the order of an SMTP transaction; "eom" is end of message
STAGES = ("connect", "helo", "mail", "rcpt", "eom")


@dataclass(frozen=True, slots=True)
class Hook:
    """One hook.

    ``stage``: the milter stage it runs at (None: run by the worker itself, at start or
    exit, or on the multiplexor's periodic ``Tick``).  ``request``: the wire request a
    worker gets for it.  ``argument``: the field of that request passed as the hook's
    second argument, after ``conn`` (``filter_tick``'s only one).
    ``skippable``: without this hook the stage is negotiated "no reply" (the MTA does
    not wait for one).  RCPT always needs a reply (``max_recipients`` is enforced
    there), and end of message is where the reply goes.
    """

    name: str
    arity: int
    stage: str | None = None
    request: type | None = None
    argument: str | None = None
    skippable: bool = False

    @property
    def is_envelope(self) -> bool:
        return self.stage in ("connect", "helo", "mail", "rcpt")

    @property
    def is_message(self) -> bool:
        return self.stage == "eom"


HOOKS: tuple[Hook, ...] = (
    Hook("filter_initialize", 0),
    Hook("filter_cleanup", 0),
    Hook("filter_relay", 1, "connect", wire.Connect, skippable=True),
    Hook("filter_helo", 1, "helo", wire.Helo, skippable=True),
    Hook("filter_sender", 2, "mail", wire.Mail, "sender", skippable=True),
    Hook("filter_recipient", 2, "rcpt", wire.Rcpt, "recipient"),
    Hook("filter_begin", 1, "eom", wire.EndOfMessage),
    Hook("filter_part", 2, "eom", wire.EndOfMessage),
    Hook("filter_multipart", 2, "eom", wire.EndOfMessage),
    Hook("filter_end", 1, "eom", wire.EndOfMessage),
    Hook("filter_tick", 1, None, wire.Tick, "n"),  # every [filter] tick_interval, on one worker
)

BY_NAME: dict[str, Hook] = {h.name: h for h in HOOKS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
#: the envelope hook for each envelope stage
ENVELOPE: dict[str, Hook] = {h.stage: h for h in HOOKS if h.is_envelope}  # type: ignore[misc]
#: the envelope hook a request of each type runs
FOR_REQUEST: dict[type, Hook] = {h.request: h for h in HOOKS if h.is_envelope}  # type: ignore[misc]
#: the hooks of end of message, in the order they run (the part walk between begin and end)
MESSAGE: tuple[str, ...] = tuple(h.name for h in HOOKS if h.is_message)
MESSAGE_SET = frozenset(MESSAGE)



#: names admins reach for (MIMEDefang's, the SMTP command's) -> the hook that does it
LIKELY: dict[str, str] = {
    "filter": "filter_part",  # MIMEDefang's per-part hook
    "filter_message": "filter_end",
    "filter_body": "filter_end",
    "filter_eom": "filter_end",
    "filter_data": "filter_begin",
    "filter_header": "filter_begin",
    "filter_headers": "filter_begin",
    "filter_connect": "filter_relay",
    "filter_ehlo": "filter_helo",
    "filter_mail": "filter_sender",
    "filter_from": "filter_sender",
    "filter_send": "filter_sender",
    "filter_rcpt": "filter_recipient",
    "filter_init": "filter_initialize",
}


def misnamed(namespace: dict[str, Any], path: str) -> list[str]:
    """A ``file:line: ...`` warning for each function in ``namespace`` (a filter's or a
    chain rule's module) whose name is a near miss of a hook: a misspelt hook
    (``filter_recipients``) would otherwise never run, silently.

    A near miss is a name admins reach for (``LIKELY``: MIMEDefang's ``filter``, the SMTP
    command's name) or a ``filter_*`` name within ``near_miss`` of a hook.  Other
    ``filter_*`` functions are helpers (MIMEDefang's own filter has
    ``filter_bad_filename``): no warning, so that ``defang check --strict`` passes them.
    """
    said = []
    for name, value in namespace.items():
        lower = name.lower()
        if name in BY_NAME or not callable(value) or not (lower == "filter" or lower.startswith("filter_")):
            continue
        code = getattr(value, "__code__", None)
        if code is None:
            continue  # a class or a builtin: not a def that looks like a hook
        closest = LIKELY.get(lower) or near_miss(lower)
        if closest:
            said.append(f"{code.co_filename}:{code.co_firstlineno}: {name} is not a hook defang calls; "
                        f"the closest is {closest}")  # fmt: skip
    return said


def near_miss(name: str) -> str | None:
    """The hook ``name`` (lower case) is a slip of, or None.

    Compared after ``filter_``, without ``_`` (``filter_clean_up``): a slip is one edit
    (a letter wrong, missing, extra, or two swapped: ``filter_recipients``,
    ``filter_beign``, ``filter_hello``) from a hook's short name, two from a long one
    (seven letters or more: ``filter_mulitparts``).  A helper's name says something
    else and is further away (``filter_bad_filename``, ``filter_partial``, ``filter_send``).
    """
    word = name.removeprefix("filter_").replace("_", "")
    best, best_distance = None, 3
    for hook in NAMES:
        target = hook.removeprefix("filter_")
        allowed = 2 if len(target) >= 7 else 1
        distance = _edits(word, target, allowed)
        if distance <= allowed and distance < best_distance:
            best, best_distance = hook, distance
    return best


def _edits(a: str, b: str, limit: int) -> int:
    """The edit distance of ``a`` and ``b`` with a swap of neighbours as one edit (optimal
    string alignment); anything over ``limit`` is ``limit + 1``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    before: list[int] = []
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], before[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        before, row = row, current
    return min(row[-1], limit + 1)


def signature_problem(name: str, fn: Any) -> str | None:
    """Why ``fn`` cannot be hook ``name`` (an ``async def``, or an arity defang cannot
    call it with), or None; caught at load time, as it would fail on every message."""
    import inspect  # here: the daemons import this module, and only a worker loads a filter

    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return f"{name} must be a plain def, not async def"
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin or C callable: nothing to check
    arity = BY_NAME[name].arity
    try:
        signature.bind(*([None] * arity))
    except TypeError as exc:
        return f"{name}{signature} cannot be called with {arity} argument{'s' if arity != 1 else ''} ({exc})"
    return None


assert {h.request.OP for h in HOOKS if h.stage} == wire.DECISION_OPS  # type: ignore[attr-defined]
