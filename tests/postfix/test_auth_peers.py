"""defang's sender-authentication verdicts beside implementations nobody here wrote.

One real Postfix on loopback runs three milters on every message: defang (the
auth_results filter: an Authentication-Results field, nothing else), OpenDKIM and
OpenDMARC (defang.testbed.peers), all three asking one NSD serving the test zones
(support/authzones.py).  Each case is a message an attacker or a legitimate bounce
would send; the test reads the three Authentication-Results fields at the sink.  Where
the RFC says the answers agree, the test asserts they do; where the peer answers
otherwise, the test asserts the RFC's answer for defang and the peer's answer as seen,
and docs/auth.md ("Where defang and the peers disagree") records it with the clause.
A second test has the dmarc_reject example and OpenDMARC act on the policy: refuse,
quarantine, and what each does with a message outside a pct= sample.
"""

from __future__ import annotations

import email
import re
import shutil
from pathlib import Path

import authres
import dkim
import pytest
from authzones import ed_key, key, zones
from daemon import FILTERS, REPO, traversable_dir
from mta import Stack, needs_postfix

from defang.testbed.dns import Nsd
from defang.testbed.peers import OpenDkim, OpenDmarc, nameserver_address, peers_available
from defang.testbed.smtpclient import SendResult

pytestmark = [
    pytest.mark.integration, needs_postfix,
    pytest.mark.skipif(not peers_available(), reason="opendkim/opendmarc not installed (scripts/bootstrap)"),
]  # fmt: skip
OURS = "mx.relay.test"
EXAMPLES = REPO / "filters" / "examples"
CLIENT = "192.0.2.10"  # inside example.test's SPF record, outside relay.test's


def mail(frm: str, subject: str, extra: str = "") -> bytes:
    mid = subject.replace(" ", "")
    return (f"From: {frm}\r\nTo: bob@relay.test\r\nSubject: {subject}\r\n{extra}"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{mid}@example.test>\r\n\r\n"
            f"{subject}: the figures.\r\n").encode()  # fmt: skip


def signed(message: bytes, selector: str, domain: str, keyfile: Path, **kw: object) -> bytes:
    sig = dkim.sign(message, selector.encode(), domain.encode(), keyfile.read_bytes(),
                    canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from", b"to", b"subject"],
                    **kw)  # fmt: skip
    return sig + message


def verdicts(raw: bytes) -> dict[str, dict[str, list[tuple[str, dict[str, str]]]]]:
    """authserv-id -> method -> [(result, {"header.from": ..., ...})], from every
    Authentication-Results field of a delivered message (authres reads them)."""
    out: dict[str, dict[str, list[tuple[str, dict[str, str]]]]] = {}
    for value in email.message_from_bytes(raw).get_all("Authentication-Results") or []:
        parsed = authres.AuthenticationResultsHeader.parse_value(re.sub(r"\r?\n(?=[ \t])", "", value))
        for r in parsed.results:
            props = {f"{p.type}.{p.name}": str(p.value) for p in r.properties}
            out.setdefault(str(parsed.authserv_id), {}).setdefault(r.method, []).append((r.result, props))
    return out


class Peers:
    """NSD on port 53 of a loopback address of its own, OpenDKIM, OpenDMARC, and a Stack
    whose Postfix runs defang, then OpenDKIM, then OpenDMARC."""

    def __init__(self, keydir: Path, filter_path: Path = FILTERS / "auth_results.py",
                 reject: bool = False) -> None:  # fmt: skip
        self.dir = traversable_dir("defang-peers-")  # the peers drop root to users of their own
        self.ns = Nsd(zones(keydir), port=53, host=nameserver_address())
        self.dkim = OpenDkim(f"{self.ns.host}@53", self.dir / "opendkim")
        self.dmarc = OpenDmarc(self.ns.host, self.dir / "opendmarc", reject=reject)
        settings = {"dns": {"servers": [self.ns.server], "timeout": 1, "lifetime": 2},
                    "auth": {"authserv_id": OURS}}  # fmt: skip
        # the peers' SPF library passes any client on loopback (libspf2: "localhost is
        # always allowed"), so every message comes, by XCLIENT, from CLIENT
        self.stack = Stack(filter_path, settings,
                           postfix_extra={"smtpd_authorized_xclient_hosts": "127.0.0.1",
                                          "mynetworks": f"127.0.0.0/8 {CLIENT}"})  # fmt: skip

    def __enter__(self) -> Peers:
        self.ns.start()
        try:
            self.dkim.start()
            self.dmarc.start()
            milters = f"{self.stack.defang.socket_spec}, {self.dkim.socket_spec}, {self.dmarc.socket_spec}"
            self.stack.postfix.extra["smtpd_milters"] = milters
            self.stack.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.stop()
        for part in (self.dmarc, self.dkim, self.ns):
            part.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, message: bytes, sender: str, helo: str = "mx.sender.test") -> SendResult:
        return self.stack.send(message, sender=sender, helo=helo, xclient=f"ADDR={CLIENT} NAME=[UNAVAILABLE]")

    def judge(self, message: bytes, sender: str, helo: str = "mx.sender.test") -> dict:
        r = self.send(message, sender, helo)
        assert r.data is not None and r.data[0] == 250, r
        subject = re.search(rb"Subject: ([^\r]*)", message).group(1)
        return verdicts(self.stack.arrived(b"Subject: " + subject + b"\r\n").raw)


@pytest.fixture(scope="module")
def peers(keydir):
    with Peers(keydir) as p:
        yield p


# Each case: (id, From, MAIL FROM, HELO, extra header fields, DKIM signature (selector,
# domain, algorithm) or None, then the verdicts: defang's DKIM and DMARC result (the RFC's
# answer), OpenDKIM's and OpenDMARC's (None: no result written)).  Every message comes from
# CLIENT; fails.example.test and relay.test do not authorise it, example.test does.
RSA, ED, SHA1 = "rsa-sha256", "ed25519-sha256", "rsa-sha1"
SEL = ("sel", "example.test", RSA)
CASES = [
    # RFC 7489 3.1: an SPF pass and a DKIM pass, both aligned
    ("aligned pass", "alice@example.test", "alice@example.test", "mx.sender.test", "", SEL,
     "pass", "pass", "pass", "pass"),
    # RFC 7489 6.6.2: nothing aligned passes, p=reject
    ("reject fail", "alice@example.test", "alice@fails.example.test", "x.test", "", None,
     "none", "fail", "none", "fail"),
    # RFC 7489 3.1.1, 3.1.2 (adkim=s, aspf=s): a subdomain's SPF pass or signature is not aligned
    ("strict spf", "a@strict.example.test", "a@mail.strict.example.test", "x.test", "", None,
     "none", "fail", "none", "fail"),
    ("strict dkim", "a@strict.example.test", "a@fails.example.test", "x.test", "", SEL,
     "pass", "fail", "pass", "fail"),
    ("strict org spf", "a@strict.test", "a@mail.strict.test", "x.test", "", None,
     "none", "fail", "none", "fail"),
    ("strict org dkim", "a@strict.test", "a@fails.example.test", "x.test", "",
     ("sel", "mail.strict.test", RSA),
     "pass", "fail", "pass", "fail"),
    # RFC 7489 6.6.1: each author domain is checked, the strictest failing policy stands.
    # OpenDMARC leaves a From with two domains alone (no result, RejectMultiValueFrom off),
    # and of two From fields reads the first
    ("two addresses", "a@relay.test, b@example.test", "a@relay.test", "x.test", "", None,
     "none", "fail", "none", None),
    ("two fields", "a@relay.test", "a@relay.test", "x.test", "From: b@example.test\r\n", None,
     "none", "fail", "none", "none"),
    # RFC 7489 4.1 with RFC 7208 2.4: a bounce's SPF identity is postmaster@HELO
    ("bounce", "MAILER-DAEMON@example.test", "", "bouncer.example.test", "", None,
     "none", "pass", "none", "pass"),
    # RFC 7489 6.6.4: pct=0 changes what is done, not the result
    ("pct zero", "a@sampled.example.test", "a@sampled.example.test", "x.test", "", None,
     "none", "fail", "none", "fail"),
    # RFC 7489 3.2 with the PSL's default rule "*": an unknown TLD's organizational domain
    # is one label below it
    ("unknown tld", "a@bank.nosuchtld", "a@evil.nosuchtld", "x.test", "", None,
     "none", "fail", "none", "fail"),
    ("unknown tld aligned", "a@bank.nosuchtld", "a@mail.bank.nosuchtld", "x.test", "", None,
     "none", "pass", "none", "pass"),
    # RFC 7489 6.6.3: records not starting v=DMARC1 are discarded; two DMARC records: no
    # policy.  OpenDMARC finds no policy behind the non-DMARC record, and applies one of two
    ("mixed records", "a@mixed.example.test", "a@mixed.example.test", "x.test", "", None,
     "none", "fail", "none", "none"),
    ("two dmarc records", "a@twice.example.test", "a@twice.example.test", "x.test", "", None,
     "none", "none", "none", "fail"),
    # RFC 8463: Ed25519 signatures verify
    ("ed25519", "a@example.test", "a@fails.example.test", "x.test", "", ("ed", "example.test", ED),
     "pass", "pass", "pass", "pass"),
    # RFC 8301 3.1: rsa-sha1 "MUST NOT be used for signing or verifying"; OpenDKIM passes it
    ("rsa sha1", "a@example.test", "a@fails.example.test", "x.test", "", ("sel", "example.test", SHA1),
     "fail", "fail", "pass", "pass"),
]  # fmt: skip


def build(case: tuple, keydir: Path) -> bytes:
    name, frm, _, _, extra, signature = case[:6]
    message = mail(frm, name, extra)
    if signature is None:
        return message
    selector, domain, algorithm = signature
    keyfile = ed_key("sender", keydir)[0] if algorithm == ED else key("sender", keydir)[0]
    return signed(message, selector, domain, keyfile, signature_algorithm=algorithm.encode())


def only(verdict: dict, serv_id: str, method: str) -> tuple[str, dict[str, str]] | None:
    found = verdict.get(serv_id, {}).get(method, [])
    assert len(found) <= 1, (serv_id, method, found)
    return found[0] if found else None


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_defang_and_the_peers_on_the_same_message(peers, keydir, case):
    name, frm, sender, helo = case[:4]
    our_dkim, our_dmarc, their_dkim, their_dmarc = case[6:]
    verdict = peers.judge(build(case, keydir), sender, helo)
    ours = {m: only(verdict, OURS, m) for m in ("spf", "dkim", "dmarc")}
    dkim_peer = only(verdict, OpenDkim.AUTHSERV_ID, "dkim")
    dmarc_peer = only(verdict, OpenDmarc.AUTHSERV_ID, "dmarc")
    spf_peer = only(verdict, OpenDmarc.AUTHSERV_ID, "spf") if dmarc_peer else None
    assert (ours["dkim"][0], ours["dmarc"][0]) == (our_dkim, our_dmarc), verdict
    assert dkim_peer[0] == their_dkim, verdict
    assert (dmarc_peer[0] if dmarc_peer else None) == their_dmarc, verdict
    # SPF (pyspf and libspf2) agrees every time, on the same identity: MAIL FROM's domain,
    # or for a bounce the HELO name
    if spf_peer:
        assert spf_peer[0] == ours["spf"][0], verdict
        (scope, identity), = spf_peer[1].items()
        assert ours["spf"][1][scope].rpartition("@")[2] == identity, verdict
    # and DMARC is about the same author domain, when both read the same one
    if dmarc_peer and name != "two fields":
        assert dmarc_peer[1]["header.from"] == ours["dmarc"][1]["header.from"], verdict


def test_what_the_dmarc_example_and_opendmarc_do_with_the_policy(keydir):
    """RFC 7489 6.6.4: a failing message outside a p=reject record's pct= sample gets the
    next policy down, quarantine; inside it, reject.  The dmarc_reject example (alone on
    Postfix) and OpenDMARC acting on the policy (RejectFailures, after OpenDKIM, alone)
    answer the same messages: a refusal, a quarantine (for OpenDMARC: held), and what
    each does outside the sample."""
    cases = [("pct zero", "a@sampled.example.test"), ("pct hundred", "a@everyone.example.test"),
             ("quarantine", "a@quiet.example.test")]  # fmt: skip
    with Peers(keydir, EXAMPLES / "dmarc_reject.py", reject=True) as peers:
        peers.stack.postfix.set_milter(peers.stack.defang.socket_spec)
        ours = {name: peers.send(mail(sender, f"{name} ours"), sender) for name, sender in cases}
        peers.stack.postfix.set_milter(f"{peers.dkim.socket_spec}, {peers.dmarc.socket_spec}")
        theirs = {name: peers.send(mail(sender, f"{name} theirs"), sender) for name, sender in cases}
        # p=reject, everyone sampled: both refuse it
        refused = (550, "5.7.1 DMARC policy of everyone.example.test rejects this message")
        assert ours["pct hundred"].data == refused
        assert theirs["pct hundred"].data == (550, "5.7.1 rejected by DMARC policy for everyone.example.test")
        # p=quarantine: defang's example marks the subject; OpenDMARC holds it (Postfix's
        # hold queue)
        assert ours["quarantine"].data[0] == theirs["quarantine"].data[0] == 250
        assert peers.stack.arrived(b"Subject: [DMARC] quarantine ours\r\n")
        held = peers.stack.postfix.hold_queue()
        assert [m["queue_id"] for m in held] == [theirs["quarantine"].queue_id], held
        # p=reject, nobody sampled: the next policy down, quarantine, for defang; OpenDMARC
        # applies none (dis=none, delivered, not held): the difference docs/auth.md records
        assert ours["pct zero"].data[0] == theirs["pct zero"].data[0] == 250
        assert peers.stack.arrived(b"Subject: [DMARC] pct zero ours\r\n")
        unsampled = peers.stack.arrived(b"Subject: pct zero theirs\r\n").raw
        assert disposition(unsampled) == ("fail", "reject", "none")


def disposition(raw: bytes) -> tuple[str, str, str] | None:
    """OpenDMARC's result, the record's policy and what it did, from its comment
    ``dmarc=fail (p=reject dis=none)`` (authres keeps no comments)."""
    for value in email.message_from_bytes(raw).get_all("Authentication-Results") or []:
        if m := re.match(rf"{OpenDmarc.AUTHSERV_ID}; dmarc=(\w+) \(p=(\w+) dis=(\w+)\)", value):
            return m.group(1), m.group(2), m.group(3)
    return None
