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

import hashlib
import io
import os
from email.message import MIMEPart
from typing import Any, Protocol

from defang.workers.mime.mimesplit import split_headers, split_multipart
from defang.workers.mime.newparts import (
    CRLF,
    POLICY,
    crlf_lines,
    encode_body,
    flatten,
    flatten_body,
    header_bytes,
    header_value,
    placeholder_part,
    warning_part,
)
from defang.workers.mime.part import SIGNED_TYPES, Part
from defang.workers.mime.text import boundary_bytes

TOP_MIME_HEADERS = ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition")
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_Entities = list[Any] | tuple[Any, ...]  # new parts (stdlib entities) to write


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


class Edits(Protocol):
    """What the rebuild needs of a message: the spool file, the walked parts (with the
    edits the part actions recorded on them), the parts added at the end, the warnings
    for the warning part (``warnings_first``: it goes first), whether every container is
    to be rewritten (``rebuild_all``), and the header section as received.
    ``defang.workers.api.message.Message`` is one."""

    path: str
    parts: list[Part]
    added_parts: list[Any]
    warnings: list[str]
    warnings_first: bool
    rebuild_all: bool
    raw_headers: list[tuple[str, bytes]]

    def get_all_headers(self, name: str) -> list[str]: ...


class Rebuild:
    """One message's edits applied to its spooled bytes.

    ``write_body(f)`` writes the new body; ``header_actions`` are the top-level header
    changes it needs.  Used once, after the hooks (see ``rebuild``).
    """

    def __init__(self, edits: Edits, spool: bytes, body_start: int) -> None:
        self.msg = edits
        self.buf = spool
        self.body_start = body_start
        self.parts: list[Part] = edits.parts
        self.root = self.parts[0]
        self.header_actions: list[list[Any]] = []
        self.dropped: set[Part] = set()
        self.new: dict[Part, Any] = {}  # part -> entity that takes its place
        self.changed_headers: dict[Part, set[str]] = {}
        self.dirty: set[Part] = set()
        self._boundaries: dict[Part, bytes] = {}
        self._seed: bytes | None = None
        self.rewrote = False  # bytes written that are not a copy of the spool's
        self.added = list(edits.added_parts)
        self.leading: list[Any] = []  # new parts that go before the first one (a warning first)
        if edits.warnings:
            (self.leading if edits.warnings_first else self.added).append(warning_part(edits.warnings))
        self._resolve()

    def _new_boundary(self) -> bytes:
        """A boundary for a new multipart: from a digest of the message (no sender can put
        the digest of a message inside it), so the same message is rebuilt to the same
        bytes every time (``defang replay`` compares them)."""
        if self._seed is None:
            self._seed = hashlib.sha256(self.buf).digest()
        self._seed = hashlib.sha256(self._seed).digest()
        return b"defang-" + self._seed[:12].hex().encode()

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
        if self.added or self.leading:
            self.dirty.add(self.root)
        if self.msg.rebuild_all:  # every container re-split; one that disagrees is generated
            for part in self.parts:
                signed = part.content_type in SIGNED_TYPES or part.signed_container is not None
                up: Part | None = part if part.is_multipart and not signed else None
                while up is not None:
                    self.dirty.add(up)
                    up = up.parent

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
        extra = self.added or self.leading
        if replacement is not None and not extra:
            out.write(flatten_body(replacement))
            names = self.changed_headers.get(root, set(TOP_MIME_HEADERS))
            self._top_headers(replacement, names)
        elif replacement is not None:
            self._wrap(out, flatten(replacement), replacement)
        elif extra and mixed:
            self._body(root, buf, self.body_start, len(buf), out, self.added, self.leading)
        elif extra:
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
        boundary = self._new_boundary()
        out.write(b"This is a multi-part message in MIME format." + CRLF)
        chunks = [flatten(e) + CRLF for e in self.leading] + [_with_eol(first, first_entity)]
        chunks += [flatten(e) + CRLF for e in self.added]
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
        if "Content-Type" in names and not msg.get_all_headers("MIME-Version"):
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
              added: _Entities = (), leading: _Entities = ()) -> None:  # fmt: skip
        """The body of a container (or of an untouched leaf) at ``buf[start:end]``."""
        if part not in self.dirty:
            out.write(buf[start:end])
            return
        if part.is_multipart and part.content_type.startswith("multipart/"):
            boundary = boundary_bytes(part.head)
            layout = split_multipart(buf, start, end, boundary) if boundary else None
            if layout is None or any(c.hidden for c in part.children) or \
                    len(layout.segments) != len(part.children):  # fmt: skip
                self.rewrote = True
                out.write(self._gen_body(part, added, leading))
                return
            out.write(buf[start : layout.segments[0][0]])
            for entity in leading:  # after the preamble (which ends at a line end), before the first part
                out.write(b"--" + boundary + CRLF + flatten(entity) + CRLF)
            kept = len(leading)
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
            elif extra or part.children[-1] in self.dropped or self.msg.rebuild_all:
                # No close delimiter, and what ran to the end is gone: close it now, so
                # that the part before keeps its bytes.
                self.rewrote = True
                out.write(b"--" + boundary + b"--" + CRLF)
            return
        if part.is_multipart and part.children:  # an enclosed message
            inner = part.children[0]
            if part._inner_raw is not None:
                self.rewrote = True  # encoded anew
                sub = io.BytesIO()
                self._entity(inner, part._inner_raw, 0, len(part._inner_raw), _Writer(sub))
                out.write(crlf_lines(encode_body(sub.getvalue(), part._inner_cte or "base64")))
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
        own = boundary_bytes(part.head)
        outer: set[bytes] = set()
        node = part.parent
        while node is not None:
            if node.content_type.startswith("multipart/"):
                outer.add(self._boundaries.get(node) or boundary_bytes(node.head) or b"")
            node = node.parent
        if not own or own in outer:
            own = self._new_boundary()
        self._boundaries[part] = own
        return own

    def _gen_entity(self, part: Part) -> bytes:
        # a multipart the parser read as a leaf (its first delimiter is an outer one's)
        # keeps no boundary that an outer multipart uses: readers would disagree again
        clash = part.content_type.startswith("multipart/") and not part.is_multipart and \
            boundary_bytes(part.head) not in (None, self._boundary(part))  # fmt: skip
        if part not in self.dirty and not clash:
            return flatten(part.email)
        replacement = self.new.get(part)
        if replacement is not None:
            return flatten(replacement)
        if part.content_type.startswith("multipart/") and (part.is_multipart or clash):
            boundary = self._boundary(part)
            head = part.email
            if boundary_bytes(head) != boundary:
                head = MIMEPart(policy=POLICY)
                head._headers = list(part.email._headers)
                head.set_param("boundary", boundary.decode())
            return header_bytes(head) + self._gen_body(part)
        return header_bytes(part.email) + self._gen_body(part)

    def _gen_body(self, part: Part, added: _Entities = (), leading: _Entities = ()) -> bytes:
        if part not in self.dirty:
            return flatten_body(part.email)
        if part.is_multipart and part.content_type.startswith("multipart/"):
            boundary = self._boundary(part)
            if part is self.root and boundary_bytes(part.head) != boundary:
                head = MIMEPart(policy=POLICY)
                head._headers = list(part.email._headers)
                head.set_param("boundary", boundary.decode())
                self._top_headers(head, {"Content-Type"})
            out = bytearray()
            if part.email.preamble is not None:
                out += crlf_lines(part.email.preamble) + CRLF
            chunks = [flatten(e) + CRLF for e in leading]
            chunks += [_with_eol(self._gen_entity(c), self.new.get(c) or c.email) for c in part.children
                       if c not in self.dropped]  # fmt: skip
            chunks += [flatten(e) + CRLF for e in added]
            if not chunks:
                chunks = [flatten(placeholder_part()) + CRLF]
            for chunk in chunks:
                out += b"--" + boundary + CRLF + chunk
            out += b"--" + boundary + b"--" + CRLF
            hidden = any(c.hidden for c in part.children)
            if part.email.epilogue and not hidden:  # an epilogue that held parts is not kept
                out += crlf_lines(part.email.epilogue)
            return bytes(out)
        if part.is_multipart and part.children:
            data = self._gen_entity(part.children[0])
            if part._inner_raw is not None:
                return crlf_lines(encode_body(data, part._inner_cte or "base64"))
            return data
        return flatten_body(part.email)


def body_offset(spool: bytes) -> int:
    """Where the body starts in a spool file: after the header section and its empty
    line, found as ``defang.workers.api.headers.read_header_section`` finds it."""
    if spool[:2] == CRLF:
        return 2
    if spool[:1] == b"\n":
        return 1
    found = [(i, n) for i, n in ((spool.find(b"\n\r\n"), 3), (spool.find(b"\n\n"), 2)) if i >= 0]
    if not found:
        return len(spool)
    at, n = min(found)
    return at + n


def rebuild(msg: Edits, path: str) -> list[list[Any]]:
    """Write ``msg``'s new body to ``path``; return the actions for the reply.

    The actions are the top-level header changes the new body needs, then
    ``["replace_body", path]``.  The file is written completely (and flushed)
    before the reply names it.  None when only ``rebuild_all`` was asked and the new
    body is the old one byte for byte.
    """
    with open(msg.path, "rb") as f:
        spool = f.read()
    job = Rebuild(msg, spool, body_offset(spool))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)  # never via a link
    with os.fdopen(fd, "wb") as f:
        job.write_body(f)
    if msg.rebuild_all and not (job.dropped or job.new or job.added or job.leading or job.rewrote
                                or job.header_actions):  # fmt: skip
        os.unlink(path)  # rebuild() found nothing ambiguous: every byte was copied, the MTA keeps its own
        return []
    return [*job.header_actions, ["replace_body", path]]
