"""The MIME part walk a filter sees through ``filter_part`` and ``filter_multipart``.

The structure comes from the stdlib ``email`` parser (``policy.default``; long bodies
stay in the spool file until read, see ``workers.skeleton``), but the
stdlib's reading of malformed mail can hide what a mail client would show (see
LESSONS.md, "Where parsers disagree").  The rule here: no attachment invisible to
the filter, no filename unreadable, nothing raises.  So the walk looks again where
the stdlib hides things, and says so in ``part.defects``:

* parts after the close delimiter of a multipart whose nested multipart reused its
  boundary land in the stdlib's epilogue: they are parsed from there and walked;
* a ``message/rfc822`` part sent base64 or quoted-printable encoded (illegal, but
  seen) is parsed by the stdlib as text: it is decoded and the message inside walked;
* filenames the stdlib cannot read (an unquoted encoded-word, raw 8-bit bytes, a bad
  encoded word) are read again from the raw header by a lenient parser.

Text from raw bytes (8-bit header bytes, unknown charsets) is decoded as UTF-8 where
it is valid and byte by byte as Windows-1252 (Latin-1 for its five holes) where it is
not: never a lone surrogate that would break logging or JSON, and legacy Latin-1
names stay readable ("Frösche", not "Fr\\ufffdsche").

Payloads are decoded only when the filter reads ``part.payload`` or ``part.size``.
"""

from __future__ import annotations

import binascii
import codecs
import email.policy
import io
import quopri
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from email.generator import BytesGenerator
from email.message import Message as EmailMessage
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any

from workers import filenames as _names
from workers.limits import MimeLimitError, MimeLimits, PartActionError, exceeds
from workers.mailpolicy import POLICY
from workers.skeleton import Spans

if TYPE_CHECKING:
    from workers.archives import ArchiveListing

# --- lenient text ---------------------------------------------------------------

_ERRORS = "defang.cp1252"


def _byte_char(b: int) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(b)


_BYTE_CHARS = tuple(_byte_char(b) for b in range(256))


def _cp1252_fallback(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    bad = err.object[err.start : err.end]
    return "".join(_BYTE_CHARS[b] for b in bad), err.end


codecs.register_error(_ERRORS, _cp1252_fallback)

_SURROGATE = re.compile("[\ud800-\udfff]")

# charsets mail uses that Python does not know by these names
_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-e": "iso-8859-6",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-roman": "mac-roman",
    "unicode-1-1-utf-7": "utf-7",
    "x-unicode-2-0-utf-7": "utf-7",
    "ks_c_5601": "cp949",
    "x-gbk": "gbk",
}
_UTF8 = frozenset({"utf-8", "utf8", "us-ascii", "ascii", "unknown-8bit", "x-unknown", ""})


def lenient_text(data: bytes) -> str:
    """UTF-8 where valid, Windows-1252 byte by byte where not; never raises."""
    return data.decode("utf-8", _ERRORS)


def unescape(text: str) -> str:
    """Turn the email package's surrogate-escaped raw bytes into readable text."""
    if not _SURROGATE.search(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return lenient_text(raw)


def decode_charset(data: bytes, charset: str | None) -> str:
    """``data`` in the declared ``charset``, falling back leniently; never raises."""
    name = (charset or "").strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    if name in _UTF8:
        return lenient_text(data)
    try:
        return data.decode(name, "replace")
    except Exception:  # unknown charset, or a codec that is not a text encoding
        return lenient_text(data)


def b64_lenient(data: bytes) -> bytes:
    """Base64 that skips junk characters and repairs padding, as mail clients do."""
    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    if len(clean) % 4 == 1:
        clean = clean[:-1]  # a lone trailing sextet carries no whole byte
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except binascii.Error:
        return b""


# --- RFC 2047 encoded words -------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([!->@-~]+?)\?([bBqQ])\?([!->@-~]*?)\?=")


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words anywhere in ``text``, leniently; never raises.

    Adjacent words in one charset are joined before decoding (senders split a
    multi-byte character across two words); whitespace between words is dropped;
    a word that cannot be decoded is left as written.
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    pos = 0
    after_word = False

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(decode_charset(bytes(pending), pending_charset))
            pending.clear()
            pending_charset = None

    for m in _ENCODED_WORD.finditer(text):
        gap = text[pos : m.start()]
        if gap and not (after_word and gap.isspace()):
            flush()
            out.append(gap)
        charset = m.group(1).split("*", 1)[0].lower()  # RFC 2231 section 5 language tag
        encoded = m.group(3).encode("ascii")
        if m.group(2) in "bB":
            data = b64_lenient(encoded)
        else:
            data = binascii.a2b_qp(encoded, header=True)
        if charset != pending_charset:
            flush()
            pending_charset = charset
        pending += data
        after_word = True
        pos = m.end()
    flush()
    out.append(text[pos:])
    return "".join(out)


# --- parameters, read leniently from the raw header --------------------------------

_FOLD = re.compile(r"\r?\n(?=[ \t])|\r?\n$")


def _split_params(value: str) -> list[tuple[str, str]]:
    """``key=value`` pairs after the first ``;``; quotes and backslashes honoured."""
    segments: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            segments.append("".join(current))
            current = []
        else:
            current.append(ch)
    segments.append("".join(current))
    # 'application/pdf name="x.pdf"': a parameter written without its ';'
    head = segments[0].split(None, 1)
    if len(head) == 2 and "=" in head[1]:
        segments[0:1] = head
    pairs: list[tuple[str, str]] = []
    for segment in segments[1:]:
        key, sep, val = segment.partition("=")
        if not sep:
            continue
        val = val.strip()
        if val.startswith('"'):
            end = len(val)
            i = 1
            chars: list[str] = []
            while i < end:
                if val[i] == "\\" and i + 1 < end:
                    chars.append(val[i + 1])
                    i += 2
                    continue
                if val[i] == '"':
                    break
                chars.append(val[i])
                i += 1
            val = "".join(chars)
        pairs.append((key.strip().lower(), val))
    return pairs


_CONTINUATION = re.compile(r"\*(\d+)(\*?)")


def raw_param(raw_value: str, name: str) -> str | None:
    """Parameter ``name`` from a raw header value: RFC 2231 (continuations, charsets),
    encoded words quoted or not, 8-bit bytes; None when absent.  Never raises."""
    if name not in raw_value.lower():
        return None
    pairs = _split_params(_FOLD.sub("", unescape(raw_value)))
    simple: str | None = None
    extended: str | None = None
    pieces: dict[int, tuple[str, bool]] = {}
    for key, val in pairs:
        if key == name:
            simple = val if simple is None else simple
        elif key == name + "*":
            extended = val
        elif key.startswith(name) and (m := _CONTINUATION.fullmatch(key, len(name))):
            pieces.setdefault(int(m.group(1)), (val, bool(m.group(2))))
    if pieces:
        ordered = [pieces[i] for i in sorted(pieces)]
        charset = None
        data = bytearray()
        for n, (val, is_extended) in enumerate(ordered):
            if is_extended:
                if n == 0 and val.count("'") >= 2:
                    charset, _lang, val = val.split("'", 2)
                data += urllib.parse.unquote_to_bytes(val)
            else:
                data += val.encode("utf-8")
        result = decode_charset(bytes(data), charset)
    elif extended is not None:
        charset = None
        if extended.count("'") >= 2:
            charset, _lang, extended = extended.split("'", 2)
        result = decode_charset(urllib.parse.unquote_to_bytes(extended), charset)
    elif simple is not None:
        result = simple
    else:
        return None
    return decode_words(result).strip()


# --- parts ---------------------------------------------------------------------------

_PARSER = BytesParser(policy=POLICY)
_FLATTEN_POLICY = email.policy.default.clone(refold_source="none", max_line_length=0)
_CONTAINER_MESSAGES = frozenset({"message/rfc822", "message/global"})
_DISPOSITIONS = frozenset({"inline", "attachment"})
_UNSET = object()
_TOKEN = r"[!#$%&'*+\-.^_`{|}~0-9a-z]+"
_MIME_TYPE = re.compile(_TOKEN + "/" + _TOKEN)
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


def _flatten(entity: EmailMessage) -> bytes:
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
        self.depth = depth
        self.index = index
        self.parent = parent
        self.children: list[Part] = []
        self.hidden = False  # found by looking again where the stdlib hides parts
        self.is_multipart = is_multipart
        self._defects = defects or []
        self._payload: bytes | None = None
        self._filename: object = _UNSET
        self._owner = owner
        self._limits = limits
        self._edit: tuple[Any, ...] | None = None
        self._inner_raw: bytes | None = None  # a base64/QP message/rfc822, decoded
        self._inner_cte: str | None = None
        if parent is not None:
            parent.children.append(self)
        try:
            content_type = unescape(entity.get_content_type())
        except Exception as exc:
            content_type = "application/octet-stream"
            self._defects.append(f"unreadable Content-Type: {exc}")
        if not _MIME_TYPE.fullmatch(content_type):
            m = _MIME_TYPE.match(content_type)
            if m:  # e.g. 'application/pdf name="x.pdf"' (a missing ';')
                self._defects.append(f"Content-Type {content_type!r} read as {m.group(0)!r}")
                content_type = m.group(0)
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
        read bodies in, so its payload may still be a stand-in (``workers.skeleton``)."""
        return self._entity

    @property
    def defects(self) -> list[str]:
        """Parser and decoding defects of this entity, plus what the walk recovered."""
        return [_defect_text(d) for d in self._entity.defects] + self._defects

    @property
    def filename(self) -> str | None:
        if self._filename is _UNSET:
            self._filename = self._read_filename()
        return self._filename  # type: ignore[return-value]

    @property
    def charset(self) -> str | None:
        try:
            charset = self._entity.get_content_charset()
        except Exception:
            return None
        return unescape(str(charset)) if charset else None

    @property
    def disposition(self) -> str | None:
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
        if self._payload is None:
            self._payload = b"" if self.is_multipart else self._decode()
        return self._payload

    @property
    def size(self) -> int:
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
        anywhere); see ``workers.filenames.has_extension``."""
        exts = list(exts)
        return any(_names.has_extension(n, exts, anywhere=anywhere) for n in self.filenames)

    @property
    def is_attachment(self) -> bool:
        """Disposition "attachment", or a filename without a disposition."""
        disposition = self.disposition
        return disposition == "attachment" or (disposition is None and self.filename is not None)

    # --- archives ------------------------------------------------------------------------

    def archive(self) -> ArchiveListing | None:
        """The members of the part if it is an archive (by content), else None.

        Enforces the message's ``[mime]`` archive limits: passing one raises
        ``MimeLimitError``, and uncaught that gives the message ``on_limit``.
        """
        if self.is_multipart:
            return None
        from workers.archives import list_archive

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

    def drop(self, *, force: bool = False) -> None:
        """Remove the part from the message (a container: with everything inside)."""
        self._message()._edit_part(self, ("drop",), force)

    def drop_with_warning(self, text: str, *, force: bool = False) -> None:
        """Remove the part and add ``text`` to a warning part at the end of the message.

        Warnings of one message are collected into one text/plain part.
        """
        msg = self._message()
        msg._edit_part(self, ("drop",), force)
        msg._add_warning(text)

    def replace(
        self,
        content: str | bytes,
        content_type: str = "text/plain",
        filename: str | None = None,
        charset: str = "utf-8",
        *,
        force: bool = False,
    ) -> None:
        """Put a new leaf in the place of this part (e.g. a notice for a blocked file).

        ``content`` is text (encoded in ``charset``) or bytes (sent base64 unless
        text/*).  With a ``filename`` the new part is an attachment, else inline.
        """
        from workers.rewrite import make_part

        new = make_part(content, content_type, filename=filename, charset=charset)
        self._message()._edit_part(self, ("replace", new), force)

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
                flat = _flatten(entity)
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
        clean = isinstance(name, str) and not ("=?" in name or "\ufffd" in name or _SURROGATE.search(name))
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


def _container_kind(entity: EmailMessage) -> str | None:
    """ "multipart", "message" or None (a leaf) as far as the walk is concerned."""
    if not entity.is_multipart():
        return None
    if entity.get_content_maintype() == "multipart":
        return "multipart"
    if entity.get_content_type() in _CONTAINER_MESSAGES:
        return "message"
    return None


def _inner_message(
    entity: EmailMessage, spans: Spans | None = None
) -> tuple[EmailMessage | None, str | None, bytes | None, str | None]:
    """The enclosed message, a defect note, and for an encoded one its decoded bytes and CTE."""
    payload = entity.get_payload()
    if not isinstance(payload, list) or not payload:
        return None, None, None, None
    inner = payload[0]
    cte = str(entity.get("content-transfer-encoding", "")).strip().lower()
    if cte not in ("base64", "quoted-printable"):
        return inner, None, None, None
    if spans is not None:
        spans.materialize(inner)  # decoded below from its text
    try:
        if cte == "base64":
            if not inner.keys() and isinstance(inner.get_payload(), str):
                encoded = inner.get_payload().encode("utf-8", "surrogateescape")
            else:
                encoded = _flatten(inner)
            raw = b64_lenient(encoded)
        else:
            raw = quopri.decodestring(_flatten(inner))
        decoded = _PARSER.parsebytes(raw)
    except Exception as exc:
        return inner, f"{entity.get_content_type()} with {cte} encoding not decodable: {exc}", None, None
    note = (
        f"{entity.get_content_type()} sent with Content-Transfer-Encoding "
        f"{cte} (not allowed); decoded and walked"
    )
    return decoded, note, raw, cte


def _boundary_bytes(entity: EmailMessage) -> bytes | None:
    try:
        boundary = entity.get_boundary()
    except Exception:
        return None
    return boundary.encode("utf-8", "surrogateescape") if boundary else None


def _epilogue_entities(
    entity: EmailMessage, boundaries: tuple[bytes, ...], spans: Spans | None = None
) -> list[EmailMessage]:
    """Entities after a close delimiter, i.e. hidden in the stdlib's epilogue."""
    epilogue = entity.epilogue
    if not epilogue or "--" not in epilogue or not boundaries:
        return []
    if spans is not None:
        epilogue = spans.restore(epilogue)
    data = epilogue.encode("utf-8", "surrogateescape")
    delimiter = re.compile(rb"^--(" + b"|".join(re.escape(b) for b in boundaries) + rb")(--)?[ \t]*\r?\n?$")
    chunks: list[list[bytes]] = []
    current: list[bytes] | None = None
    for line in data.splitlines(keepends=True):
        m = delimiter.match(line)
        if m:
            if current is not None:
                chunks.append(current)
            current = None if m.group(2) else []
        elif current is not None:
            current.append(line)
    if current is not None:
        chunks.append(current)
    found = []
    for chunk in chunks:
        body = b"".join(chunk)
        body = body[:-2] if body.endswith(b"\r\n") else body[:-1] if body.endswith(b"\n") else body
        if body.strip():
            found.append(_PARSER.parsebytes(body))
    return found


def _estimated_size(entity: EmailMessage, spans: Spans | None = None) -> int:
    """An upper bound of the decoded size of a leaf, without decoding it."""
    try:
        payload = entity.get_payload()
    except Exception:
        return 0
    if not isinstance(payload, str | bytes):
        return 0
    size = spans.length(payload) if spans is not None and isinstance(payload, str) else len(payload)
    cte = str(entity.get("content-transfer-encoding", "")).strip().lower()
    return size * 3 // 4 if cte == "base64" else size


def walk(
    root: EmailMessage, limits: MimeLimits | None = None, owner: Any = None, spans: Spans | None = None
) -> Iterator[Part]:
    """Every entity in document order; containers before their children.

    Iterative, not recursive: a message nested a thousand levels deep must not
    blow the stack of a worker.  With ``limits``, passing ``max_parts``,
    ``max_depth`` or ``max_decoded_size`` (estimated from the encoded sizes) raises
    ``MimeLimitError`` and ends the walk.  ``owner`` is the message whose actions
    the parts record (None: parts without actions).  ``spans``: the bodies of ``root``
    still in the spool file (``workers.skeleton``), read in when a part's body is read.
    """
    index = 0
    decoded_total = 0
    # (entity, depth, parent, boundaries of enclosing multiparts, defects, hidden)
    stack: list[tuple[EmailMessage, int, Part | None, tuple[bytes, ...], list[str], bool]] = [
        (root, 0, None, (), [], False)
    ]
    while stack:
        entity, depth, parent, boundaries, defects, hidden_child = stack.pop()
        if limits is not None:
            if exceeds(index + 1, limits.max_parts):
                raise MimeLimitError("max_parts", index + 1, limits.max_parts)
            if exceeds(depth, limits.max_depth):
                raise MimeLimitError("max_depth", depth, limits.max_depth)
        try:
            kind = _container_kind(entity)
        except Exception as exc:
            kind = None
            defects.append(f"structure not readable: {exc}")
        part = Part(
            entity, depth=depth, index=index, parent=parent, is_multipart=kind is not None, defects=defects,
            owner=owner, limits=limits, spans=spans,
        )  # fmt: skip
        part.hidden = hidden_child
        index += 1
        if kind is None and limits is not None and limits.max_decoded_size:
            decoded_total += _estimated_size(entity, spans)
            if exceeds(decoded_total, limits.max_decoded_size):
                raise MimeLimitError("max_decoded_size", decoded_total, limits.max_decoded_size)
        children: list[tuple[EmailMessage, int, Part | None, tuple[bytes, ...], list[str], bool]] = []
        if kind == "multipart":
            boundary = _boundary_bytes(entity)
            inner_bounds = boundaries + (boundary,) if boundary else boundaries
            for child in entity.get_payload():
                if isinstance(child, EmailMessage):
                    children.append((child, depth + 1, part, inner_bounds, [], False))
            try:
                hidden = _epilogue_entities(entity, inner_bounds, spans)
            except Exception:
                hidden = []
            for child in hidden:
                note = (
                    f"found after the close delimiter of {part.content_type} (a nested "
                    "multipart reusing its boundary?); walked anyway"
                )
                children.append((child, depth + 1, part, inner_bounds, [note], True))
        elif kind == "message":
            try:
                inner, note, raw, cte = _inner_message(entity, spans)
            except Exception as exc:
                inner, note, raw, cte = None, f"enclosed message not readable: {exc}", None, None
            if note:
                part._defects.append(note)
            part._inner_raw, part._inner_cte = raw, cte
            if inner is not None:
                children.append((inner, depth + 1, part, (), [], False))
        yield part  # after the look at its children, so part.defects is complete
        stack.extend(reversed(children))
