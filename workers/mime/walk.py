"""The part walk: every MIME entity of a message in document order, as ``Part`` objects.

The stdlib's reading of malformed mail can hide what a mail client would show (see
ARCHITECTURE.md, "Where parsers disagree").  The rule here: no attachment invisible to
the filter.  So the walk looks again where the stdlib hides things, and says so in
``part.defects``:

* parts after the close delimiter of a multipart whose nested multipart reused its
  boundary land in the stdlib's epilogue: they are parsed from there and walked;
* a ``message/rfc822`` part sent base64 or quoted-printable encoded (illegal, but
  seen) is parsed by the stdlib as text: it is decoded and the message inside walked;
* files hidden inside a text/plain part (uuencode, yEnc, BinHex) or inside a winmail.dat
  are walked as parts below it, ``part.embedded`` saying how (``defang.workers.mime.embedded``).

Filenames the stdlib cannot read are ``Part``'s business (``defang.workers.mime.part``).
"""

from __future__ import annotations

import quopri
import re
from collections.abc import Iterator
from email.message import Message as EmailMessage
from email.parser import BytesParser
from typing import Any

from defang.workers.mime.embedded import find_in_text, find_in_tnef
from defang.workers.mime.limits import MimeLimitError, MimeLimits, exceeds
from defang.workers.mime.mailpolicy import POLICY
from defang.workers.mime.part import CONTAINER_MESSAGES, Part, as_bytes
from defang.workers.mime.skeleton import Spans
from defang.workers.mime.text import b64_lenient, boundary_bytes

_PARSER = BytesParser(policy=POLICY)
#: the headers every embedded file's part reads (its name and bytes are set on the part)
_HIDDEN_ENTITY = _PARSER.parsebytes(b"Content-Type: application/octet-stream\r\n"
                                    b"Content-Disposition: attachment\r\n\r\n")  # fmt: skip


def _container_kind(entity: EmailMessage) -> str | None:
    """ "multipart", "message" or None (a leaf) as far as the walk is concerned."""
    if not entity.is_multipart():
        return None
    if entity.get_content_maintype() == "multipart":
        return "multipart"
    if entity.get_content_type() in CONTAINER_MESSAGES:
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
                encoded = as_bytes(inner)
            raw = b64_lenient(encoded)
        else:
            raw = quopri.decodestring(as_bytes(inner))
        decoded = _PARSER.parsebytes(raw)
    except Exception as exc:
        return inner, f"{entity.get_content_type()} with {cte} encoding not decodable: {exc}", None, None
    note = (
        f"{entity.get_content_type()} sent with Content-Transfer-Encoding "
        f"{cte} (not allowed); decoded and walked"
    )
    return decoded, note, raw, cte


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
    blow the stack of a worker.  With ``limits``, passing ``max_parts`` (the entities
    below the message: every part, containers and files found in text parts included,
    the message itself not: a multipart/mixed of N attachments is N parts),
    ``max_depth`` or ``max_decoded_size`` (estimated from the encoded sizes) raises
    ``MimeLimitError`` and ends the walk.  ``owner`` is the message whose actions
    the parts record (None: parts without actions).  ``spans``: the bodies of ``root``
    still in the spool file (``defang.workers.mime.skeleton``), read in when a part's body is read.
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
            if exceeds(index, limits.max_parts):  # index = the parts before it, the message not counted
                raise MimeLimitError("max_parts", index, limits.max_parts)
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
            boundary = boundary_bytes(entity)
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
        if kind is None and owner is not None:
            for hidden_file in _embedded_parts(part, limits, owner, spans):
                if limits is not None and exceeds(index, limits.max_parts):
                    raise MimeLimitError("max_parts", index, limits.max_parts)
                hidden_file.index = index
                index += 1
                yield hidden_file
        stack.extend(reversed(children))


def _embedded_parts(carrier: Part, limits: MimeLimits | None, owner: Any, spans: Spans | None) -> list[Part]:
    """The files hidden in a text/plain part or a winmail.dat (``defang.workers.mime.embedded``),
    as parts below it.  Only for walks with an owner: the filter's walk, not the rebuild's."""
    ctype = carrier.content_type
    if ctype == "application/ms-tnef" or (carrier.filename or "").lower() == "winmail.dat":
        found, problem = find_in_tnef(carrier.payload)
        if problem:
            carrier._defects.append(problem)
    elif ctype == "text/plain" and not carrier.is_attachment:  # a body, as mail clients read it
        found = find_in_text(carrier.payload, limits.max_decoded_size if limits is not None else 0)
    else:
        return []
    out = []
    for e in found:
        part = Part(_HIDDEN_ENTITY, depth=carrier.depth + 1, index=0, parent=carrier, is_multipart=False,
                    defects=[f"{e.kind} file inside part {carrier.index} ({carrier.content_type})"],
                    owner=owner, limits=limits)  # fmt: skip
        part.hidden, part.embedded, part._span = True, e.kind, (e.start, e.end)
        part._payload, part._filename = e.data, e.filename
        out.append(part)
    return out
