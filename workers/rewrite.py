"""Rebuilding a message body after the filter dropped, replaced or added parts.

Why not just flatten the stdlib tree again: the stdlib generator rewrites what it
did not need to touch (header spacing and folding, a blank line after a header-only
enclosed message, line ends), and bytes matter.  A nested multipart/signed entity
that the filter did not change must keep every byte, or its signature breaks.  So
the body is rebuilt from the spooled bytes:

* an entity nobody changed is copied byte for byte from the spool;
* a container with a change inside keeps its own header bytes, its preamble, its
  delimiter lines and its epilogue, and only the changed children are written anew;
* new and changed leaves are generated with the stdlib (CRLF line ends).

To copy a container's children, its body is split on its boundary exactly as the
stdlib's feedparser splits it (same delimiter regex, repeated delimiters merged, the
line end before a delimiter belonging to the delimiter), and the split is used only
if it yields the children the walk saw.  Where it does not (a multipart whose parts
the walk found hidden in an epilogue, or any other disagreement), that container is
generated from the parsed tree instead ("generated mode"): hidden parts become
regular parts and a boundary that repeats an enclosing one gets a fresh value, so
that the result parses the same for every reader.

Only the body goes into the new file (the MTA's replacebody replaces only the body).
Top-level headers that must change with it -- Content-Type when a new multipart
wraps the message or the root part is replaced, Content-Transfer-Encoding,
Content-Disposition, a missing MIME-Version -- come back as header actions.
"""

from __future__ import annotations

import base64
import codecs
import email.policy
import html as html_mod
import io
import os
import quopri
import re
from collections.abc import Iterator
from email.generator import BytesGenerator
from email.message import MIMEPart
from typing import TYPE_CHECKING, Any

from workers.parts import _CHARSET_ALIASES, _MIME_TYPE, Part, _boundary_bytes

if TYPE_CHECKING:
    from workers.message import Message

#: Output policy: CRLF (the spool's and SMTP's line end), source headers kept as
#: they are, headers defang writes folded at 78 columns.
POLICY = email.policy.default.clone(linesep="\r\n", refold_source="none")
CRLF = b"\r\n"
TOP_MIME_HEADERS = ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition")
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")  # feedparser's headerRE
_EOL = re.compile(rb"\r\n|\r|\n")
_BODY_TAG = re.compile(r"</body\s*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</html\s*>", re.IGNORECASE)
_IDENTITY_CTE = frozenset({"", "7bit", "8bit", "binary"})
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})


# --- new parts ------------------------------------------------------------------------


def _codec(charset: str) -> str:
    """The Python codec for a MIME charset name; raises LookupError."""
    name = charset.strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    return codecs.lookup(name).name


def _ascii_compatible(codec: str) -> bool:
    try:
        return "a-z.\r\n".encode(codec) == b"a-z.\r\n"
    except Exception:
        return False


def _text_cte(data: bytes) -> str:
    """7bit when it can be, else quoted-printable (always safe through any relay)."""
    if data.isascii() and max((len(line) for line in data.splitlines()), default=0) <= 998:
        return "7bit"
    return "quoted-printable"


def encode_body(data: bytes, cte: str) -> str:
    """``data`` encoded for ``cte``, as the ``str`` payload the stdlib generator writes."""
    if cte == "base64":
        return base64.encodebytes(data).decode("ascii")
    if cte == "quoted-printable":
        return quopri.encodestring(data.replace(b"\r\n", b"\n")).decode("ascii")
    return data.decode("ascii", "surrogateescape")  # 7bit / 8bit / binary: as is


def _set_header(entity: MIMEPart, name: str, value: str) -> None:
    if name in entity:
        entity.replace_header(name, value)
    else:
        entity[name] = value


def make_part(
    content: str | bytes,
    content_type: str = "text/plain",
    *,
    filename: str | None = None,
    charset: str = "utf-8",
    disposition: str | None = None,
) -> MIMEPart:
    """A new leaf entity.  Text is encoded in ``charset`` and sent 7bit or
    quoted-printable; bytes go base64 (text/* bytes are taken as already in
    ``charset``).  With a ``filename`` the disposition defaults to attachment."""
    if not isinstance(content, str | bytes):
        raise TypeError(f"content must be str or bytes, not {type(content).__name__}")
    if not isinstance(content_type, str) or not _MIME_TYPE.fullmatch(content_type.lower()):
        raise ValueError(f"content_type {content_type!r} is not a type/subtype")
    content_type = content_type.lower()
    maintype = content_type.split("/", 1)[0]
    if maintype in ("multipart", "message"):
        raise ValueError(f"a new part must be a leaf, not {content_type}")
    if filename is not None and (not isinstance(filename, str) or not filename or "\0" in filename
                                 or "\r" in filename or "\n" in filename):  # fmt: skip
        raise ValueError(f"filename {filename!r} must be non-empty text without CR, LF or NUL")
    disposition = disposition or ("attachment" if filename else "inline")
    if disposition not in ("attachment", "inline"):
        raise ValueError(f"disposition {disposition!r} must be attachment or inline")
    part = MIMEPart(policy=POLICY)
    part["Content-Type"] = content_type
    if maintype == "text":
        codec = _codec(charset)  # LookupError for an unknown charset: the filter's mistake
        data = content.encode(codec) if isinstance(content, str) else content
        part.set_param("charset", charset)
        cte = _text_cte(data) if _ascii_compatible(codec) else "base64"
    else:
        data = content.encode(_codec(charset)) if isinstance(content, str) else content
        cte = "base64"
    if filename:
        rfc2231 = None if filename.isascii() else "utf-8"
        part.set_param("name", filename, charset=rfc2231)
        part["Content-Disposition"] = disposition
        part.set_param("filename", filename, header="Content-Disposition", charset=rfc2231)
    else:
        part["Content-Disposition"] = disposition
    part["Content-Transfer-Encoding"] = cte
    part.set_payload(encode_body(data, cte))
    return part


def placeholder_part() -> MIMEPart:
    """An empty text/plain part: what is left of a multipart whose parts were all dropped."""
    part = MIMEPart(policy=POLICY)
    part["Content-Type"] = 'text/plain; charset="us-ascii"'
    part["Content-Transfer-Encoding"] = "7bit"
    part.set_payload("")
    return part


def warning_part(warnings: list[str]) -> MIMEPart:
    """One text/plain part holding every warning of the message."""
    text = "\n\n".join(w.rstrip("\n") for w in warnings) + "\n"
    part = make_part(text, "text/plain", charset="utf-8", disposition="inline")
    part["Content-Description"] = "Notice from the mail filter"
    return part


# --- boilerplate ------------------------------------------------------------------------


def html_snippet(text: str, html: str | None) -> str:
    """The HTML form of a boilerplate: ``html`` as given, else ``text`` escaped."""
    if html is not None:
        return html
    return "<p>" + html_mod.escape(text).replace("\n", "<br>\n") + "</p>"


def _insert_html(body: str, snippet: str, nl: str) -> str:
    """Before the last </body> (else the last </html>), else at the end."""
    for pattern in (_BODY_TAG, _HTML_TAG):
        matches = list(pattern.finditer(body))
        if matches:
            at = matches[-1].start()
            return body[:at] + snippet + nl + body[at:]
    sep = "" if not body or body.endswith(("\n", "\r")) else nl
    return body + sep + snippet + nl


def _append_text(body: str, text: str, nl: str) -> str:
    sep = "" if not body or body.endswith(("\n", "\r")) else nl
    return body + sep + text.replace("\r\n", "\n").replace("\n", nl) + nl


def with_boilerplate(entity: Any, data: bytes, addition: str, is_html: bool) -> tuple[MIMEPart, set[str]]:
    """A copy of the text leaf ``entity`` (decoded body ``data``) with ``addition``
    appended (text) or inserted before </body> (HTML); and the header names changed.

    The charset is kept where the text fits it (HTML uses character references for
    what does not fit); plain text that no longer fits is converted to UTF-8.  The
    transfer encoding is kept, except that 7bit becomes quoted-printable when the
    new text has 8-bit bytes or overlong lines.
    """
    changed: set[str] = set()
    declared = entity.get_content_charset() or "us-ascii"
    nl = "\r\n" if b"\r\n" in data else "\n"
    charset = declared
    try:
        codec = _codec(declared)
        text = data.decode(codec)
        new_text = _insert_html(text, addition, nl) if is_html else _append_text(text, addition, nl)
        try:
            new_data = new_text.encode(codec, "xmlcharrefreplace" if is_html else "strict")
        except UnicodeEncodeError:
            new_data = new_text.encode("utf-8")
            charset = "utf-8"
    except (LookupError, UnicodeError):
        # Bytes that are not valid in the declared charset (or an unknown charset):
        # keep them exactly, add the text in a form any ASCII-compatible charset reads.
        safe = addition.encode("ascii", "xmlcharrefreplace" if is_html else "replace")
        snl = nl.encode()
        if is_html:
            matches = list(re.finditer(rb"</body\s*>", data, re.IGNORECASE))
            if matches:
                at = matches[-1].start()
                new_data = data[:at] + safe + snl + data[at:]
            else:
                new_data = data + (b"" if not data or data.endswith((b"\n", b"\r")) else snl) + safe + snl
        else:
            new_data = data + (b"" if not data or data.endswith((b"\n", b"\r")) else snl)
            new_data += safe.replace(b"\r\n", b"\n").replace(b"\n", snl) + snl
    new = MIMEPart(policy=POLICY)
    new._headers = list(entity._headers)  # the original header lines, as parsed
    new.preamble, new.epilogue = entity.preamble, entity.epilogue
    if charset != declared:
        if "Content-Type" not in new:
            new["Content-Type"] = entity.get_content_type()
        new.set_param("charset", charset)
        changed.add("Content-Type")
    old_cte = str(entity.get("content-transfer-encoding", "")).strip().lower()
    cte = old_cte
    if old_cte not in ("base64", "quoted-printable", "8bit", "binary"):
        cte = "7bit" if _text_cte(new_data) == "7bit" and old_cte in ("", "7bit") else "quoted-printable"
    if cte != old_cte and not (old_cte == "" and cte == "7bit"):
        _set_header(new, "Content-Transfer-Encoding", cte)
        changed.add("Content-Transfer-Encoding")
    new.set_payload(encode_body(new_data, cte if cte else "7bit"))
    return new, changed


# --- splitting spooled bytes as the stdlib parser does ------------------------------------


def split_headers(buf: bytes, start: int, end: int) -> int:
    """Offset where the body of the entity in ``buf[start:end]`` starts.

    As the feedparser reads it: header lines are those that look like a field or a
    continuation; an empty line ends them (and is not part of the body); any other
    line ends them and starts the body.
    """
    pos = start
    while pos < end:
        m = _EOL.search(buf, pos, end)
        line_end = m.start() if m else end
        if line_end == pos:  # an empty line: the separator
            return m.end() if m else end
        if not _HEADER_LINE.match(buf, pos, line_end):
            return pos
        pos = m.end() if m else end
    return end


class Layout:
    """Where the parts of one multipart body lie in the spooled bytes.

    ``segments``: (delimiter start, part start, part end, segment end) per part;
    the bytes from part end to segment end are the line end that belongs to the
    next delimiter.  ``tail``: start of the close delimiter (the close delimiter
    and the epilogue run to the end), or None when it is missing.
    """

    __slots__ = ("segments", "tail")

    def __init__(self, segments: list[tuple[int, int, int, int]], tail: int | None) -> None:
        self.segments = segments
        self.tail = tail


def _eol_before(buf: bytes, pos: int, floor: int) -> int:
    if pos - 2 >= floor and buf[pos - 2 : pos] == CRLF:
        return 2
    if pos - 1 >= floor and buf[pos - 1 : pos] in (b"\r", b"\n"):
        return 1
    return 0


_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\r|\n|\Z)")


def _delimiters(buf: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """(line start, line end, is close) of each delimiter line in ``buf[start:end]``.

    The feedparser's test: a line that is ``--boundary``, optionally ``--``, then
    blanks.  Found with ``bytes.find`` on the literal (a regex with a look-behind
    first would scan a 5 MB body a hundred times slower).
    """
    needle = b"--" + boundary
    pos = start
    while (i := buf.find(needle, pos, end)) >= 0:
        if i == 0 or buf[i - 1] in (10, 13):  # at the start of a line
            m = _DELIMITER_TAIL.match(buf, i + len(needle), end)
            if m:
                yield i, m.end(), m.group(1) is not None
        pos = i + 1


def split_multipart(buf: bytes, start: int, end: int, boundary: bytes) -> Layout | None:
    """The parts of the multipart body ``buf[start:end]``; None without a start delimiter."""
    segments: list[tuple[int, int, int, int]] = []
    seg_start = part_start = -1
    for line_start, line_end, close in _delimiters(buf, start, end, boundary):
        if seg_start < 0:  # still in the preamble
            if close:
                return None  # a close delimiter before any delimiter: the stdlib sees no parts
            seg_start, part_start = line_start, line_end
            continue
        if line_start == part_start:  # repeated delimiter lines are one delimiter
            part_start = line_end
            continue
        part_end = line_start - _eol_before(buf, line_start, part_start)
        segments.append((seg_start, part_start, part_end, line_start))
        if close:
            return Layout(segments, line_start)
        seg_start, part_start = line_start, line_end
    if seg_start < 0:
        return None
    trailing = _eol_before(buf, end, part_start) if end > part_start else 0
    segments.append((seg_start, part_start, end - trailing, end))
    return Layout(segments, None)


# --- generating ----------------------------------------------------------------------------


def flatten(entity: Any) -> bytes:
    """Headers and body of ``entity`` with CRLF line ends."""
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=POLICY).flatten(entity)
    return buf.getvalue()


def flatten_body(entity: Any) -> bytes:
    """The body of ``entity`` as ``flatten`` writes it (the header section cut off;
    measured after flattening, which may have set a missing boundary)."""
    full = flatten(entity)
    return full[len(header_bytes(entity)) :]


def header_bytes(entity: Any) -> bytes:
    """The header section of ``entity`` as the stdlib writes it, with its empty line."""
    return b"".join(POLICY.fold_binary(k, v) for k, v in entity.raw_items()) + CRLF


def _lines(text: str) -> bytes:
    """Preamble or epilogue text with CRLF line ends, 8-bit bytes restored."""
    data = text.encode("ascii", "surrogateescape") if text else b""
    return _EOL.sub(CRLF, data)


def header_value(entity: Any, name: str) -> str:
    """The value of ``name`` as it would be written (encoded words, folded)."""
    folded = POLICY.fold(name, entity[name])
    return folded.split(":", 1)[1].lstrip(" \t").rstrip("\r\n")


def new_boundary() -> str:
    return f"defang-{os.urandom(12).hex()}"  # secrets.token_hex, without its import


def _keeps_eol(entity: Any) -> bool:
    """True when the stdlib would keep, inside ``entity``, the line end that precedes
    the next delimiter (so none may be added).

    The feedparser strips that line end from the last entity it created: a leaf's
    payload loses it (so one must be added after a leaf), a multipart's epilogue
    takes it, and an enclosed message passes it on to its own last entity; header
    blocks (message/delivery-status) and a multipart without parts keep it.
    """
    while True:
        payload = entity.get_payload()
        ctype = entity.get_content_type()
        if ctype.startswith("multipart/"):
            return True
        if ctype in _MESSAGE_TYPES and isinstance(payload, list) and payload:
            entity = payload[0]
            continue
        return isinstance(payload, list)


def _with_eol(chunk: bytes, entity: Any) -> bytes:
    """``chunk`` (the bytes of ``entity``) ready to be followed by a delimiter line."""
    if chunk.endswith((b"\n", b"\r")) and _keeps_eol(entity):
        return chunk
    return chunk + CRLF


class _Writer:
    """A file-like sink that remembers whether the output ends at a line end."""

    __slots__ = ("f", "at_line_start")

    def __init__(self, f: Any) -> None:
        self.f = f
        self.at_line_start = True

    def write(self, data: bytes) -> None:
        if data:
            self.f.write(data)
            self.at_line_start = data[-1:] in (b"\n", b"\r")


# --- the rebuild ------------------------------------------------------------------------------


class Rebuild:
    """One message's edits applied to its spooled bytes.

    ``write_body(f)`` writes the new body; ``header_actions`` are the top-level header
    changes it needs.  Used once, after the hooks (see ``rebuild``).
    """

    def __init__(self, msg: Message, spool: bytes, body_start: int) -> None:
        self.msg = msg
        self.buf = spool
        self.body_start = body_start
        self.parts: list[Part] = msg.parts
        self.root = self.parts[0]
        self.header_actions: list[list[Any]] = []
        self.dropped: set[Part] = set()
        self.new: dict[Part, Any] = {}  # part -> entity that takes its place
        self.changed_headers: dict[Part, set[str]] = {}
        self.dirty: set[Part] = set()
        self._boundaries: dict[Part, bytes] = {}
        self.added = list(msg._added)
        if msg._warnings:
            self.added.append(warning_part(msg._warnings))
        self._resolve()

    # --- what happens to which part

    def _resolve(self) -> None:
        for part in self.parts:  # document order: a container's edit comes first
            if self._removed(part.parent):
                continue
            edit = part._edit
            if edit is None:
                continue
            target = part
            parent = part.parent
            # an enclosed message is replaced or dropped together with its container
            if parent is not None and parent.is_multipart and parent.content_type in _MESSAGE_TYPES:
                target = parent
            if edit[0] == "drop":
                self.dropped.add(target)
            else:
                self.new[target] = edit[1]
                if edit[0] == "modify" and target is part:
                    self.changed_headers[target] = edit[2]
        # a multipart left without parts goes too (the message itself gets a placeholder)
        for part in reversed(self.parts):
            if part.is_multipart and part.children and part is not self.root and not self._removed(part):
                if all(c in self.dropped for c in part.children):
                    self.dropped.add(part)
        if self.root in self.dropped:
            self.dropped.discard(self.root)
            self.new[self.root] = placeholder_part()
        for part in list(self.dropped) + list(self.new):
            node: Part | None = part
            while node is not None:
                self.dirty.add(node)
                node = node.parent
        if self.added:
            self.dirty.add(self.root)

    def _removed(self, part: Part | None) -> bool:
        """True when ``part`` or a container around it is dropped or replaced."""
        while part is not None:
            if part in self.dropped or part in self.new:
                return True
            part = part.parent
        return False

    # --- the top level

    def write_body(self, f: Any) -> None:
        out = _Writer(f)
        root, buf = self.root, self.buf
        replacement = self.new.get(root)
        mixed = root.content_type == "multipart/mixed" and root.is_multipart
        if replacement is not None and not self.added:
            out.write(flatten_body(replacement))
            names = self.changed_headers.get(root, set(TOP_MIME_HEADERS))
            self._top_headers(replacement, names)
        elif replacement is not None:
            self._wrap(out, flatten(replacement), replacement)
        elif self.added and mixed:
            self._body(root, buf, self.body_start, len(buf), out, self.added)
        elif self.added:
            head = b"".join(name.encode("latin-1") + b": " + value + CRLF
                            for name, value in self.msg.raw_headers
                            if name.lower().startswith("content-"))  # fmt: skip
            first = io.BytesIO()
            first.write(head + CRLF)
            self._body(root, buf, self.body_start, len(buf), _Writer(first))
            self._wrap(out, first.getvalue(), root.email)
        else:
            self._body(root, buf, self.body_start, len(buf), out)

    def _wrap(self, out: _Writer, first: bytes, first_entity: Any) -> None:
        """A new multipart/mixed around the old body (``first``) and the added parts."""
        boundary = new_boundary().encode()
        out.write(b"This is a multi-part message in MIME format." + CRLF)
        chunks = [_with_eol(first, first_entity)] + [flatten(e) + CRLF for e in self.added]
        for chunk in chunks:
            out.write(b"--" + boundary + CRLF)
            out.write(chunk)
        out.write(b"--" + boundary + b"--" + CRLF)
        wrapper = MIMEPart(policy=POLICY)
        wrapper["Content-Type"] = "multipart/mixed"
        wrapper.set_param("boundary", boundary.decode())
        self._top_headers(wrapper, set(TOP_MIME_HEADERS))

    def _top_headers(self, entity: Any, names: set[str]) -> None:
        """Header actions that make the top-level headers match ``entity``'s.

        A header that is new goes to the top of the header section (insert_header 0),
        not the end: a reader that stops at a malformed header line (the stdlib
        does) must still see it.
        """
        msg = self.msg
        inserts: list[tuple[str, str]] = []
        if "Content-Type" in names and msg.get_header("MIME-Version") is None:
            inserts.append(("MIME-Version", "1.0"))
        for name in TOP_MIME_HEADERS:
            if name not in names:
                continue
            had = msg.get_all_headers(name)
            if name in entity:
                value = header_value(entity, name)
                if not had:
                    inserts.append((name, value))
                elif had[0] != value:
                    self.header_actions.append(["change_header", name, value, 1])
            elif had:
                self.header_actions.extend(["delete_header", name, i] for i in range(len(had), 0, -1))
        for name, value in reversed(inserts):  # each goes on top: reversed keeps the order
            self.header_actions.append(["insert_header", 0, name, value])

    # --- copying what can be copied

    def _entity(self, part: Part, buf: bytes, start: int, end: int, out: _Writer) -> None:
        """A whole entity (headers and body) that lies at ``buf[start:end]``."""
        if part not in self.dirty:
            out.write(buf[start:end])
            return
        replacement = self.new.get(part)
        if replacement is not None:
            out.write(flatten(replacement))
            return
        body = split_headers(buf, start, end)
        out.write(buf[start:body])
        self._body(part, buf, body, end, out)

    def _body(self, part: Part, buf: bytes, start: int, end: int, out: _Writer,
              added: list[Any] | tuple[Any, ...] = ()) -> None:  # fmt: skip
        """The body of a container (or of an untouched leaf) at ``buf[start:end]``."""
        if part not in self.dirty:
            out.write(buf[start:end])
            return
        if part.is_multipart and part.content_type.startswith("multipart/"):
            boundary = _boundary_bytes(part.head)
            layout = split_multipart(buf, start, end, boundary) if boundary else None
            if layout is None or any(c.hidden for c in part.children) or \
                    len(layout.segments) != len(part.children):  # fmt: skip
                out.write(self._gen_body(part, added))
                return
            out.write(buf[start : layout.segments[0][0]])
            kept = 0
            for child, (seg, cstart, cend, seg_end) in zip(part.children, layout.segments, strict=True):
                if child in self.dropped:
                    continue
                out.write(buf[seg:cstart])
                self._entity(child, buf, cstart, cend, out)
                out.write(buf[cend:seg_end])
                kept += 1
            extra = list(added) or ([] if kept else [placeholder_part()])
            if extra and not out.at_line_start:
                out.write(CRLF)
            for entity in extra:
                out.write(b"--" + boundary + CRLF + flatten(entity) + CRLF)
            if layout.tail is not None:
                out.write(buf[layout.tail : end])
            elif extra or part.children[-1] in self.dropped:
                # No close delimiter, and what ran to the end is gone: close it now, so
                # that the part before keeps its bytes.
                out.write(b"--" + boundary + b"--" + CRLF)
            return
        if part.is_multipart and part.children:  # an enclosed message
            inner = part.children[0]
            if part._inner_raw is not None:
                sub = io.BytesIO()
                self._entity(inner, part._inner_raw, 0, len(part._inner_raw), _Writer(sub))
                out.write(_lines(encode_body(sub.getvalue(), part._inner_cte or "base64")))
            else:
                self._entity(inner, buf, start, end, out)
            return
        out.write(buf[start:end])

    # --- generating what cannot be copied

    def _boundary(self, part: Part) -> bytes:
        """The boundary to write for ``part``: its own, unless it is missing or repeats
        the boundary of a multipart around it (then a new one)."""
        if part in self._boundaries:
            return self._boundaries[part]
        own = _boundary_bytes(part.head)
        outer: set[bytes] = set()
        node = part.parent
        while node is not None:
            if node.content_type.startswith("multipart/"):
                outer.add(self._boundaries.get(node) or _boundary_bytes(node.head) or b"")
            node = node.parent
        if not own or own in outer:
            own = new_boundary().encode()
        self._boundaries[part] = own
        return own

    def _gen_entity(self, part: Part) -> bytes:
        if part not in self.dirty:
            return flatten(part.email)
        replacement = self.new.get(part)
        if replacement is not None:
            return flatten(replacement)
        if part.is_multipart and part.content_type.startswith("multipart/"):
            boundary = self._boundary(part)
            head = part.email
            if _boundary_bytes(head) != boundary:
                head = MIMEPart(policy=POLICY)
                head._headers = list(part.email._headers)
                head.set_param("boundary", boundary.decode())
            return header_bytes(head) + self._gen_body(part)
        return header_bytes(part.email) + self._gen_body(part)

    def _gen_body(self, part: Part, added: list[Any] | tuple[Any, ...] = ()) -> bytes:
        if part not in self.dirty:
            return flatten_body(part.email)
        if part.is_multipart and part.content_type.startswith("multipart/"):
            boundary = self._boundary(part)
            if part is self.root and _boundary_bytes(part.head) != boundary:
                head = MIMEPart(policy=POLICY)
                head._headers = list(part.email._headers)
                head.set_param("boundary", boundary.decode())
                self._top_headers(head, {"Content-Type"})
            out = bytearray()
            if part.email.preamble is not None:
                out += _lines(part.email.preamble) + CRLF
            chunks = [_with_eol(self._gen_entity(c), self.new.get(c) or c.email) for c in part.children
                      if c not in self.dropped]  # fmt: skip
            chunks += [flatten(e) + CRLF for e in added]
            if not chunks:
                chunks = [flatten(placeholder_part()) + CRLF]
            for chunk in chunks:
                out += b"--" + boundary + CRLF + chunk
            out += b"--" + boundary + b"--" + CRLF
            hidden = any(c.hidden for c in part.children)
            if part.email.epilogue and not hidden:  # an epilogue that held parts is not kept
                out += _lines(part.email.epilogue)
            return bytes(out)
        if part.is_multipart and part.children:
            data = self._gen_entity(part.children[0])
            if part._inner_raw is not None:
                return _lines(encode_body(data, part._inner_cte or "base64"))
            return data
        return flatten_body(part.email)


def body_offset(spool: bytes) -> int:
    """Where the body starts in a spool file: after the header section and its empty
    line, found as ``workers.message.read_header_section`` finds it."""
    if spool[:2] == CRLF:
        return 2
    if spool[:1] == b"\n":
        return 1
    found = [(i, n) for i, n in ((spool.find(b"\n\r\n"), 3), (spool.find(b"\n\n"), 2)) if i >= 0]
    if not found:
        return len(spool)
    at, n = min(found)
    return at + n


def rebuild(msg: Message, path: str) -> list[list[Any]]:
    """Write ``msg``'s new body to ``path``; return the actions for the reply.

    The actions are the top-level header changes the new body needs, then
    ``["replace_body", path]``.  The file is written completely (and flushed)
    before the reply names it.
    """
    with open(msg.path, "rb") as f:
        spool = f.read()
    job = Rebuild(msg, spool, body_offset(spool))
    with open(path, "wb") as f:
        job.write_body(f)
    return [*job.header_actions, ["replace_body", path]]
