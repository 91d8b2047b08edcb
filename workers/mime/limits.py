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

from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MimeLimits:
    """The ``[mime]`` limits; see etc/defang.toml for what each one bounds."""

    max_parts: int = 5000
    max_depth: int = 50
    max_decoded_size: int = 100 * MiB
    max_archive_members: int = 5000
    max_archive_depth: int = 3
    max_archive_expansion: int = 100 * MiB

    @classmethod
    def from_config(cls, cfg: Any) -> MimeLimits:
        """Take the ``mime_*`` fields of a ``defang.core.config.Config``."""
        return cls(
            max_parts=cfg.mime_max_parts,
            max_depth=cfg.mime_max_depth,
            max_decoded_size=cfg.mime_max_decoded_size,
            max_archive_members=cfg.mime_max_archive_members,
            max_archive_depth=cfg.mime_max_archive_depth,
            max_archive_expansion=cfg.mime_max_archive_expansion,
        )


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
