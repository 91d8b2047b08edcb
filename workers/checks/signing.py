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

The keys are read and checked once, when the filter loads (``Keys.check``): a file per
domain and selector, named in ``[dkim]`` and ``[arc]``; RSA (PEM) or Ed25519 (RFC 8463).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto


class SigningError(Exception):
    """No key for the domain, or the key cannot be used; the text says which."""


RSA, ED25519 = b"rsa-sha256", b"ed25519-sha256"


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    path: str


@dataclass
class Keys:
    """The signing keys of ``[dkim] keys`` (one or more per domain: an RSA and an Ed25519
    key sign side by side, RFC 8463 §4) and ``[arc]``, read and checked by ``check`` when
    the filter loads: a key that cannot sign is refused then, in one line, never on a
    message."""

    dkim: dict[str, list[Key]] = field(default_factory=dict)  # domain (lowercase) -> its keys
    arc: Key | None = None
    _loaded: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    @classmethod
    def of(cls, dkim_keys: Any, arc_key: Any) -> Keys:
        """From the config's (domain, selector, path) triples."""
        by_domain: dict[str, list[Key]] = {}
        for domain, selector, path in dkim_keys:
            by_domain.setdefault(domain.lower(), []).append(Key(domain.lower(), selector, path))
        return cls(by_domain, Key(*arc_key) if arc_key else None)

    def load(self, key: Key) -> tuple[bytes, bytes]:
        """(algorithm, key data as dkimpy takes it): an RSA key in PEM, or an Ed25519 key
        as the base64 of its 32-byte seed (what dkimpy's ``dknewkey --ktype ed25519`` writes)."""
        if key.path not in self._loaded:
            self._loaded[key.path] = _read_key(key)
        return self._loaded[key.path]

    def check(self) -> None:
        """Read every key now; SigningError (one line) for the first that cannot sign."""
        for key in [k for keys in self.dkim.values() for k in keys] + ([self.arc] if self.arc else []):
            self.load(key)
        if self.arc is not None and self.load(self.arc)[0] != RSA:
            raise SigningError(f"[arc] key {self.arc.path}: ARC seals with rsa-sha256 only (RFC 8617)")

    def for_domain(self, domain: str) -> list[Key]:
        keys = self.dkim.get(domain.lower())
        if not keys:
            known = ", ".join(sorted(self.dkim)) or "none"
            raise SigningError(f"no [dkim] key for {domain} (keys for: {known})")
        return keys


def _read_key(key: Key) -> tuple[bytes, bytes]:
    where = f"key for {key.domain} ({key.path})"
    try:
        data = Path(key.path).read_bytes()
    except OSError as exc:
        raise SigningError(f"{where}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        try:
            dkim.crypto.parse_pem_private_key(data)
        except dkim.crypto.UnparsableKeyError:
            raise SigningError(f"{where}: not an RSA private key dkimpy can read (an Ed25519 key goes "
                               "in as the base64 of its seed, as dknewkey --ktype ed25519 writes it)"
                               ) from None  # fmt: skip
        return RSA, data
    try:
        import nacl.encoding
        import nacl.signing

        nacl.signing.SigningKey(data.strip(), encoder=nacl.encoding.Base64Encoder)
    except Exception:  # PyNaCl: a seed that is not 32 bytes, not base64
        why = "neither a PEM RSA private key nor an Ed25519 seed (base64, 32 bytes)"
        raise SigningError(f"{where}: {why}") from None
    return ED25519, data.strip()


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


def sign(message: bytes, keys: Keys, domain: str, body_canon: str = "relaxed") -> list[tuple[str, str]]:
    """A DKIM-Signature header (name, value) for ``message`` by each of ``domain``'s keys
    (in the config's order), each computed over the same message."""
    out = []
    for key in keys.for_domain(domain):
        algorithm, data = keys.load(key)
        try:
            signed = dkim.sign(message, key.selector.encode(), key.domain.encode(), data,
                               canonicalize=(b"relaxed", body_canon.encode()),
                               signature_algorithm=algorithm)  # fmt: skip
        except dkim.DKIMException as exc:
            raise SigningError(f"DKIM signing for {domain}: {exc}") from None
        out.append(_as_header(signed))
    return out


def seal(message: bytes, keys: Keys, authserv_id: str) -> list[tuple[str, str]]:
    """The ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) for
    ``message``, which must hold an Authentication-Results header by ``authserv_id``."""
    key = keys.arc
    if key is None:
        raise SigningError("no [arc] key configured")
    try:
        headers = dkim.arc_sign(message, key.selector.encode(), key.domain.encode(), keys.load(key)[1],
                                authserv_id.encode())  # fmt: skip
    except dkim.DKIMException as exc:
        raise SigningError(f"ARC sealing: {exc}") from None
    if not headers:
        raise SigningError(f"ARC sealing: no Authentication-Results by {authserv_id} to seal")
    return [_as_header(h) for h in headers]
