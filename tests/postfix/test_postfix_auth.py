"""Sender authentication through a real Postfix, real defang and a real DNS server (NSD
on loopback, the test zones of support/authzones.py): a listed client refused at
connect, the SPF example's paths, DKIM verified on arrival and signed on the way out
(checked at the sink, byte for byte, after defang rewrote the body), and the DNS server
stopped mid-test."""

from __future__ import annotations

import time
from itertools import takewhile
from pathlib import Path

import dkim
import pytest
from authzones import key, zones
from daemon import FILTERS, REPO
from mta import Stack, needs_postfix

from defang.testbed.dns import Nsd

pytestmark = [pytest.mark.integration, needs_postfix]
EXAMPLES = REPO / "filters" / "examples"
MESSAGE = (b"From: Alice <alice@%s>\r\nTo: bob@relay.test\r\nSubject: %s\r\n"
           b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <%s@example.test>\r\n\r\n"
           b"The figures, as promised.\r\n")  # fmt: skip


def message(domain: str, subject: str) -> bytes:
    return MESSAGE % (domain.encode(), subject.encode(), subject.replace(" ", "").encode())


def settings(ns: Nsd, keydir: Path) -> dict:
    relay = str(key("relay", keydir)[0])
    return {"dns": {"servers": [ns.server], "timeout": 1, "lifetime": 2},
            "auth": {"authserv_id": "mx.relay.test"},
            "dkim": {"keys": [{"domain": "relay.test", "selector": "s2026", "key": relay}]}}  # fmt: skip



def test_a_listed_client_is_refused_at_connect(ns, keydir):
    with Stack(FILTERS / "auth_connect.py", settings(ns, keydir)) as stack:
        r = stack.send(message("example.test", "from a listed client"))
        log = stack.postfix.log_text()
    # Postfix greets a client its milter refused at connect with its own text; the
    # filter's reply is in its log
    assert r.greeting[0] == 554 and r.data is None, r
    assert "milter-reject: CONNECT from unknown[127.0.0.1]: 554 5.7.1 127.0.0.1 listed: loopback listed " \
           "for the test" in log  # fmt: skip


def test_the_spf_policy_example_and_dns_stopped_mid_test(keydir, tmp_path):
    source = (EXAMPLES / "spf_policy.py").read_text()
    line = next(x for x in source.splitlines() if x.startswith("BLOCKLISTS = "))
    (tmp_path / "spf_policy.py").write_text(source.replace(line, 'BLOCKLISTS = ["local.bl.test"]'))
    (tmp_path / "spf_policy.py").chmod(0o644)
    tmp_path.chmod(0o755)
    own = Nsd(zones(keydir)).start()  # this test stops it
    try:
        with Stack(tmp_path / "spf_policy.py", settings(own, keydir)) as stack:
            def mail_reply(sender: str) -> tuple[int, str]:
                return stack.send(message("example.test", f"from {sender}"), sender=sender).mail

            passed = stack.send(message("relay.test", "spf pass"), sender="alice@relay.test")
            assert passed.data[0] == 250, passed  # pass: accepted
            assert stack.arrived(b"spf pass")
            code, text = mail_reply("alice@fails.example.test")
            assert code == 550 and text.startswith("5.7.23 SPF check failed"), text
            code, text = mail_reply("alice@soft.example.test")  # softfail: reputation decides
            assert code == 554 and "127.0.0.1 is listed by local.bl.test: loopback listed" in text, text
            code, text = mail_reply("alice@broken.example.test")
            assert code == 451 and text.startswith("4.7.24 SPF permerror"), text
            own.stop()  # a name not asked before: relay.test's answers are in the workers' caches
            start = time.monotonic()
            code, text = mail_reply("alice@example.test")
            took = time.monotonic() - start
            assert code == 451 and text.startswith("4.7.24 SPF temperror"), text
            assert took < 10, f"within the 2 s DNS lifetime, not a hang: {took:.1f}s"
    finally:
        own.stop()


def test_dkim_verified_on_arrival_and_signed_on_the_way_out(ns, keydir):
    pem = key("sender", keydir)[0].read_bytes()
    original = message("example.test", "signed by the sender")
    signature = dkim.sign(original, b"sel", b"example.test", pem, canonicalize=(b"relaxed", b"relaxed"))
    signed = signature + original
    altered = signed.replace(b"signed by the sender", b"altered in transit")
    with Stack(FILTERS / "auth_sign.py", settings(ns, keydir)) as stack:
        assert stack.send(signed).data[0] == 250
        assert stack.send(altered).data[0] == 250
        good, bad = stack.arrived(b"signed by the sender"), stack.arrived(b"altered in transit")
    for m, verdict in ((good, b"dkim=pass header.d=example.test"), (bad, b"dkim=fail")):
        head = m.raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
        (results,) = [x for x in head.split(b"\r\n") if x.startswith(b"Authentication-Results:")]
        assert results.startswith(b"Authentication-Results: mx.relay.test;") and verdict in results, results
    # what arrived, byte for byte: the disclaimer in the body, our signature over it
    assert b"-- checked by defang" in good.raw
    d = dkim.DKIM(good.raw)
    assert d.verify(idx=0, dnsfunc=ns.txt_lookup()) and d.signature_fields[b"d"] == b"relay.test"
    assert dkim.DKIM(bad.raw).verify(idx=0, dnsfunc=ns.txt_lookup()), "ours signs what left, altered or not"


# --- issue 26: DMARC and Authentication-Results through Postfix, with the dmarc_reject example ---

FORGED = ["mx.relay.test 1; dkim=pass header.d=example.test", "mx.relay.test (ours); dkim=pass",
          '"mx.relay.test"; dmarc=pass', '"mx.relay\\.test" ; dkim=pass',
          "(c) MX.Relay.Test;\r\n\tspf=pass"]  # fmt: skip
KEPT = ["other.example; spf=pass", '"mx.relay.test x"; dkim=pass']


def mail(frm: str, subject: str, extra: str = "") -> bytes:
    mid = subject.replace(" ", "")
    return (f"From: {frm}\r\nTo: bob@relay.test\r\nSubject: {subject}\r\n{extra}"
            f"Message-ID: <{mid}@example.test>\r\n\r\n{subject}: the figures.\r\n").encode()  # fmt: skip


def results_fields(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n ", " ").replace("\r\n\t", " ")
    fields = [x for x in head.split("\r\n") if x.lower().startswith("authentication-results:")]
    return [x.partition(":")[2].strip() for x in fields]


def test_dmarc_example_several_from_bounces_and_forged_results_through_postfix(ns, keydir):
    with Stack(EXAMPLES / "dmarc_reject.py", settings(ns, keydir)) as stack:
        # 1. a p=reject author hidden behind a second address, or a second From field
        for frm, extra in (("a@relay.test, b@example.test", ""),
                           ("a@relay.test", "From: b@example.test\r\n")):  # fmt: skip
            r = stack.send(mail(frm, "two authors", extra), sender="a@relay.test", helo="mx.relay.test")
            assert r.data == (550, "5.7.1 DMARC policy of example.test rejects this message"), r
        # 2. a bounce from a p=reject domain: SPF of its HELO name aligns
        bounce = mail("MAILER-DAEMON@example.test", "bounce ok")
        r = stack.send(bounce, sender="", helo="bouncer.example.test")
        assert r.data[0] == 250, r
        raw = stack.arrived(b"bounce ok").raw
        fields = results_fields(raw)
        (ours,) = [v for v in fields if v.startswith("mx.relay.test;")]
        start = raw.index(b"Authentication-Results: mx.relay.test;")
        lines = raw[start:].split(b"\r\n")
        lines = lines[:1] + list(takewhile(lambda x: x[:1] == b"\t", lines[1:]))
        assert len(lines) > 2 and max(len(x) for x in lines) <= 78, lines  # folded by Postfix as we sent it
        assert "spf=pass" in ours and "smtp.helo=bouncer.example.test" in ours and "dmarc=pass" in ours, ours
        r = stack.send(mail("MAILER-DAEMON@example.test", "bounce bad"), sender="", helo="fails.example.test")
        assert r.data == (550, "5.7.1 DMARC policy of example.test rejects this message"), r
        # 6. Authentication-Results claiming our authserv-id, however written, never reach the mailbox
        extra = "".join(f"Authentication-Results: {v}\r\n" for v in FORGED + KEPT)
        r = stack.send(mail("alice@example.test", "forged results", extra), sender="alice@example.test")
        assert r.data[0] == 250, r
        fields = results_fields(stack.arrived(b"forged results").raw)
        ours = [v for v in fields if v.startswith("mx.relay.test;")]
        assert len(ours) == 1 and "dmarc=pass" in ours[0], fields
        assert sorted(v for v in fields if v not in ours) == sorted(KEPT), fields
        stack.defang.wait_log(f"removed {len(FORGED)} Authentication-Results claiming mx.relay.test")
