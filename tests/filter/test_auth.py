"""defang.auth against a real authoritative DNS server (NSD on loopback) serving test
zones: blocklists, SPF, DKIM verification, DMARC, ARC, Authentication-Results, and DKIM
signing and ARC sealing over the message as it will leave."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import dkim
import pytest
from authzones import key, zones
from test_mime_rewrite import CONN, crlf, inline_filter
from test_mime_rewrite import run as run_any

from defang.core import config as configmod
from defang.testbed.dns import Nsd
from defang.workers.api import services
from defang.workers.api.services import AuthSettings, ServiceSettings
from defang.workers.checks.signing import final_message
from defang.workers.loader import load_filter
from defang.workers.runner import FilterRunner

MESSAGE = crlf("""
    From: Alice <alice@example.test>
    To: bob@relay.test
    Subject: Quarterly figures
    Date: Thu, 03 Dec 2026 10:00:00 +0000
    Message-ID: <q1@example.test>

    See the figures.
    """)


@pytest.fixture
def auth(ns, keydir):
    """defang.auth with this worker's settings pointing at the test server."""
    from defang import auth as module

    relay = str(key("relay", keydir)[0])
    previous = services.CURRENT
    services.CURRENT = ServiceSettings(auth=AuthSettings(
        dns_servers=(ns.server,), dns_timeout=1, dns_lifetime=2, authserv_id="mx.relay.test",
        dkim_keys=(("relay.test", "s2026", relay),), arc_key=("relay.test", "arc", relay)))  # fmt: skip
    module.resolver.cache_clear()
    module.keys.cache_clear()
    yield module
    services.CURRENT = previous
    module.resolver.cache_clear()
    module.keys.cache_clear()



def run(runner: FilterRunner, raw: bytes, tmp_path: Path, ip: str = "198.51.100.7") -> dict:
    """End of message from ``ip`` (not in example.test's SPF unless 192.0.2.x), MAIL FROM
    alice@example.test."""
    return run_any(runner, raw, tmp_path, sender="alice@example.test", conn={**CONN, "ip": ip, "notes": {}})


class Conn:
    def __init__(self, ip: str = "192.0.2.5", helo: str = "mx.example.test") -> None:
        self.ip, self.helo, self.notes = ip, helo, {}


# --- blocklists ------------------------------------------------------------------------------


def test_an_ip_blocklist_ipv4_ipv6_codes_reason_and_a_refusal(auth):
    found = auth.dnsbl("192.0.2.99", ["bl.test", "dbl.test", "refusing.test"])
    listed, clean, refused = found.results
    assert bool(found) and found.listed == [listed]
    assert (listed.query, listed.codes) == ("99.2.0.192.bl.test", ("127.0.0.4",))
    assert listed.reason == "192.0.2.99 is a spam source, see bl.test"
    assert not clean.listed and clean.error is None
    assert refused.error == "the list refused the query (127.255.255.254)" and not refused.listed
    six = auth.dnsbl(Conn("2001:db8::99"), "bl.test").results[0]
    assert six.listed and six.query.startswith("9.9.0.0.0") and six.query.endswith(".8.b.d.0.1.0.0.2.bl.test")
    assert not auth.dnsbl("192.0.2.1", "bl.test")


def test_a_domain_list_and_uri_list(auth, tmp_path):
    assert auth.rhsbl("someone@Spammer.COM", "dbl.test").listed[0].reason == "spam domain"
    assert not auth.rhsbl("friend.com", "dbl.test")
    runner = FilterRunner(load_filter(str(inline_filter(tmp_path, """
        from defang import auth
        def filter_end(msg):
            found = auth.uribl(msg, "dbl.test")
            msg.add_header("X-Uri", found.subject + " " + ",".join(r.zone for r in found.listed))
        """))), on_filter_error=configmod.Config().on_filter_error.verdict)  # fmt: skip
    body = crlf("""
        From: a@example.test
        Content-Type: text/html

        <a href="https://www.spammer.com/buy">buy</a> <a href="http://mail.good.co.uk/x">ok</a>
        """)
    reply = run(runner, body, tmp_path)
    assert ["add_header", "X-Uri", "spammer.com,good.co.uk dbl.test"] in reply["actions"]


# --- SPF -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sender, ip, result", [
    ("alice@example.test", "192.0.2.5", "pass"),
    ("alice@example.test", "198.51.100.7", "fail"),
    ("a@soft.example.test", "198.51.100.7", "softfail"),
    ("a@broken.example.test", "192.0.2.5", "permerror"),
    ("a@no-such.test", "192.0.2.5", "none"),
])  # fmt: skip
def test_spf_results(auth, sender, ip, result):
    conn = Conn(ip)
    got = auth.spf(conn, sender)
    assert got.result == result, got
    assert conn.notes["defang.spf"][:2] == [sender, result], "kept for the end of message"


def test_spf_of_the_null_sender_is_the_helo_s(auth):
    got = auth.spf(Conn("198.51.100.7", helo="fails.example.test"), "")
    assert (got.result, got.identity, got.scope) == ("fail", "postmaster@fails.example.test", "helo")


# --- DKIM, DMARC, ARC, the header -------------------------------------------------------------


def signed(keydir: Path, message: bytes = MESSAGE) -> bytes:
    pem = key("sender", keydir)[0].read_bytes()
    return dkim.sign(message, b"sel", b"example.test", pem, canonicalize=(b"relaxed", b"relaxed")) + message


def runner_for(tmp_path: Path, code: str) -> FilterRunner:
    r = FilterRunner(load_filter(str(inline_filter(tmp_path, code))),
                     on_filter_error=configmod.Config().on_filter_error.verdict)  # fmt: skip
    return r


CHECK_AND_STAMP = """
    from defang import auth
    def filter_end(msg):
        r = auth.check(msg)
        auth.add_results_header(msg, r)
        dkims = [d.result for d in r.dkim]
        msg.add_header("X-Seen", f"{r.spf.result} {dkims} {r.dmarc.result} {r.dmarc.policy}")
    """


def seen(reply: dict) -> str:
    return next(a[2] for a in reply["actions"] if a[0] == "add_header" and a[1] == "X-Seen")


def results(reply: dict) -> str:
    inserted = [a for a in reply["actions"] if a[0] == "insert_header"]
    return next(a[3] for a in inserted if a[2] == "Authentication-Results")


def test_a_signed_message_passes_dkim_and_dmarc_and_gets_its_header(auth, keydir, tmp_path):
    reply = run(runner_for(tmp_path, CHECK_AND_STAMP), signed(keydir), tmp_path)
    assert seen(reply) == "fail ['pass'] pass reject"  # 198.51.100.7 fails SPF: DKIM aligns
    assert results(reply) == (
        "mx.relay.test;\n\tspf=fail (SPF fail - not authorized) smtp.mailfrom=alice@example.test;\n"
        "\tdkim=pass header.d=example.test header.s=sel;\n\tarc=none (Message is not ARC signed);\n"
        "\tdmarc=pass (aligned: dkim example.test) header.from=example.test\n\tpolicy.dmarc=REJECT")
    assert seen(run(runner_for(tmp_path, CHECK_AND_STAMP), MESSAGE, tmp_path, ip="192.0.2.5")).startswith(
        "pass [] pass"), "SPF alone aligns too"  # fmt: skip


def test_altered_in_transit_fails_and_dmarc_says_reject(auth, keydir, tmp_path):
    altered = signed(keydir).replace(b"See the figures.", b"See the new bank account.")
    reply = run(runner_for(tmp_path, CHECK_AND_STAMP), altered, tmp_path)
    assert seen(reply) == "fail ['fail'] fail reject"
    assert "dkim=fail (body hash mismatch" in results(reply)


def test_unsigned_quarantine_policy_and_missing_key(auth, keydir, tmp_path):
    quiet = MESSAGE.replace(b"alice@example.test", b"alice@quiet.example.test")
    assert seen(run(runner_for(tmp_path, CHECK_AND_STAMP), quiet, tmp_path)) == "fail [] fail quarantine"
    nokey = signed(keydir).replace(b"s=sel;", b"s=gone;")
    reply = run(runner_for(tmp_path, CHECK_AND_STAMP), nokey, tmp_path)
    assert seen(reply).startswith("fail ['permerror']")
    assert "no key at gone._domainkey.example.test" in results(reply)


def test_forged_results_with_our_authserv_id_are_removed(auth, tmp_path):
    claims = (b"Authentication-Results: mx.relay.test; dkim=pass\r\n"
              b"Authentication-Results: other.example; spf=pass\r\n")
    forged = MESSAGE.replace(b"Subject:", claims + b"Subject:")
    reply = run(runner_for(tmp_path, CHECK_AND_STAMP), forged, tmp_path)
    assert ["delete_header", "Authentication-Results", 1] in reply["actions"]
    assert not any(a[0] == "delete_header" and a[2] == 2 for a in reply["actions"])


# --- signing over what leaves --------------------------------------------------------------------


SIGN_AFTER_BOILERPLATE = """
    from defang import auth
    def filter_end(msg):
        msg.append_boilerplate("-- scanned by defang")
        msg.change_header("Subject", "[ext] " + msg.subject)
        auth.add_results_header(msg)
        auth.dkim_sign(msg, "relay.test")
        auth.arc_seal(msg)
    """


def test_the_signature_and_seal_cover_the_rebuilt_body_and_changed_headers(auth, ns, keydir, tmp_path):
    reply = run(runner_for(tmp_path, SIGN_AFTER_BOILERPLATE), signed(keydir), tmp_path)
    assert reply["verdict"]["action"] == "continue", reply
    kinds = [a[0] if a[0] != "insert_header" else a[2] for a in reply["actions"]]
    assert kinds[-4:] == ["DKIM-Signature", "ARC-Authentication-Results", "ARC-Message-Signature", "ARC-Seal"]
    assert "replace_body" in kinds
    final = final_message(str(tmp_path / "spool" / "message"), reply["actions"])
    assert b"-- scanned by defang" in final and b"Subject: [ext] Quarterly figures" in final
    d = dkim.DKIM(final)
    assert d.verify(idx=0, dnsfunc=ns.txt_lookup()) and d.signature_fields[b"d"] == b"relay.test"
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        d.verify(idx=1, dnsfunc=ns.txt_lookup())  # the sender's: broken by the boilerplate, as it must be
    cv, _, _ = dkim.arc_verify(final, dnsfunc=ns.txt_lookup())
    assert cv == b"pass"


def test_signing_for_a_domain_without_a_key_is_the_filter_s_error(auth, tmp_path):
    code = "from defang import auth\ndef filter_end(msg):\n    auth.dkim_sign(msg)\n"
    reply = run(runner_for(tmp_path, code), MESSAGE, tmp_path)
    assert reply["verdict"]["code"] == "451"
    assert "no [dkim] key for example.test (keys for: relay.test)" in reply["error"]


# --- DNS down: temperror, within the lifetime ---------------------------------------------------


def test_a_stopped_dns_server_is_temperror_within_the_lifetime(auth, keydir, tmp_path):
    down = Nsd(zones(keydir))
    down.start()
    port = down.port
    down.stop()
    dead = replace(services.CURRENT.auth, dns_servers=(f"127.0.0.1:{port}",))
    services.CURRENT = ServiceSettings(auth=dead)
    auth.resolver.cache_clear()
    start = time.monotonic()
    spf = auth.spf(Conn(), "alice@example.test")
    listed = auth.dnsbl("192.0.2.99", ["bl.test", "dbl.test"])
    took = time.monotonic() - start
    assert spf.result == "temperror" and [bool(r.error) for r in listed.results] == [True, True]
    assert took < 3 * 2 + 2, f"each lookup bounded by its 2 s lifetime: {took:.1f}s"
    reply = run(runner_for(tmp_path, CHECK_AND_STAMP), signed(keydir), tmp_path)
    assert seen(reply) == "temperror ['temperror'] temperror "
