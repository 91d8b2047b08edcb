"""The hooks a ``filter.py`` may define: one table that every side reads.

The loader checks a hook's arity against it, the runner finds the hook for a request in
it, the front end negotiates with the MTA from it (a stage whose hook the filter does not
define is skipped or answered without waiting), and the multiplexor reports the hook
names.  A new hook is one row here plus its call in the runner (and, for a new stage, a
request class in ``defang.core.wire``).
"""

from __future__ import annotations

from dataclasses import dataclass

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

assert {h.request.OP for h in HOOKS if h.request} == wire.DECISION_OPS  # type: ignore[attr-defined]
