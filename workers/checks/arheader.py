"""The Authentication-Results header (RFC 8601): reading who claims to have written one,
and writing ours.

Reading: RFC 8601 §5 asks a receiver to remove every Authentication-Results that claims
its authserv-id, however it is written: with a version (``mx.example 1;``), a comment
(``(x) mx.example;``), as a quoted-string (``"mx.example";``, ``"mx.exa\\mple"``).  The
authserv-id is read by authres' parser; authres refuses a quoted authserv-id (RFC 8601
allows it: ``value`` is a token or a quoted-string), so for a header it cannot read the
grammar's first element is read here (CFWS, then the token or quoted-string, quoted
pairs undone): a header neither reads is never ours, and a downstream reader's parser
cannot read it either.

Writing: authres' result objects, with the values it gets wrong made right first
(``smtp.mailfrom`` with a local part that is not a dot-atom is a quoted-string: authres
leaves any value with an ``@`` bare, and ``x;dkim=pass@evil`` would read as a second
result), comments reduced to ``ctext``, and the header folded before 78 characters
(RFC 5322 §2.1.1), one result per line.
"""

from __future__ import annotations

import re
from typing import Any

import authres
import authres.arc
import authres.dmarc

NAME = "Authentication-Results"
LINE = 78
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?\Z")
_TOKEN_END = set(' \t()<>@,;:\\"/[]?=')


def authserv_id(value: str) -> str | None:
    """The authserv-id of an Authentication-Results value, lowercase; None when it has none
    that RFC 8601's grammar reads."""
    text = re.sub(r"\r?\n(?=[ \t])", "", value)
    try:
        return str(authres.AuthenticationResultsHeader.parse_value(text).authserv_id).lower()
    except Exception:  # authres' SyntaxError, and anything else it raises on hostile text
        return _first_value(text)


def _first_value(text: str) -> str | None:
    """``[CFWS] value``: skip whitespace and (nested) comments, then read a quoted-string
    (quoted pairs undone) or a token."""
    i, depth = 0, 0
    while i < len(text):
        c = text[i]
        if depth and c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and c not in " \t":
            break
        i += 1
    if i >= len(text):
        return None
    if text[i] == '"':
        out, i = [], i + 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            out.append(text[i])
            i += 1
        return "".join(out).strip().lower() if i < len(text) else None
    end = i
    while end < len(text) and text[end] not in _TOKEN_END and 32 < ord(text[end]) < 127:
        end += 1
    return text[i:end].lower() or None


def claims(value: str, ours: str) -> bool:
    """Whether an Authentication-Results value says ``ours`` wrote it."""
    return authserv_id(value) == ours.lower()


def ctext(text: str, limit: int = 120) -> str | None:
    """A comment's text: printable ASCII without parentheses or backslashes, short."""
    clean = " ".join("".join(c if 32 <= ord(c) < 127 and c not in "()\\" else " " for c in text).split())
    return clean[:limit] or None


def _quoted(text: str) -> str:
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def address_pvalue(address: str) -> str:
    """``[local-part "@"] domain-name`` as RFC 8601's pvalue: a local part that is not a
    dot-atom quoted, an address whose domain is not a domain name quoted whole."""
    address = "".join(c for c in address if 32 <= ord(c) < 127)
    local, at, domain = address.rpartition("@")
    if not at:
        return address if _DOMAIN.match(address) else _quoted(address)
    if not _DOMAIN.match(domain):
        return _quoted(address)
    return f"{local if _DOT_ATOM.match(local) else _quoted(local)}@{domain}"


def fold(name: str, items: list[str], limit: int = LINE) -> str:
    """``items`` (the authserv-id, then each result, ";" between them) as a header value
    folded before ``limit`` characters: each result on its own line, a long one broken at
    its spaces (folding only inserts line breaks before white space, RFC 5322 §2.2.3)."""
    lines = [items[0] + (";" if len(items) > 1 else "")]
    for n, item in enumerate(items[1:], start=2):
        words = (item + (";" if n < len(items) else "")).split(" ")
        line = "\t" + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > limit:
                lines.append(line)
                line = "\t" + word
            else:
                line += " " + word
        lines.append(line)
    first = f"{name}: {lines[0]}"
    assert len(first) <= limit or " " not in lines[0], "an authserv-id is one word"
    return "\n".join(lines)


def header_value(serv_id: str, results: list[Any]) -> str:
    """The folded value of an Authentication-Results header by ``serv_id`` (authres result
    objects, in order); ``none`` without results."""
    items = [authres.core.QuotableValue(serv_id).quote_if_needed()]
    items += [str(r) for r in results] or ["none"]
    return fold(NAME, items)


class _Written(authres.core.QuotableValue):
    """A pvalue already in RFC 8601's form: authres must not quote it again."""

    def quote_if_needed(self) -> str:
        return str(self)


def spf_result(result: str, scope: str, identity: str, comment: str) -> Any:
    value = identity if scope == "mailfrom" else identity.partition("@")[2]
    r = authres.SPFAuthenticationResult(result=result, result_comment=ctext(comment),
                                        **{f"smtp_{scope}": value or "unknown"})  # fmt: skip
    for prop in r.properties:
        prop.value = _Written(address_pvalue(str(prop.value)))
    return r


def dkim_result(result: str, domain: str, selector: str, comment: str) -> Any:
    return authres.DKIMAuthenticationResult(result=result, header_d=domain or None, header_s=selector or None,
                                            result_comment=ctext(comment))  # fmt: skip


def arc_result(result: str, comment: str) -> Any:
    return authres.arc.ARCAuthenticationResult(result=result, result_comment=ctext(comment))


def dmarc_result(result: str, from_domain: str, policy: str, comment: str) -> Any:
    return authres.dmarc.DMARCAuthenticationResult(result=result, header_from=from_domain or None,
                                                   policy=policy.upper() or None,
                                                   result_comment=ctext(comment))  # fmt: skip
