"""Limits on MIME structure and archive expansion, and the errors the part API raises.

Why limits: a message is bounded in size by the front end, but not in shape.  A few
kilobytes can hold thousands of parts, a nesting deep enough to exhaust the
interpreter's stack, or a zip that expands to gigabytes.  Each of these must end in
a verdict (``[mime] on_limit``), never in a worker that hangs, swaps or crashes.
A value of 0 switches a limit off.

The limits travel with the message (``msg.limits``) so that helpers called from
``filter.py`` (``part.archive()``) enforce the same numbers as the walk.
"""

from __future__ import annotations

from defang.core.config import MimeSection

#: the ``[mime]`` section as declared in defang.core.config, taken as-is (``cfg.section(MimeLimits)``);
#: see etc/defang.toml for what each limit bounds
MimeLimits = MimeSection


def exceeds(value: int, limit: int) -> bool:
    """True when ``value`` passes ``limit`` (0 = no limit)."""
    return bool(limit) and value > limit


class MimeLimitError(Exception):
    """The message passed one of the ``[mime]`` limits.

    Raised by the walk and by the archive helpers.  Uncaught, it ends the message's
    hooks and the message gets the ``[mime] on_limit`` reply (not a filter error:
    the sender's message is at fault, not filter.py).  A filter may catch it to
    decide otherwise (e.g. quarantine, then reject).
    """

    def __init__(self, limit: str, value: int, maximum: int, where: str = "") -> None:
        self.limit = limit
        self.value = value
        self.maximum = maximum
        self.where = where
        if value < 0:  # not measured: the stdlib's recursive parser gave up first
            text = f"{limit} exceeded: nesting too deep for the parser"
        else:
            text = f"{limit} exceeded: {value} > {maximum}"
        super().__init__(f"{text} ({where})" if where else text)


class SignedMessageError(Exception):
    """A body change was asked for on a signed or encrypted message or entity.

    Changing the bytes of a multipart/signed or application/pkcs7-mime entity (or
    anything inside one) breaks its signature, so the recipient sees a forged-looking
    message.  Header changes are fine (they do not touch the body).  Pass
    ``force=True`` to the action to change it anyway.
    """


class PartActionError(Exception):
    """A part action that cannot be done (a part from another message, a dropped part)."""
