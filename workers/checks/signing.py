"""DKIM signing and ARC sealing (dkimpy) of the message as it will leave the MTA.

A signature must cover what leaves, not what arrived: the headers after every edit the
filter asked for, the body after a rebuild.  ``final_message`` computes those bytes the
way the MTA applies a milter's edits (Postfix, Sendmail): ``add_header`` appends,
``insert_header`` puts the header at an index (0 = before the first; the MTA's own
Received header, which the milter sees, counts), ``change_header`` replaces the n-th
header of that name and an empty value (or ``delete_header``) removes it; a
``replace_body`` file is the body.  ``sign`` and ``seal`` then return the headers to
insert at the top, folded as dkimpy folds them (the front end passes the folds to the
MTA as LF + TAB, which it writes back as CRLF + TAB).

The keys are read once per worker (``Keys``): a PEM file per domain and selector, named
in ``[dkim]`` and ``[arc]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim


class SigningError(Exception):
    """No key for the domain, or the key cannot be used; the text says which."""


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    path: str


@dataclass
class Keys:
    """The signing keys of ``[dkim] keys`` and ``[arc]``, loaded on first use."""

    dkim: dict[str, Key] = field(default_factory=dict)  # domain (lowercase) -> key
    arc: Key | None = None
    _pem: dict[str, bytes] = field(default_factory=dict)

    def pem(self, key: Key) -> bytes:
        if key.path not in self._pem:
            try:
                data = Path(key.path).read_bytes()
            except OSError as exc:
                raise SigningError(f"key for {key.domain} ({key.path}): {exc.strerror}") from None
            if b"PRIVATE KEY" not in data:
                raise SigningError(f"key for {key.domain} ({key.path}): not a PEM private key")
            self._pem[key.path] = data
        return self._pem[key.path]

    def for_domain(self, domain: str) -> Key:
        key = self.dkim.get(domain.lower())
        if key is None:
            known = ", ".join(sorted(self.dkim)) or "none"
            raise SigningError(f"no [dkim] key for {domain} (keys for: {known})")
        return key


def _fields(head: bytes) -> list[bytes]:
    """The header section split into whole fields (folded lines kept with theirs)."""
    out: list[bytes] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\r\n" + line
        else:
            out.append(line)
    return out


def _field(name: str, value: str) -> bytes:
    return f"{name}: {value.replace(chr(13) + chr(10), chr(10)).replace(chr(10), chr(13) + chr(10))}".encode(
        "utf-8", "surrogateescape")  # fmt: skip


def final_message(spool: str, actions: list[list[Any]]) -> bytes:
    """The message as the MTA will send it after ``actions``."""
    data = Path(spool).read_bytes()
    head, _, body = data.partition(b"\r\n\r\n")
    fields = _fields(head)
    for action in actions:
        kind = action[0]
        if kind == "add_header":
            fields.append(_field(action[1], action[2]))
        elif kind == "insert_header":
            fields.insert(min(int(action[1]), len(fields)), _field(action[2], action[3]))
        elif kind in ("change_header", "delete_header"):
            name = action[1].lower().encode()
            index = int(action[3] if kind == "change_header" else action[2])
            value = action[2] if kind == "change_header" else ""
            positions = [i for i, f in enumerate(fields) if f.split(b":", 1)[0].strip().lower() == name]
            if 0 < index <= len(positions):
                i = positions[index - 1]
                if value:
                    fields[i] = _field(action[1], value)
                else:
                    del fields[i]
        elif kind == "replace_body":
            body = Path(action[1]).read_bytes()
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


def _as_header(signed: bytes) -> tuple[str, str]:
    """dkimpy's ``Name: value\\r\\n`` as (name, value) with its folds."""
    name, _, value = signed.decode("ascii").partition(":")
    return name.strip(), value.strip().replace("\r\n", "\n")


def sign(message: bytes, keys: Keys, domain: str, body_canon: str = "relaxed") -> tuple[str, str]:
    """A DKIM-Signature header (name, value) for ``message`` by ``domain``'s key."""
    key = keys.for_domain(domain)
    try:
        signed = dkim.sign(message, key.selector.encode(), key.domain.encode(), keys.pem(key),
                           canonicalize=(b"relaxed", body_canon.encode()))  # fmt: skip
    except dkim.DKIMException as exc:
        raise SigningError(f"DKIM signing for {domain}: {exc}") from None
    return _as_header(signed)


def seal(message: bytes, keys: Keys, authserv_id: str) -> list[tuple[str, str]]:
    """The ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) for
    ``message``, which must hold an Authentication-Results header by ``authserv_id``."""
    key = keys.arc
    if key is None:
        raise SigningError("no [arc] key configured")
    try:
        headers = dkim.arc_sign(message, key.selector.encode(), key.domain.encode(), keys.pem(key),
                                authserv_id.encode())  # fmt: skip
    except dkim.DKIMException as exc:
        raise SigningError(f"ARC sealing: {exc}") from None
    if not headers:
        raise SigningError(f"ARC sealing: no Authentication-Results by {authserv_id} to seal")
    return [_as_header(h) for h in headers]
