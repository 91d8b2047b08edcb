"""Text from mail's bytes, read as leniently as mail clients read it.

Text from raw bytes (8-bit header bytes, unknown charsets) is decoded as UTF-8 where
it is valid and byte by byte as Windows-1252 (Latin-1 for its five holes) where it is
not: never a lone surrogate that would break logging or JSON, and legacy Latin-1
names stay readable ("Frösche", not "Fr\\ufffdsche").  RFC 2047 encoded words and
RFC 2231 parameters are decoded leniently too: a filename the stdlib cannot read (an
unquoted encoded-word, raw 8-bit bytes, a bad encoded word) is read again from the raw
header here.  Nothing here raises on bad input.
"""

from __future__ import annotations

import binascii
import codecs
import re
import urllib.parse
from email.message import Message as EmailMessage

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

SURROGATE = re.compile("[\ud800-\udfff]")

# charsets mail uses that Python does not know by these names
CHARSET_ALIASES = {
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
    if not SURROGATE.search(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return SURROGATE.sub("\ufffd", text)
    return lenient_text(raw)


def decode_charset(data: bytes, charset: str | None) -> str:
    """``data`` in the declared ``charset``, falling back leniently; never raises."""
    name = (charset or "").strip().strip('"').lower()
    name = CHARSET_ALIASES.get(name, name)
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


_TOKEN = r"[!#$%&'*+\-.^_`{|}~0-9a-z]+"
#: a MIME type as ``type/subtype`` (lower case)
MIME_TYPE = re.compile(_TOKEN + "/" + _TOKEN)


def boundary_bytes(entity: EmailMessage) -> bytes | None:
    """The boundary parameter of a multipart entity, as bytes; None if it has none."""
    try:
        boundary = entity.get_boundary()
    except Exception:
        return None
    return boundary.encode("utf-8", "surrogateescape") if boundary else None
