"""The part of ``msg`` that acts on the message as a whole rather than on one part.

A mixin of ``Message`` (kept apart, as ``services`` is, so that ``message`` keeps to
headers, parts and verdicts): ``msg.scratch`` (state between the hooks of one message),
``msg.rebuild()`` (MIMEDefang's ``action_rebuild``) and
``msg.remove_redundant_html_parts()`` (MIMEDefang's function of that name).  The flags
it sets, ``rebuild_all`` and ``warnings_first``, are read by the body rebuild
(``defang.workers.mime.rebuild``) after the hooks.
"""

from __future__ import annotations

from typing import Any

from defang.workers.mime.part import Part


class WholeMessage:
    """Whole-message actions and per-message state (mixed into ``Message``)."""

    #: True once ``rebuild()`` was called: the body is rebuilt even if no part changed
    rebuild_all: bool = False
    #: True once a ``drop_with_warning(..., first=True)``: the warning part goes first
    warnings_first: bool = False
    _scratch: dict[str, Any] | None = None

    # provided by Message
    parts: list[Part]

    @property
    def scratch(self) -> dict[str, Any]:
        """A dict of the filter's own for this message, empty at ``filter_begin``.

        What one hook found for the later hooks of the same message (MIMEDefang filters
        use globals for this, which defang's workers would carry into the next message):
        set in ``filter_begin``, read in ``filter_part`` and ``filter_end``.  It lives as
        long as the message's hooks and holds anything (it never leaves the worker).
        State for a whole SMTP connection goes in ``conn.notes`` instead.
        """
        if self._scratch is None:
            self._scratch = {}
        return self._scratch

    def rebuild(self) -> None:
        """Rebuild the body after the hooks even if nothing changed (``action_rebuild``).

        Every container is split again as the filter saw it: one whose bytes disagree
        with that reading (a part hidden after a reused boundary, a missing close
        delimiter) is written anew as plain valid MIME, with a boundary of its own, so
        that every mail client reads what the filter read.  What agrees is copied byte
        for byte, and signed or encrypted entities are never touched, so well-formed
        and signed mail come out as they went in (and, with no other change, the MTA is
        not even sent a new body).
        """
        self.rebuild_all = True

    def remove_redundant_html_parts(self, *, force: bool = False) -> list[Part]:
        """Drop each text/html part that has a text/plain sibling in a
        multipart/alternative (MIMEDefang's ``remove_redundant_html_parts``); return the
        parts dropped.

        Only direct children of a multipart/alternative go, as in MIMEDefang; one inside
        a signed or encrypted entity is left alone unless ``force`` (its signature would
        break).  In monitor mode the drops are noted, not done, and none is returned.
        """
        dropped: list[Part] = []
        for part in self.parts:
            if part.content_type != "multipart/alternative" or part.action is not None:
                continue
            if part.signed_container is not None and not force:
                continue
            kids = part.children
            if not any(c.content_type == "text/plain" and c.action is None for c in kids):
                continue
            for child in kids:
                if child.content_type == "text/html" and child.action is None:
                    child.drop(force=force)
                    if child.action == "drop":
                        dropped.append(child)
        return dropped
