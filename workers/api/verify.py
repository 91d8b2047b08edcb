"""``defang.verify``: refuse unknown users at RCPT time, by asking the next hop.

    from defang import verify

    def filter_recipient(conn, recipient):
        return verify.recipient(conn, recipient).verdict

MIMEDefang's ``md_check_against_smtp_server``: the internal server (``[verify] host``,
``port``) is asked whether it would take the recipient (an SMTP probe: EHLO, ``MAIL
FROM:<[verify] sender>``, ``RCPT TO``, QUIT; ``defang.workers.checks.smtpverify``), so a
relay in front of it refuses unknown users with ``550 5.1.1`` before DATA instead of
accepting the mail and bouncing it later (backscatter).

The answers are kept in ``defang.state`` (``defang:verify:...``): "exists" for
``positive_ttl`` seconds, "unknown" for ``negative_ttl``, so a fleet sharing one Redis
asks once per address, and a dictionary attack costs the internal server one probe per
address per ``negative_ttl``.  The cache only saves probes: a state that cannot be
reached costs a probe (and one WARNING line), never a refusal.

A probe that gets no answer (refused, timed out after ``timeout`` seconds for the whole
probe, garbage, a 4xx) is "unverified": ``[verify] on_error`` "tempfail" (``451 4.4.3``:
the sender retries, nothing is lost) or "accept" (the recipient passes; the next hop
decides after DATA).  It is never kept.  An address that is not one line of an address
(CR, LF, NUL, an angle bracket inside, over 254 octets) is never sent; it gets ``553
5.1.3``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from defang.core.verdicts import Verdict, reject, tempfail
from defang.workers.api import services, state
from defang.workers.checks.smtpverify import Probe, VerifySettings, bare, probe
from defang.workers.stores.state import StateError

__all__ = ["BAD_SYNTAX", "UNKNOWN", "UNVERIFIED", "Result", "VerifySettings", "recipient"]

log = logging.getLogger("defang.filter")

#: an address the next hop refused (any 5xx at RCPT TO)
UNKNOWN = reject("Recipient address rejected: User unknown", "550", "5.1.1")
#: ``on_error = "tempfail"``: no answer from the next hop
UNVERIFIED = tempfail("Recipient address not verified, try again later", "451", "4.4.3")
#: an address that is not one (control characters, brackets, too long): never probed
BAD_SYNTAX = reject("Bad recipient address syntax", "553", "5.1.3")


@dataclass(frozen=True)
class Result:
    """One recipient's answer.  ``status``: "exists", "unknown" (the next hop refused it,
    or the address is not one: ``invalid``), "unverified" (no answer: ``why``); ``code``
    and ``text``: the next hop's RCPT reply (0, "" without one); ``cached``: the answer
    came from the state, not from a probe now."""

    status: str
    code: int = 0
    text: str = ""
    why: str = ""
    cached: bool = False
    invalid: bool = False
    on_error: str = "tempfail"

    @property
    def exists(self) -> bool:
        return self.status == "exists"

    @property
    def verdict(self) -> Verdict | None:
        """What ``filter_recipient`` returns: None (exists, or unverified with ``on_error =
        "accept"``), ``550 5.1.1``, ``553 5.1.3`` or ``451 4.4.3``."""
        if self.status == "unknown":
            return BAD_SYNTAX if self.invalid else UNKNOWN
        if self.status == "unverified" and self.on_error == "tempfail":
            return UNVERIFIED
        return None


def _key(address: str, s: VerifySettings) -> str:
    # hashed: a fixed size whatever the address, and no address makes another's key
    digest = hashlib.sha256(json.dumps([s.host.lower(), s.port, address]).encode("utf-8", "surrogateescape"))
    return f"defang:verify:{digest.hexdigest()[:32]}"


def _cached(key: str, queue_id: str) -> Result | None:
    try:
        raw = state.get(key)
    except StateError as exc:
        log.warning("%s: verify: state unavailable (%s): probing", queue_id, exc)
        return None
    if raw is None:
        return None
    try:
        status, code, text = json.loads(raw)
        return Result(status, int(code), str(text), cached=True)
    except (ValueError, TypeError):  # not ours (written by hand?): probe again
        return None


def _keep(key: str, found: Probe, s: VerifySettings, queue_id: str) -> None:
    ttl = s.positive_ttl if found.status == "exists" else s.negative_ttl
    if ttl <= 0:
        return
    try:
        state.set(key, json.dumps([found.status, found.code, found.text]), ttl)
    except StateError as exc:
        log.warning("%s: verify: answer not kept, state unavailable (%s)", queue_id, exc)


def recipient(conn: Any, address: str, **overrides: Any) -> Result:
    """Whether the next hop would take ``address`` (a cached answer, else a probe).
    ``overrides``: any ``[verify]`` option for this call (``host="10.0.0.2"``, ``port``,
    ``helo``, ``sender``, ``timeout``, ``positive_ttl``, ``negative_ttl``, ``on_error``)."""
    s = replace(services.CURRENT.verify, **overrides) if overrides else services.CURRENT.verify
    queue_id = (conn.macros.get("i") if conn is not None else None) or "-"
    addr = bare(address)
    key = _key(addr, s)
    result = _cached(key, queue_id) if s.host else None
    if result is None:
        found = probe(addr, s)
        if found.status in ("exists", "unknown"):
            _keep(key, found, s, queue_id)
        invalid = found.status == "invalid"
        result = Result("unknown" if invalid else found.status, found.code, found.text, found.why,
                        invalid=invalid)  # fmt: skip
    result = replace(result, on_error=s.on_error)
    _log(conn, queue_id, address, result)
    return result


def _log(conn: Any, queue_id: str, address: str, r: Result) -> None:
    shown = ascii(address)[1:-1][:300]  # one log line, whatever the address holds
    where = "cached" if r.cached else "probed"
    if r.status == "exists":
        log.debug("%s: verify <%s>: exists (%s)", queue_id, shown, where)
        return
    if r.status == "unknown":
        what = f"invalid ({r.why})" if r.invalid else f"unknown ({where}: {r.code} {r.text})"
        log.info("%s: verify <%s>: %s", queue_id, shown, what)
        tag = "verify_unknown"
    else:
        log.warning("%s: verify <%s>: unverified (%s): %s", queue_id, shown, r.why, r.on_error)
        tag = "verify_unverified"
    if conn is not None and getattr(conn, "decision", None) is not None:
        conn.tag(tag)
