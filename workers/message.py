"""The ``msg`` object of the message hooks, and the actions a filter records on it.

Cost follows use.  Building a ``Message`` does no I/O.  ``msg.headers`` reads only
the header section of the spool file (a few KB whatever the message size);
the part walk (in the runner) happens only when the filter defines a part hook, and
parses the structure without the big bodies (``workers.skeleton``): a part's body is
read from the spool file when something reads it (``part.payload``, ``part.email``,
``msg.email``).

Spool file: the header section as the MTA passed it (``Name: value`` lines ending
in CRLF, folded lines continued with CRLF + SP/HT), one empty line, then the body.
LF-only line ends are accepted as well, so ``defang test some.eml`` works on files
saved by hand.

Header text: ``msg.headers`` values are unfolded (the line breaks of folding
removed, the whitespace kept) and stripped of surrounding blanks.  Header bytes are
decoded as UTF-8 where valid (RFC 6532) and byte by byte as Windows-1252 where not,
so a value is always printable, JSON-safe text and a legacy Latin-1 subject stays
readable.  ``msg.raw_headers`` keeps the undecoded value bytes (folds as CRLF).

Actions are validated when the filter calls them, so a bad argument raises in the
admin's traceback at the line that made the call, not later in the front end.

Body actions (``part.drop()``, ``part.replace()``, ``msg.add_part()``,
``msg.append_boilerplate()``...) are recorded here and carried out once, after the
hooks, by ``workers.rewrite``: a message nobody changed is never rebuilt.  On a
signed or encrypted message (or a part inside a signed entity) they raise
``SignedMessageError`` unless called with ``force=True``.
"""

from __future__ import annotations

import os
import quopri
import re
from email.errors import MissingHeaderBodySeparatorDefect
from email.message import Message as EmailMessage
from email.parser import BytesParser
from typing import Any

from defang import verdicts
from defang.verdicts import CONTINUE, Verdict
from workers import mailpolicy, skeleton
from workers import quarantine as quarantine_mod
from workers.conn import Connection
from workers.limits import MimeLimitError, MimeLimits, PartActionError, SignedMessageError
from workers.mailpolicy import POLICY
from workers.parts import SIGNED_TYPES, Part, b64_lenient, decode_words, lenient_text, walk

_FIELD = re.compile(rb"\n(?![ \t])")  # a line end that does not fold
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ":"
_BAD_IN_VALUE = re.compile(r"\r\n(?![ \t])|\n(?![ \t])|\r(?!\n)|\0")
_HEADER_READ = 16 * 1024
_PARSER = BytesParser(policy=POLICY)


def read_header_section(path: str) -> bytes:
    """The bytes before the first empty line of ``path`` (all of it if none)."""
    with open(path, "rb") as f:
        data = f.read(_HEADER_READ)
        if data[:1] == b"\n" or data[:2] == b"\r\n":
            return b""  # no headers at all
        start = 0
        while True:
            cut = _end_of_headers(data, start)
            if cut >= 0:
                return data[:cut]
            more = f.read(max(_HEADER_READ, len(data)))
            if not more:
                return data
            start = max(0, len(data) - 2)
            data += more


def _end_of_headers(data: bytes, start: int) -> int:
    """Offset of the line end before the first empty line, or -1 (bytes.find: C speed)."""
    crlf = data.find(b"\n\r\n", start)
    lf = data.find(b"\n\n", start, crlf + 1 if crlf >= 0 else len(data))
    end = lf if lf >= 0 else crlf
    if end < 0:
        return -1
    return end - 1 if end and data[end - 1 : end] == b"\r" else end


def parse_header_section(block: bytes) -> tuple[list[tuple[str, bytes]], list[str]]:
    """``(name, raw value)`` pairs (folds as CRLF, leading blank removed), and defects."""
    headers: list[tuple[str, bytes]] = []
    defects: list[str] = []
    if not block:
        return headers, defects
    for field in _FIELD.split(block.replace(b"\r\n", b"\n")):
        name, colon, rest = field.partition(b":")
        if not colon or b"\n" in name or not name.strip() or name[:1] in (b" ", b"\t"):
            defects.append(f"not a header field: {lenient_text(field)[:80]!r}")
            continue
        headers.append((name.rstrip(b" \t").decode("latin-1"), rest.lstrip(b" \t").replace(b"\n", b"\r\n")))
    return headers, defects


def _unfold(raw: bytes) -> str:
    return lenient_text(raw.replace(b"\r\n", b"")).strip(" \t\r")


# --- argument checks (raise in the filter's own call) -----------------------------


def check_header_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"header name must be a str, not {type(name).__name__}")
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}: use printable ASCII without ':' or spaces")
    return name


def check_header_value(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"header value must be a str, not {type(value).__name__}")
    if ("\r" in value or "\n" in value or "\0" in value) and _BAD_IN_VALUE.search(value):
        raise ValueError(
            f"invalid header value {value[:60]!r}: CR, LF and NUL are allowed only as "
            "folding (a line break followed by a space or tab)"
        )
    return value


def check_address(addr: Any, *, what: str, allow_empty: bool = False) -> str:
    if not isinstance(addr, str):
        raise TypeError(f"{what} must be a str, not {type(addr).__name__}")
    if not addr and not allow_empty:
        raise ValueError(f"{what} may not be empty")
    if addr.startswith("<") or addr.endswith(">"):
        raise ValueError(f"{what} {addr!r}: pass the address without angle brackets")
    if "\r" in addr or "\n" in addr or "\0" in addr:
        raise ValueError(f"{what} {addr!r} contains CR, LF or NUL")
    return addr


def _check_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError(f"{what} {text[:60]!r} contains CR, LF or NUL")
    return text


def _check_args(args: Any) -> str | None:
    return None if args is None else _check_text(args, "ESMTP args")


def _check_index(index: Any, minimum: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"header index must be an int, not {type(index).__name__}")
    if index < minimum:
        raise ValueError(f"header index must be >= {minimum}, got {index}")
    return index


# --- the message ---------------------------------------------------------------------


class Message:
    """What the message hooks see: envelope, headers, the lazily parsed message.

    ``headers`` and ``raw_headers`` are the headers as received; the header
    actions do not change them.  ``verdict`` is the verdict so far (continue until
    a verdict method is called or a hook returns one; the last one wins).
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
    ) -> None:
        self.conn = conn
        self.sender = sender
        self.recipients = recipients
        self.queue_id = queue_id
        self.path = path
        self._size = size
        self._raw_headers: list[tuple[str, bytes]] | None = None
        self._headers: list[tuple[str, str]] | None = None
        self._email: EmailMessage | None = None
        self._tree: EmailMessage | None = None  # the parse, long bodies still in the file
        self._spans: skeleton.Spans | None = None
        self.header_defects: list[str] = []
        self.actions: list[list[Any]] = []
        self.verdict: Verdict = CONTINUE
        #: the [mime] limits the walk and the archive helpers enforce
        self.limits: MimeLimits = MimeLimits()
        self._parts: list[Part] | None = None
        self._edited: list[Part] = []
        self._added: list[Any] = []
        self._warnings: list[str] = []
        self._quarantine: quarantine_mod.Pending | None = None

    @classmethod
    def from_request(cls, request: dict[str, Any], conn: Connection) -> Message:
        """Build from an ``eom`` request; recipients may be strings or [addr, args]."""
        recipients = [r if isinstance(r, str) else str(r[0]) for r in request.get("recipients") or ()]
        size = request.get("size")
        return cls(
            conn,
            sender=request.get("sender") or "",
            recipients=recipients,
            queue_id=request.get("queue_id"),
            path=request["spool"],
            size=size if isinstance(size, int) else None,
        )

    def __repr__(self) -> str:
        return f"<Message queue_id={self.queue_id!r} sender={self.sender!r}>"

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
        if self._headers is None:
            self._headers = [(name, _unfold(raw)) for name, raw in self.raw_headers]
        return self._headers

    def get_header(self, name: str, default: str | None = None) -> str | None:
        """The first ``name`` header (case-insensitive), or ``default``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    def get_all_headers(self, name: str) -> list[str]:
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
    def changed(self) -> bool:
        """True when body actions were recorded: the body will be rebuilt."""
        return bool(self._edited or self._added or self._warnings)

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

    def _edit_part(self, part: Part, edit: tuple[Any, ...], force: bool) -> None:
        """Record a drop/replace/modify of ``part`` (called by the Part actions)."""
        if part._owner is not self:
            raise PartActionError("this part belongs to another message")
        self._check_signed(part, force)
        part._edit = edit
        if part not in self._edited:
            self._edited.append(part)

    def _add_warning(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"warning text must be a str, not {type(text).__name__}")
        self._warnings.append(text)

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
        wrapped in a new multipart/mixed whose first part is the old body.
        """
        from workers.rewrite import make_part

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
        from workers.rewrite import html_snippet, with_boilerplate

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
        from workers.rewrite import body_offset

        if not any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in root.email.defects):
            return root.payload  # both read the same header section
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
        pending.reasons.append(_check_text(reason, "quarantine reason"))
        pending.whole = True
        return pending.id

    def _quarantine_part(self, part: Part, reason: str) -> str:
        if part._owner is not self:
            raise PartActionError("this part belongs to another message")
        pending = self._pending()
        reason = _check_text(reason, "quarantine reason")
        pending.reasons.append(f"part {part.index}: {reason}")
        if all(p is not part for p, _ in pending.parts):
            pending.parts.append((part, reason))
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
            ["insert_header", _check_index(index, 0), check_header_name(name), check_header_value(value)]
        )

    def change_header(self, name: str, value: str, index: int = 1) -> None:
        """Replace the value of the ``index``-th ``name`` header (1-based)."""
        self.actions.append(
            ["change_header", check_header_name(name), check_header_value(value), _check_index(index, 1)]
        )

    def delete_header(self, name: str) -> None:
        """Delete every ``name`` header of the message as received.

        Deleted from the last occurrence down to the first, so that each index
        still names the same header when the MTA applies it.
        """
        check_header_name(name)
        count = len(self.get_all_headers(name))
        self.actions.extend(["delete_header", name, i] for i in range(count, 0, -1))

    # --- envelope actions ---

    def add_recipient(self, addr: str, args: str | None = None) -> None:
        """Add an envelope recipient; ``args`` are optional RCPT TO ESMTP args."""
        self.actions.append(["add_recipient", check_address(addr, what="recipient"), _check_args(args)])

    def delete_recipient(self, addr: str) -> None:
        self.actions.append(["delete_recipient", check_address(addr, what="recipient")])

    def change_sender(self, addr: str, args: str | None = None) -> None:
        """Replace the envelope sender ("" for the null sender)."""
        self.actions.append(
            ["change_sender", check_address(addr, what="sender", allow_empty=True), _check_args(args)]
        )

    def hold(self, reason: str) -> None:
        """Ask the MTA to put the message on hold (Postfix hold queue)."""
        self.actions.append(["hold", _check_text(reason, "hold reason")])

    # --- verdicts ---

    def accept(self) -> None:
        self.verdict = verdicts.accept()

    def reject(self, text: str = "Message rejected", code: str = "550", dsn: str = "5.7.1") -> None:
        self.verdict = verdicts.reject(text, code, dsn)

    def tempfail(self, text: str = "Try again later", code: str = "451", dsn: str = "4.7.1") -> None:
        self.verdict = verdicts.tempfail(text, code, dsn)

    def discard(self) -> None:
        self.verdict = verdicts.discard()


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
