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
    exit).  ``request``: the wire request a worker gets for it.  ``argument``: the field
    of that request passed as the hook's second argument, after ``conn``.
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
    "filter_rcpt": "filter_recipient",
    "filter_init": "filter_initialize",
}


def misnamed(namespace: dict[str, Any], path: str) -> list[str]:
    """A ``file:line: ...`` warning for each callable named ``filter_*`` (or MIMEDefang's
    ``filter``) in ``namespace`` (a filter's or a chain rule's module) that is no hook: a
    misspelt hook (``filter_recipients``) would otherwise never run, silently."""
    import difflib  # here: the daemons import this module, and only a worker loads a filter

    said = []
    for name, value in namespace.items():
        if not (name.startswith("filter_") or name == "filter") or name in BY_NAME or not callable(value):
            continue
        code = getattr(value, "__code__", None)
        if code is None:
            continue  # a class or a builtin: not a def that looks like a hook
        closest = LIKELY.get(name.lower()) or difflib.get_close_matches(name.lower(), NAMES, n=1, cutoff=0)[0]
        said.append(f"{code.co_filename}:{code.co_firstlineno}: {name} is not a hook defang calls; "
                    f"the closest is {closest}")  # fmt: skip
    return said


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


assert {h.request.OP for h in HOOKS if h.request} == wire.DECISION_OPS  # type: ignore[attr-defined]
