"""The ways round a DMARC policy and the Authentication-Results header (issue 26), each
through ``defang test`` against the loopback DNS server (NSD, support/authzones.py):
several From addresses, bounces, a TLD the public suffix list does not know, several TXT
records at _dmarc, pct, forged and long Authentication-Results, Ed25519, key records' h=
and rsa-sha1, an ARC chain whose latest seal says cv=fail.  Each test names the RFC clause
that decides it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from authzones import key
from paths import REPO
from test_examples import EXAMPLES, trial

PROBE = """
import json
from defang import auth

def filter_end(msg):
    r = auth.check(msg)
    auth.add_results_header(msg, r)
    d = r.dmarc
    msg.add_header("X-Seen", json.dumps({
        "spf": r.spf.result, "dkim": [[x.result, x.domain, x.comment] for x in r.dkim],
        "arc": [r.arc.result, r.arc.comment],
        "dmarc": {k: getattr(d, k) for k in ("result", "from_domain", "policy", "comment", "pct",
                                              "disposition", "from_domains")}}))
"""
DMARC = EXAMPLES / "dmarc_reject.py"


def body(frm: str = "Alice <alice@example.test>", extra: str = "", text: str = "The figures.") -> bytes:
    return (f"From: {frm}\r\nTo: bob@relay.test\r\nSubject: Figures\r\n{extra}"
            "Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <rfc@example.test>\r\n\r\n"
            f"{text}\r\n").encode()  # fmt: skip


def write_config(tmp_path: Path, ns, keydir: Path, auth: str = "", dkim_extra: str = "",
                 keys: str = "") -> Path:  # fmt: skip
    relay = key("relay", keydir)[0]
    keys = keys or f'{{domain = "relay.test", selector = "s2026", key = "{relay}"}}'
    path = tmp_path / "defang.toml"
    path.write_text(f'[dns]\nservers = ["{ns.server}"]\ntimeout = 1\nlifetime = 2\n'
                    f'[auth]\nauthserv_id = "mx.relay.test"\n{auth}\n'
                    f'[dkim]\nkeys = [{keys}]\n{dkim_extra}\n'
                    f'[arc]\nkey = {{domain = "relay.test", selector = "arc", key = "{relay}"}}\n'
                    )  # fmt: skip
    return path


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


def run(msg: bytes, tmp_path: Path, config: Path, filter_path: Path, sender: str = "alice@example.test",
        ip: str = "198.51.100.7", helo: str = "mx.example.test") -> dict:  # fmt: skip
    return trial(msg, tmp_path, "--config", str(config), "--sender", sender, "--ip", ip, "--helo", helo,
                 filter_path=filter_path)  # fmt: skip


def refused(msg: bytes, tmp_path: Path, config: Path, filter_path: Path) -> str:
    """``defang test`` and ``defang check`` refusing to load: the one line both print."""
    eml = tmp_path / "refused.eml"
    eml.write_bytes(msg)
    lines = []
    for argv in (["test", str(eml), "--json"], ["check"]):
        argv = [sys.executable, "-m", "defang", *argv, "--config", str(config), "--filter", str(filter_path)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode != 0 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r
        lines.append(r.stderr.strip())
    assert lines[0] == lines[1]
    return lines[0]


def seen(result: dict) -> dict:
    return json.loads(next(a[2] for a in result["actions"] if a[0] == "add_header" and a[1] == "X-Seen"))


def ar_value(result: dict) -> str:
    inserted = [a for a in result["actions"] if a[0] == "insert_header"]
    return next(a[3] for a in inserted if a[2] == "Authentication-Results")


@pytest.fixture
def cfg(tmp_path, ns, keydir):
    return write_config(tmp_path, ns, keydir)


# --- 1. several author domains (RFC 7489 6.6.1) ------------------------------------------------


@pytest.mark.parametrize("frm, extra, what", [
    ("a@relay.test, b@example.test", "", "2 author domains"),
    ("b@example.test, a@relay.test", "", "2 author domains"),
    ("a@relay.test", "From: b@example.test\r\n", "2 From fields"),
])  # fmt: skip
def test_every_author_domain_is_checked_and_the_strictest_failure_stands(cfg, probe, tmp_path, frm, extra,
                                                                         what):  # fmt: skip
    # relay.test publishes no DMARC record; example.test says p=reject and nothing aligns
    msg = body(frm, extra)
    d = seen(run(msg, tmp_path, cfg, probe, sender="a@relay.test"))["dmarc"]
    assert (d["result"], d["from_domain"], d["disposition"]) == ("fail", "example.test", "reject")
    assert sorted(d["from_domains"]) == ["example.test", "relay.test"]
    assert d["comment"].startswith(f"{what}: ") and "example.test fail" in d["comment"]
    r = run(msg, tmp_path, cfg, DMARC, sender="a@relay.test")
    assert r["outcome"]["code"] == "550"
    assert r["outcome"]["text"] == "DMARC policy of example.test rejects this message"


@pytest.mark.parametrize("frm", ["Bank <b@example.test>>", "b@example.test (", "Bank <b@example.test> x"])
def test_a_from_the_strict_parser_cannot_read_does_not_escape_the_policy(cfg, probe, tmp_path, frm):
    # Python's parser reads no address here; a mail client shows b@example.test
    d = seen(run(body(frm), tmp_path, cfg, probe, sender="a@relay.test"))["dmarc"]
    assert (d["result"], d["from_domain"], d["disposition"]) == ("fail", "example.test", "reject")
    assert run(body(frm), tmp_path, cfg, DMARC, sender="a@relay.test")["outcome"]["code"] == "550"


# --- 2. bounces: SPF of the HELO name (RFC 7208 2.4, RFC 7489 4.1) -------------------------------


def test_a_bounce_is_aligned_by_the_spf_result_of_its_helo_name(cfg, probe, tmp_path):
    bounce = body("Mail Delivery System <MAILER-DAEMON@example.test>")
    seen_ = seen(run(bounce, tmp_path, cfg, probe, sender="", ip="192.0.2.5", helo="bouncer.example.test"))
    assert seen_["spf"] == "pass"
    d = seen_["dmarc"]
    assert (d["result"], d["comment"]) == ("pass", "aligned: spf bouncer.example.test")
    r = run(bounce, tmp_path, cfg, DMARC, sender="", ip="192.0.2.5", helo="bouncer.example.test")
    assert r["outcome"]["action"] == "continue" and r["exit"] == 0
    assert "smtp.helo=bouncer.example.test" in ar_value(r)
    # a HELO name whose SPF fails aligns nothing: the p=reject domain's bounce is refused
    r = run(bounce, tmp_path, cfg, DMARC, sender="", ip="198.51.100.7", helo="bouncer.example.test")
    assert r["outcome"]["code"] == "550"


# --- 3. organisational domains under a TLD the list does not know (RFC 7489 3.2, PSL "*") ---------


def test_an_unknown_tld_is_a_public_suffix_so_its_neighbours_do_not_align(cfg, probe, tmp_path):
    bank = body("Bank <alice@bank.nosuchtld>")
    d = seen(run(bank, tmp_path, cfg, probe, sender="x@evil.nosuchtld", ip="192.0.2.5"))["dmarc"]
    assert (d["result"], d["policy"]) == ("fail", "reject"), "evil.nosuchtld is not bank.nosuchtld's"
    r = run(bank, tmp_path, cfg, DMARC, sender="x@evil.nosuchtld", ip="192.0.2.5")
    assert r["outcome"]["code"] == "550"
    d = seen(run(bank, tmp_path, cfg, probe, sender="x@mail.bank.nosuchtld", ip="192.0.2.5"))["dmarc"]
    assert (d["result"], d["comment"]) == ("pass", "aligned: spf mail.bank.nosuchtld"), "relaxed: same org"


def test_the_public_suffix_list_is_the_configured_file(probe, tmp_path, ns, keydir):
    psl = tmp_path / "psl.dat"
    psl.write_text("// a private registry under bank.nosuchtld\nnosuchtld\nbank.nosuchtld\n")
    cfg = write_config(tmp_path, ns, keydir, auth=f'public_suffix_list = "{psl}"')
    bank = body("Bank <alice@bank.nosuchtld>")
    d = seen(run(bank, tmp_path, cfg, probe, sender="x@mail.bank.nosuchtld", ip="192.0.2.5"))["dmarc"]
    assert d["result"] == "fail", "mail.bank.nosuchtld is its own organisational domain by this list"
    missing = write_config(tmp_path, ns, keydir, auth=f'public_suffix_list = "{tmp_path}/nope.dat"')
    assert refused(bank, tmp_path, missing, probe) == (
        f"{probe}: [auth] public_suffix_list {tmp_path}/nope.dat: No such file or directory")


# --- 4. every TXT record at _dmarc (RFC 7489 6.6.3) ------------------------------------------------


def test_the_one_dmarc_record_among_other_txt_records_is_used(cfg, probe, tmp_path):
    d = seen(run(body("a@mixed.example.test"), tmp_path, cfg, probe, sender="a@mixed.example.test"))["dmarc"]
    assert (d["result"], d["policy"], d["disposition"]) == ("fail", "reject", "reject")


def test_two_dmarc_records_are_no_policy_not_the_organisational_domain_s(cfg, probe, tmp_path):
    d = seen(run(body("a@twice.example.test"), tmp_path, cfg, probe, sender="a@twice.example.test"))["dmarc"]
    assert (d["result"], d["policy"]) == ("none", "")
    assert d["comment"] == "2 DMARC records at _dmarc.twice.example.test: no policy (RFC 7489 6.6.3)"


# --- 5. pct (RFC 7489 6.6.4) -------------------------------------------------------------------------


def test_pct_is_exposed_and_a_message_outside_the_sample_gets_the_next_policy_down(cfg, probe, tmp_path):
    msg = body("a@sampled.example.test")
    d = seen(run(msg, tmp_path, cfg, probe, sender="a@sampled.example.test"))["dmarc"]
    assert (d["result"], d["policy"], d["pct"], d["disposition"]) == ("fail", "reject", 0, "quarantine")
    assert d["comment"].endswith("pct=0: outside the sample, quarantine applies")
    r = run(msg, tmp_path, cfg, DMARC, sender="a@sampled.example.test")
    assert r["exit"] == 0 and ["change_header", "Subject", "[DMARC] Figures", 1] in r["actions"]
    assert r["tags"] == ["dmarc_quarantine"]
    every = body("a@everyone.example.test")
    d = seen(run(every, tmp_path, cfg, probe, sender="a@everyone.example.test"))["dmarc"]
    assert (d["pct"], d["disposition"]) == (100, "reject")
    assert run(every, tmp_path, cfg, DMARC, sender="a@everyone.example.test")["outcome"]["code"] == "550"


# --- 6. an author domain DNS cannot hold (RFC 7489 6.6.3 at its organisational domain) -------------


@pytest.mark.parametrize("frm", ["a@b..example.test", "a@" + "x" * 64 + ".example.test"])
def test_a_from_domain_dns_cannot_hold_is_under_its_organisational_domain(cfg, probe, tmp_path, frm):
    # no record can be at _dmarc of an empty label or a 64-octet one: that is "none there", not
    # "no answer", so example.test's p=reject applies, as for any other name under it (a
    # temperror would tempfail the message on every retry until it expires)
    d = seen(run(body(frm), tmp_path, cfg, probe, sender="a@relay.test"))["dmarc"]
    assert (d["result"], d["policy"], d["disposition"]) == ("fail", "reject", "reject")
    assert run(body(frm), tmp_path, cfg, DMARC, sender="a@relay.test")["outcome"]["code"] == "550"
