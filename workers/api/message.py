"""The ``msg`` object of the message hooks, and the actions a filter records on it.

Cost follows use.  Building a ``Message`` does no I/O.  ``msg.headers`` reads only
the header section of the spool file (a few KB whatever the message size);
the part walk (in the runner) happens only when the filter defines a part hook, and
parses the structure without the big bodies (``defang.workers.mime.skeleton``): a part's body is
read from the spool file when something reads it (``part.payload``, ``part.email``,
``msg.email``).

Spool file: the header section as the MTA passed it (``Name: value`` lines ending
in CRLF, folded lines continued with CRLF + SP/HT), one empty line, then the body.
LF-only line ends are accepted as well, so ``defang test some.eml`` works on files
saved by hand.

Header text (``msg.headers``) and the argument checks of the actions:
``defang.workers.api.headers``.  ``msg.raw_headers`` keeps the undecoded value bytes
(folds as CRLF).

Body actions (``part.drop()``, ``part.replace()``, ``msg.add_part()``,
``msg.append_boilerplate()``...) are recorded here and carried out once, after the
hooks, by ``defang.workers.mime.rebuild``: a message nobody changed is never rebuilt.  On a
signed or encrypted message (or a part inside a signed entity) they raise
``SignedMessageError`` unless called with ``force=True``.  Like the part actions, they
import the code that builds new parts when first called (see ``defang.workers.mime.part``).
"""

from __future__ import annotations

import logging
import os
import quopri
from email.errors import MissingHeaderBodySeparatorDefect
from email.message import Message as EmailMessage
from email.parser import BytesParser
from typing import Any

from defang.core import verdicts, wire
from defang.core.verdicts import Verdict
from defang.workers.api import split
from defang.workers.api.conn import Connection
from defang.workers.api.decision import Decision
from defang.workers.api.headers import (
    check_address,
    check_args,
    check_header_name,
    check_header_value,
    check_index,
    check_text,
    parse_header_section,
    read_header_section,
    unfold,
)
from defang.workers.api.services import Services
from defang.workers.api.wholemessage import WholeMessage
from defang.workers.mime import mailpolicy, skeleton
from defang.workers.mime.limits import MimeLimitError, MimeLimits, PartActionError, SignedMessageError
from defang.workers.mime.mailpolicy import POLICY
from defang.workers.mime.part import SIGNED_TYPES, Part
from defang.workers.mime.text import b64_lenient, decode_words
from defang.workers.mime.walk import walk
from defang.workers.stores import quarantine as quarantine_mod

log = logging.getLogger("defang.filter")
_PARSER = BytesParser(policy=POLICY)


# --- the message ---------------------------------------------------------------------


class Message(Services, WholeMessage):
    """What the message hooks see: envelope, headers, the lazily parsed message.

    ``headers`` and ``raw_headers`` are the headers as received: the header actions
    are recorded in ``actions`` and carried out by the MTA after the hooks, so a header
    a hook adds is not seen by ``get_header``.  ``verdict`` is the decision so far
    (``defang.workers.api.decision``: the first one stands).
    """

    def __init__(
        self,
        conn: Connection,
        *,
        sender: str,
        recipients: list[str],
        queue_id: str | None,
        path: str,
        size: int | None = None,
        monitor: bool = False,
    ) -> None:
        #: the SMTP connection the message came in on (``conn.notes``, ``conn.ip``, ...)
        self.conn = conn
        #: the envelope sender (MAIL FROM) without angle brackets; "" for a bounce
        self.sender = sender
        #: the envelope recipients the MTA accepted (those refused at RCPT are not here)
        self.recipients = recipients
        #: the policy group of every recipient here (``conn.policy()`` in filter_recipient);
        #: None: the default group.  The verdict is for this group alone.
        self.policy: str | None = None
        #: each recipient's RCPT TO ESMTP arguments, by address (``{"bob@x": ["NOTIFY=NEVER"]}``)
        self.rcpt_args: dict[str, list[str]] = {}
        #: the recipients of each copy when a hook split the message (``split_by_recipient``)
        self.split_copies: list[list[str]] | None = None
        #: the MTA's queue ID (macro ``i``), for log lines; None if the MTA did not send it
        self.queue_id = queue_id
        #: the spool file: the message as received, headers as the MTA passed them
        self.path = path
        self._size = size
        self._raw_headers: list[tuple[str, bytes]] | None = None
        self._headers: list[tuple[str, str]] | None = None
        self._email: EmailMessage | None = None
        self._tree: EmailMessage | None = None  # the parse, long bodies still in the file
        self._spans: skeleton.Spans | None = None
        #: what was wrong with the header section (read with ``raw_headers``)
        self.header_defects: list[str] = []
        #: the header and envelope actions asked for so far, ``[name, arguments...]`` in order
        self.actions: list[list[Any]] = []
        #: the verdict, the refusals monitor mode noted, the tags (the runner reads it)
        self.decision = Decision(monitor_all=monitor, queue_id=queue_id or "")
        #: the [mime] limits the walk and the archive helpers enforce
        self.limits: MimeLimits = MimeLimits()
        self._parts: list[Part] | None = None
        self._edited: set[Part] = set()  # a set: a list's `in` made 4,900 replacements quadratic
        self._added: list[Any] = []
        self._warnings: list[str] = []
        self._quarantine: quarantine_mod.Pending | None = None

    @classmethod
    def from_request(cls, request: wire.EndOfMessage, conn: Connection, *,
                     monitor: bool = False) -> Message:  # fmt: skip
        """Build from an end-of-message request (a size of 0 is read from the file)."""
        msg = cls(conn, sender=request.sender, recipients=list(request.recipients),
                  queue_id=request.queue_id, path=request.spool, size=request.size or None,
                  monitor=monitor)  # fmt: skip
        msg.policy = request.policy
        args = request.recipient_args  # none from a front end older than the worker: {}
        msg.rcpt_args = {r: a.split() for r, a in zip(request.recipients, args, strict=False)}
        return msg

    @property
    def verdict(self) -> Verdict:
        """The decision so far: continue until a hook decides (the first decision stands)."""
        return self.decision.verdict

    def __repr__(self) -> str:
        return f"<Message queue_id={self.queue_id!r} sender={self.sender!r}>"

    @property
    def trial(self) -> bool:
        """True in ``defang test`` and ``defang replay``, False for live mail (``conn.trial``):
        a filter that sends mail itself does so only when it is False."""
        return bool(self.conn.trial)

    # --- reading ---

    @property
    def size(self) -> int:
        """Size of the spooled message in bytes (as the front end reported it)."""
        if self._size is None:
            self._size = os.path.getsize(self.path)
        return self._size

    @property
    def raw_headers(self) -> list[tuple[str, bytes]]:
        """``(name, value bytes)`` exactly as spooled, folding included."""
        if self._raw_headers is None:
            self._raw_headers, self.header_defects = parse_header_section(read_header_section(self.path))
        return self._raw_headers

    @property
    def headers(self) -> list[tuple[str, str]]:
        """``(name, value)`` of every header as received, in order, folding undone (values
        are not RFC 2047-decoded: ``subject`` and ``defang.decode_words`` do that)."""
        if self._headers is None:
            self._headers = [(name, unfold(raw)) for name, raw in self.raw_headers]
        return self._headers

    def get_header(self, name: str, default: str | None = None) -> str | None:
        """The first ``name`` header (case-insensitive), or ``default``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    def get_all_headers(self, name: str) -> list[str]:
        """Every ``name`` header's value (case-insensitive), in order; [] when none."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    @property
    def subject(self) -> str:
        """The first Subject, RFC 2047-decoded; "" when there is none."""
        return decode_words(self.get_header("Subject", "") or "")

    @property
    def email(self) -> EmailMessage:
        """The whole message parsed by the stdlib (``policy.default``), on first use.

        The same objects as the parts' ``email``: ``msg.email is msg.parts[0].email``.
        """
        if self._email is None:
            tree = self._parsed()
            if self._spans is not None:
                self._spans.materialize(tree)
            self._email = tree
        return self._email

    def _parsed(self) -> EmailMessage:
        """The stdlib's parse, with long bodies left in the file until read."""
        if self._tree is None:
            mailpolicy.next_message()  # what the last message parsed is now "seen before"
            with open(self.path, "rb") as f:
                self._tree, self._spans = skeleton.parse(f, self.path, _PARSER)
        return self._tree

    @property
    def parts(self) -> list[Part]:
        """Every MIME entity in document order (the walk ``filter_part`` sees).

        Walked once, on first use, with ``limits``: a message past ``max_parts``,
        ``max_depth`` or ``max_decoded_size`` raises ``MimeLimitError``.
        """
        if self._parts is None:
            try:
                self._parts = list(walk(self._parsed(), self.limits, owner=self, spans=self._spans))
            except RecursionError:  # nesting too deep for the stdlib's recursive parser
                raise MimeLimitError("max_depth", -1, self.limits.max_depth) from None
        return self._parts

    @property
    def is_signed(self) -> bool:
        """True for a signed or encrypted message (multipart/signed, pkcs7-mime, ...):
        body actions on it need ``force=True``."""
        return self.parts[0].content_type in SIGNED_TYPES

    @property
    def added_parts(self) -> list[Any]:
        """The parts ``add_part`` (and a boilerplate with no body to go into) added."""
        return self._added

    @property
    def warnings(self) -> list[str]:
        """The texts ``part.drop_with_warning`` collected for the warning part."""
        return self._warnings

    @property
    def changed(self) -> bool:
        """True when body actions were recorded: the body will be rebuilt."""
        return bool(self._edited or self._added or self._warnings or self.rebuild_all)

    # --- body actions ---

    def _check_signed(self, part: Part | None, force: bool) -> None:
        if force:
            return
        root = self.parts[0]
        if root.content_type in SIGNED_TYPES:
            raise SignedMessageError(
                f"the message is {root.content_type}: changing its body would break its signature "
                "(or encryption); pass force=True to change it anyway"
            )
        container = part.signed_container if part is not None else None
        if container is not None:
            raise SignedMessageError(
                f"part {part.index} ({part.content_type}) is inside a {container.content_type} entity: "
                "changing it would break the signature; pass force=True to change it anyway"
            )

    def _edit_part(self, part: Part, edit: tuple[Any, ...], force: bool, monitor: bool = False) -> bool:
        """Record a drop/replace/modify of ``part`` (called by the Part actions); False
        when monitor mode only noted it."""
        if part._owner is not self:
            raise PartActionError("this part belongs to another message")
        if edit[0] != "modify" and (monitor or self.decision.monitoring):
            self.decision.note(f"{edit[0]} part {part.index} {part.safe_filename}")
            return False
        self._check_signed(part, force)
        part._edit = edit
        self._edited.add(part)
        return True

    def _add_warning(self, text: str, first: bool = False) -> None:
        if not isinstance(text, str):
            raise TypeError(f"warning text must be a str, not {type(text).__name__}")
        self._warnings.append(text)
        self.warnings_first = self.warnings_first or first

    def add_part(
        self,
        content: str | bytes,
        content_type: str = "text/plain",
        filename: str | None = None,
        charset: str = "utf-8",
        *,
        disposition: str | None = None,
        force: bool = False,
    ) -> None:
        """Add a leaf part at the end of the message.

        A multipart/mixed message gets it as its last part; any other message is
        wrapped in a new multipart/mixed whose first part is the old body.  ``content``:
        text (in ``charset``) or bytes; ``disposition``: "inline" or "attachment" (default:
        attachment with a ``filename``, else inline)."""
        from defang.workers.mime.newparts import make_part  # lazily: see the module docstring

        self._check_signed(None, force)
        self._added.append(make_part(content, content_type, filename=filename, charset=charset,
                                     disposition=disposition))  # fmt: skip

    def append_boilerplate(self, text: str, html: str | None = None, *, force: bool = False) -> list[Part]:
        """Append ``text`` to the first text/plain body and ``html`` (default: ``text``
        escaped) before ``</body>`` of the first text/html body; return those parts.

        A body is a text part that is not an attachment, not inside an enclosed
        (forwarded) message, not dropped or replaced, and not inside a signed entity
        (unless ``force``).  In a multipart/alternative both alternatives get it.  A
        message with no such body (an attachment only, or a signed part only) gets
        a text/plain part holding ``text``.  Each body keeps its charset and
        transfer encoding where the text fits.  On a signed message (``is_signed``)
        it raises ``SignedMessageError`` unless ``force``.
        """
        from defang.workers.mime.newparts import html_snippet, with_boilerplate  # lazily: as above

        if not isinstance(text, str) or (html is not None and not isinstance(html, str)):
            raise TypeError("boilerplate text and html must be str")
        self._check_signed(None, force)
        bodies: dict[str, Part] = {}
        for part in self.parts:
            if part.is_multipart or part.content_type not in ("text/plain", "text/html"):
                continue
            if part.content_type in bodies or part.is_attachment or _in_enclosed_or_gone(part):
                continue
            if not force and part.signed_container is not None:
                continue  # its signature would break; the text goes into a part of its own
            bodies[part.content_type] = part
        if not bodies:
            self.add_part(text, force=force)
            return []
        chosen = sorted(bodies.values(), key=lambda p: p.index)
        for part in chosen:
            self._check_signed(part, force)
        for part in chosen:
            edit = part._edit
            entity = edit[1] if edit and edit[0] == "modify" else part.email
            if edit:
                data = entity.get_payload(decode=True)
            elif part.parent is None:
                data = self._body_as_the_mta_sees_it(part)
            else:
                data = part.payload
            is_html = part.content_type == "text/html"
            addition = html_snippet(text, html) if is_html else text
            new, changed = with_boilerplate(entity, data or b"", addition, is_html)
            if edit:
                changed |= edit[2]
            self._edit_part(part, ("modify", new, changed), True)
        return chosen

    def _body_as_the_mta_sees_it(self, root: Part) -> bytes:
        """The decoded body of a single-part message, starting where the MTA's body starts.

        Usually ``root.payload``.  But the stdlib ends the header section at the first
        line that does not look like a header (``Subject : x``, with a space), where
        the MTA does not; then the stdlib's payload starts with header lines that the
        MTA keeps in the header section, and a new body built from it would repeat them.
        """
        if not any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in root.email.defects):
            return root.payload  # both read the same header section
        from defang.workers.mime.rebuild import body_offset  # lazily: as above

        with open(self.path, "rb") as f:
            spool = f.read()
        body = spool[body_offset(spool) :]
        cte = (self.get_header("Content-Transfer-Encoding") or "").strip().lower()
        if cte == "base64":
            return b64_lenient(body)
        if cte == "quoted-printable":
            return quopri.decodestring(body)
        return body

    # --- quarantine ---

    def _pending(self) -> quarantine_mod.Pending:
        if self._quarantine is None:
            self._quarantine = quarantine_mod.Pending(quarantine_mod.new_id())
        return self._quarantine

    def quarantine(self, reason: str) -> str:
        """Keep the whole message in defang's quarantine; returns the entry's ID.

        The entry (message, envelope, connection, headers, reasons) is written
        atomically after the hooks finish; every quarantine call of one message
        goes into the same entry.  This does not change the verdict: combine it
        with ``discard()``, ``reject()``, or part actions.
        """
        pending = self._pending()
        pending.reasons.append(check_text(reason, "quarantine reason"))
        pending.whole = True
        return pending.id

    def _quarantine_part(self, part: Part, reason: str) -> str:
        if part._owner is not self:
            raise PartActionError("this part belongs to another message")
        pending = self._pending()
        reason = check_text(reason, "quarantine reason")
        pending.reasons.append(f"part {part.index}: {reason}")
        pending.add_part(part, reason)
        return pending.id

    @property
    def quarantine_id(self) -> str | None:
        """The ID of this message's quarantine entry, once one was asked for."""
        return self._quarantine.id if self._quarantine else None

    # --- header actions ---

    def add_header(self, name: str, value: str) -> None:
        """Append a header at the end of the header section."""
        self.actions.append(["add_header", check_header_name(name), check_header_value(value)])

    def insert_header(self, index: int, name: str, value: str) -> None:
        """Insert a header at ``index`` (0 = before the first header)."""
        self.actions.append(
            ["insert_header", check_index(index, 0), check_header_name(name), check_header_value(value)]
        )

    def change_header(self, name: str, value: str, index: int = 1) -> None:
        """Replace the value of the ``index``-th ``name`` header (1-based)."""
        self.actions.append(
            ["change_header", check_header_name(name), check_header_value(value), check_index(index, 1)]
        )

    def delete_header(self, name: str, index: int | None = None) -> None:
        """Delete every ``name`` header of the message as received, or the ``index``-th (1-based).

        Deleted from the last occurrence down to the first, so that each index
        still names the same header when the MTA applies it.  (``change_header`` to an
        empty value is not a deletion: libmilter deletes only for a NULL value, and
        Postfix keeps the field, empty.)
        """
        check_header_name(name)
        if index is not None:
            self.actions.append(["delete_header", name, check_index(index, 1)])
            return
        count = len(self.get_all_headers(name))
        self.actions.extend(["delete_header", name, i] for i in range(count, 0, -1))

    # --- envelope actions ---

    def add_recipient(self, addr: str, args: str | None = None) -> None:
        """Add an envelope recipient; ``args`` are optional RCPT TO ESMTP args."""
        self.actions.append(["add_recipient", check_address(addr, what="recipient"), check_args(args)])

    def delete_recipient(self, addr: str) -> None:
        """Remove an envelope recipient, as the envelope spells it: the domain is matched
        without regard to case, as MTAs match it (the local part exactly).  No such
        recipient: a WARNING, and nothing is asked of the MTA."""
        addr = check_address(addr, what="recipient")
        local, _, domain = addr.rpartition("@")
        for rcpt in self.recipients:
            r_local, _, r_domain = rcpt.rpartition("@")
            if rcpt == addr or (r_local == local and r_domain.lower() == domain.lower()):
                self.actions.append(["delete_recipient", rcpt])
                return
        log.warning("%s: delete_recipient(%r): no such recipient in the envelope (%s); nothing done",
                    self.queue_id or "-", addr, ", ".join(self.recipients) or "none")  # fmt: skip

    def change_sender(self, addr: str, args: str | None = None) -> None:
        """Replace the envelope sender ("" for the null sender)."""
        self.actions.append(
            ["change_sender", check_address(addr, what="sender", allow_empty=True), check_args(args)]
        )

    def hold(self, reason: str) -> None:
        """Ask the MTA to put the message on hold (Postfix hold queue)."""
        self.actions.append(["hold", check_text(reason, "hold reason")])

    # --- verdicts (the first decision stands: see defang.workers.api.decision) ---

    def accept(self) -> None:
        """Let the message through: no later hook runs; the actions so far are applied."""
        self.decision.take(verdicts.accept())

    def reject(self, text: str = "Message rejected", code: str = "550", dsn: str = "5.7.1", *,
               monitor: bool = False) -> None:  # fmt: skip
        """Refuse the message with ``code`` and ``dsn`` (5xx): the first decision stands."""
        self.decision.take(verdicts.reject(text, code, dsn, monitor=monitor))

    def tempfail(self, text: str = "Try again later", code: str = "451", dsn: str = "4.7.1", *,
                 monitor: bool = False) -> None:  # fmt: skip
        """Ask the sender to retry later with ``code`` and ``dsn`` (4xx): the first decision stands."""
        self.decision.take(verdicts.tempfail(text, code, dsn, monitor=monitor))

    def discard(self, *, monitor: bool = False) -> None:
        """Accept the message and throw it away, telling no one: the first decision stands."""
        self.decision.take(verdicts.discard(monitor=monitor))

    def split_by_recipient(self) -> bool:
        """Accept the message once and re-inject one copy per recipient, each filtered again
        with its own recipient's policy (MIMEDefang's ``stream_by_recipient``); True when
        it splits (two recipients or more): that is the decision, nothing later runs.  The
        path and what it costs: ``[split]``, docs/filters.md."""
        return split.ask(self, "recipient")

    def split_by_domain(self) -> bool:
        """``split_by_recipient`` with one copy per recipient domain (``stream_by_domain``)."""
        return split.ask(self, "domain")

    def tag(self, name: str) -> None:
        """Name what fired (``msg.tag("spam_block")``): counted by tag in ``defangctl status``."""
        self.decision.tag(name)


def _in_enclosed_or_gone(part: Part) -> bool:
    """Inside a forwarded message, or itself (or a container around it) dropped/replaced."""
    if part._edit is not None and part._edit[0] != "modify":
        return True
    node = part.parent
    while node is not None:
        if node.content_type in ("message/rfc822", "message/global"):
            return True
        if node._edit is not None and node._edit[0] != "modify":
            return True
        node = node.parent
    return False
