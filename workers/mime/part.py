"""One MIME entity of the part walk, as ``filter_part`` and ``filter_multipart`` see it.

The structure comes from the stdlib ``email`` parser (``policy.default``; long bodies
stay in the spool file until read, see ``defang.workers.mime.skeleton``); the walk that
makes these objects is ``defang.workers.mime.walk``.  What a part offers is read on
first use and never raises: names from the lenient readers of
``defang.workers.mime.text``, payloads decoded only when ``part.payload`` or
``part.size`` is read.

The actions (``drop``, ``drop_with_warning``, ``replace``, ``quarantine``) are recorded
on the message the part came from (its *owner*: ``defang.workers.api.message.Message``,
which the part calls back through ``_edit_part``, ``_add_warning`` and
``_quarantine_part``) and carried out after the hooks.

``archives`` and ``newparts`` are imported when a filter first lists an archive or
replaces a part, not with this module: with them come ``zipfile``, ``tarfile``, ``gzip``
and ``html.entities``, which every defang process would otherwise hold (``defang run``
imports the worker's modules before it forks), measured +0.6 MB of PSS per process.
"""

from __future__ import annotations

import email.policy
import io
import re
from collections.abc import Iterable
from email.generator import BytesGenerator
from email.message import Message as EmailMessage
from typing import TYPE_CHECKING, Any

from defang.workers.mime import filenames as _names
from defang.workers.mime.limits import MimeLimits, PartActionError
from defang.workers.mime.skeleton import Spans
from defang.workers.mime.text import MIME_TYPE, SURROGATE, decode_words, raw_param, unescape

if TYPE_CHECKING:
    from defang.workers.mime.archives import ArchiveListing

_FLATTEN_POLICY = email.policy.default.clone(refold_source="none", max_line_length=0)
CONTAINER_MESSAGES = frozenset({"message/rfc822", "message/global"})
_DISPOSITIONS = frozenset({"inline", "attachment"})
_UNSET = object()
#: Entities whose bytes a signature or an encryption covers: changing anything inside
#: them breaks the signature (or the decryption).
SIGNED_TYPES = frozenset(
    {"multipart/signed", "multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime"}
)


def _defect_text(defect: object) -> str:
    text = str(defect).strip()
    name = type(defect).__name__
    return f"{name}: {unescape(text)}" if text and text != name else name


def _first_raw(entity: EmailMessage, header: str) -> str | None:
    for key, value in entity.raw_items():
        if key.lower() == header:
            return value
    return None


def as_bytes(entity: EmailMessage) -> bytes:
    """The entity as the stdlib writes it, line ends as parsed (LF), nothing refolded."""
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=_FLATTEN_POLICY).flatten(entity)
    return buf.getvalue()


class Part:
    """One MIME entity in the walk.

    ``email`` is the stdlib entity behind it, for what this class does not cover.
    ``payload`` and ``size`` are the decoded body (empty for containers); decoding
    happens on first access and never raises: an undecodable body comes back as
    its raw bytes with a defect.  ``disposition`` is "attachment", "inline" or None;
    an unknown disposition type counts as "attachment" (RFC 2183 section 2.8).

    ``parent`` is the enclosing container (None for the message itself) and
    ``children`` the entities directly inside a container, in document order.
    The actions (``drop``, ``drop_with_warning``, ``replace``, ``quarantine``) are
    recorded on the message the part came from and carried out after the hooks.
    """

    __slots__ = (
        "_entity",
        "_spans",
        "content_type",
        "is_multipart",
        "depth",
        "index",
        "parent",
        "children",
        "hidden",
        "_defects",
        "_payload",
        "_filename",
        "_owner",
        "_limits",
        "_edit",
        "_inner_raw",
        "_inner_cte",
        "embedded",
        "_span",
    )

    def __init__(
        self,
        entity: EmailMessage,
        *,
        depth: int,
        index: int,
        parent: Part | None,
        is_multipart: bool,
        defects: list[str] | None = None,
        owner: Any = None,
        limits: MimeLimits | None = None,
        spans: Spans | None = None,
    ) -> None:
        self._entity = entity  # for header reads: its long bodies may still be in the file
        self._spans = spans
        #: how deep the part is nested: 0 for the message itself, 1 for its parts, ...
        self.depth = depth
        #: the part's number in the walk (document order): 0 is the message itself
        self.index = index
        #: the enclosing container (a multipart, an enclosed message, or the text part
        #: carrying a hidden file); None for the message itself
        self.parent = parent
        #: the entities directly inside this one, in document order ([] for a leaf)
        self.children: list[Part] = []
        #: True for a part the stdlib's parser does not show but mail clients find: one
        #: after a reused boundary, a file hidden in a text part or a winmail.dat
        self.hidden = False
        #: True for a container (multipart/*, an enclosed message/rfc822): it has
        #: ``children`` and no ``payload``
        self.is_multipart = is_multipart
        self._defects = defects or []
        self._payload: bytes | None = None
        self._filename: object = _UNSET
        self._owner = owner
        self._limits = limits
        self._edit: tuple[Any, ...] | None = None
        self._inner_raw: bytes | None = None  # a base64/QP message/rfc822, decoded
        self._inner_cte: str | None = None
        #: how a hidden file was hidden: "uuencode", "yenc", "binhex" or "tnef"; None otherwise
        self.embedded: str | None = None
        self._span: tuple[int, int] = (0, 0)  # an embedded file's bytes in its carrier's payload
        if parent is not None:
            parent.children.append(self)
        try:
            content_type = unescape(entity.get_content_type())
        except Exception as exc:
            content_type = "application/octet-stream"
            self._defects.append(f"unreadable Content-Type: {exc}")
        if not MIME_TYPE.fullmatch(content_type):
            m = MIME_TYPE.match(content_type)
            if m:  # e.g. 'application/pdf name="x.pdf"' (a missing ';')
                self._defects.append(f"Content-Type {content_type!r} read as {m.group(0)!r}")
                content_type = m.group(0)
        #: the MIME type, lower case ("text/plain"); "application/octet-stream" when unreadable
        self.content_type = content_type

    def __repr__(self) -> str:
        return (f"<Part {self.index} {self.content_type} depth={self.depth} "
                f"filename={self.safe_filename}>")  # fmt: skip

    @property
    def email(self) -> EmailMessage:
        """The stdlib entity, its bodies (and those of the parts inside) read in."""
        if self._spans is not None:
            self._spans.materialize(self._entity)
            self._spans = None
        return self._entity

    @property
    def head(self) -> EmailMessage:
        """The stdlib entity for reading its headers only: unlike ``email`` it does not
        read bodies in, so its payload may still be a stand-in (``defang.workers.mime.skeleton``)."""
        return self._entity

    @property
    def defects(self) -> list[str]:
        """Parser and decoding defects of this entity, plus what the walk recovered."""
        return [_defect_text(d) for d in self._entity.defects] + self._defects

    @property
    def filename(self) -> str | None:
        """The file name the part gives itself, decoded (RFC 2231, RFC 2047, also where the
        stdlib gives up), Content-Disposition's first; None when it has none.  Any name
        an attacker chose: check ``filenames``, ``extensions``, ``has_extension``."""
        if self._filename is _UNSET:
            self._filename = self._read_filename()
        return self._filename  # type: ignore[return-value]

    @property
    def charset(self) -> str | None:
        """The Content-Type charset parameter, lower case; None when there is none."""
        try:
            charset = self._entity.get_content_charset()
        except Exception:
            return None
        return unescape(str(charset)) if charset else None

    @property
    def disposition(self) -> str | None:
        """The disposition: "attachment", "inline" or None (no Content-Disposition); an
        unknown type counts as "attachment" (RFC 2183)."""
        try:
            value = self._entity.get_content_disposition()
        except Exception:
            value = _first_raw(self._entity, "content-disposition")
            value = value.split(";", 1)[0].strip().lower() if value else None
        if value is None or value in _DISPOSITIONS:
            return value
        return "attachment"

    @property
    def payload(self) -> bytes:
        """The decoded body (base64, quoted-printable undone), read from the spool file on
        first use; b"" for a container.  Never raises: an undecodable body is its raw
        bytes, with a defect."""
        if self._payload is None:
            self._payload = b"" if self.is_multipart else self._decode()
        return self._payload

    @property
    def size(self) -> int:
        """The decoded body's length in bytes (reads ``payload``)."""
        return len(self.payload)

    # --- names -----------------------------------------------------------------------

    @property
    def safe_filename(self) -> str:
        """The filename escaped for a log line (``-`` when there is none)."""
        return _names.safe_filename(self.filename)

    @property
    def filenames(self) -> list[str]:
        """Every name the part gives itself: ``filename`` first, then the
        Content-Disposition ``filename`` and Content-Type ``name`` if they differ.
        An extension check should look at all of them: clients differ in which
        one they show and which one they save."""
        names: list[str] = []
        first = self.filename
        if first:
            names.append(first)
        for header, param in (("content-disposition", "filename"), ("content-type", "name")):
            raw = _first_raw(self._entity, header)
            if raw is None:
                continue
            try:
                value = raw_param(raw, param)
            except Exception:
                value = None
            if value and value not in names:
                names.append(value)
        return names

    @property
    def filename_mismatch(self) -> bool:
        """True when Content-Type ``name`` and Content-Disposition ``filename`` name
        different files (a way to show one name and save another)."""
        names = self.filenames
        return any(_names.names_differ(names[0], other) for other in names[1:])

    @property
    def extensions(self) -> list[str]:
        """Every extension of every name of the part (``a.pdf.exe`` -> pdf, exe)."""
        out: list[str] = []
        for name in self.filenames:
            for ext in _names.extensions(name):
                if ext not in out:
                    out.append(ext)
        return out

    def has_extension(self, exts: Iterable[str], *, anywhere: bool = False) -> bool:
        """True when any name of the part ends in one of ``exts`` (or has one
        anywhere); see ``defang.workers.mime.filenames.has_extension``."""
        exts = list(exts)
        return any(_names.has_extension(n, exts, anywhere=anywhere) for n in self.filenames)

    @property
    def is_attachment(self) -> bool:
        """Disposition "attachment", or a filename without a disposition."""
        disposition = self.disposition
        return disposition == "attachment" or (disposition is None and self.filename is not None)

    def clamav(self) -> Any:
        """clamd's verdict on this part's decoded body (``VirusResult``, streamed now;
        never raises).  ``msg.clamav()`` scans the whole message at once, cheaper."""
        return self._message().scans.scan_bytes(self.payload, f"part {self.index} {self.safe_filename}")

    # --- archives ------------------------------------------------------------------------

    def archive(self) -> ArchiveListing | None:
        """The members of the part if it is an archive (by content), else None.

        Enforces the message's ``[mime]`` archive limits: passing one raises
        ``MimeLimitError``, and uncaught that gives the message ``on_limit``.
        """
        if self.is_multipart:
            return None
        from defang.workers.mime.archives import list_archive  # lazily: see the module docstring

        return list_archive(self.payload, self._limits, name=self.filename or f"part {self.index}")

    # --- signatures ------------------------------------------------------------------------

    @property
    def signed_container(self) -> Part | None:
        """The signed or encrypted entity this part lies strictly inside, if any."""
        node = self.parent
        while node is not None:
            if node.content_type in SIGNED_TYPES:
                return node
            node = node.parent
        return None

    # --- actions ---------------------------------------------------------------------------

    @property
    def action(self) -> str | None:
        """None, "drop" or "replace": what the filter asked for this part so far."""
        if self._edit is None or self._edit[0] == "modify":
            return None
        return self._edit[0]

    def _message(self) -> Any:
        if self._owner is None:
            raise PartActionError("this part was not walked from a message: it has no actions")
        return self._owner

    def drop(self, *, force: bool = False, monitor: bool = False) -> None:
        """Remove the part from the message (a container: with everything inside).

        ``monitor``: note it (``X-Defang-Would``), do not do it (docs/filters.md)."""
        if self.embedded:
            self._drop_embedded(force, monitor)
            return
        self._message()._edit_part(self, ("drop",), force, monitor)

    def _drop_embedded(self, force: bool, monitor: bool) -> bool:
        """A file hidden in a text part goes by rewriting that part without its block (and
        without the blocks of its siblings dropped before); one inside a winmail.dat goes
        with the winmail.dat."""
        msg, carrier = self._message(), self.parent
        assert carrier is not None
        if self.embedded == "tnef":
            done = msg._edit_part(carrier, ("drop",), force, monitor)
        else:
            from defang.workers.mime.newparts import make_part  # lazily: see the module docstring

            gone = [c for c in carrier.children if c is self or c.embedded and c._edit == ("drop",)]
            spans = sorted(c._span for c in gone)
            text, at = bytearray(), 0
            for start, end in spans:
                text += carrier.payload[at:start]
                at = max(at, end)
            text += carrier.payload[at:]
            new = make_part(bytes(text), carrier.content_type, charset=carrier.charset or "utf-8")
            done = msg._edit_part(carrier, ("replace", new), force, monitor)
        if done:
            self._edit = ("drop",)
        return done

    def drop_with_warning(self, text: str, *, first: bool = False, force: bool = False,
                          monitor: bool = False) -> None:  # fmt: skip
        """Remove the part and add ``text`` to a warning part at the end of the message.

        Warnings of one message are collected into one text/plain part.  ``first``: that
        part goes before the message's first part instead (MIMEDefang's default,
        ``$WarningLocation = 0``), if any drop of the message asks for it.
        """
        msg = self._message()
        if self.embedded:
            done = self._drop_embedded(force, monitor)
        else:
            done = msg._edit_part(self, ("drop",), force, monitor)
        if done:
            msg._add_warning(text, first)

    def replace(
        self,
        content: str | bytes,
        content_type: str = "text/plain",
        filename: str | None = None,
        charset: str = "utf-8",
        *,
        force: bool = False,
        monitor: bool = False,
    ) -> None:
        """Put a new leaf in the place of this part (e.g. a notice for a blocked file).

        ``content`` is text (encoded in ``charset``) or bytes (sent base64 unless
        text/*).  With a ``filename`` the new part is an attachment, else inline.
        """
        from defang.workers.mime.newparts import make_part  # lazily: see the module docstring

        if self.embedded:
            raise PartActionError(f"{self.safe_filename} is a file hidden inside part {self.parent.index} "
                                  f"({self.embedded}): it can be dropped, not replaced")  # fmt: skip
        new = make_part(content, content_type, filename=filename, charset=charset)
        self._message()._edit_part(self, ("replace", new), force, monitor)

    def quarantine(self, reason: str) -> str:
        """Keep this part (and the whole message) in the quarantine; returns its ID.

        Written after the hooks finish, so a filter error never leaves an entry for
        a message the sender will retry.
        """
        return self._message()._quarantine_part(self, reason)

    def _decode(self) -> bytes:
        entity = self.email
        try:
            if entity.is_multipart():  # message/delivery-status and friends
                flat = as_bytes(entity)
                cut = re.search(rb"\r?\n\r?\n", flat)
                return flat[cut.end() :] if cut else b""
            data = entity.get_payload(decode=True)
            return data if isinstance(data, bytes) else b""
        except Exception as exc:
            self._defects.append(f"payload not decodable ({type(exc).__name__}: {exc}); raw")
            try:
                raw = entity.get_payload()
            except Exception:
                return b""
            if isinstance(raw, str):
                return raw.encode("utf-8", "surrogateescape")
            return raw if isinstance(raw, bytes) else b""

    def _read_filename(self) -> str | None:
        entity = self._entity
        try:
            name = entity.get_filename()
        except Exception:
            name = None
        clean = isinstance(name, str) and not ("=?" in name or "\ufffd" in name or SURROGATE.search(name))
        if clean and not self._disposition_name_unread():
            return name
        lenient = None
        for header, param in (("content-disposition", "filename"), ("content-type", "name")):
            raw = _first_raw(entity, header)
            if raw is not None:
                lenient = raw_param(raw, param)
                if lenient:
                    break
        if lenient:
            if name is None or (clean and lenient != name):
                self._defects.append(
                    f"filename {lenient!r} read by the lenient parser (the stdlib parser found "
                    f"{'none' if name is None else repr(name)})"
                )
            return lenient
        return decode_words(unescape(name)) if isinstance(name, str) else None

    def _disposition_name_unread(self) -> bool:
        """True when Content-Disposition has a filename the stdlib could not read (e.g.
        an unquoted encoded-word): ``get_filename()`` then falls back to the
        Content-Type name, but mail clients show the disposition's name."""
        raw = _first_raw(self._entity, "content-disposition")
        if raw is None or "filename" not in raw.lower():
            return False
        try:
            return self._entity.get_param("filename", None, "content-disposition") is None
        except Exception:
            return True
