"""Forged and long Authentication-Results (RFC 8601), Ed25519 (RFC 8463), key records' h=
and rsa-sha1 (RFC 6376, RFC 8301), an ARC chain whose latest seal says cv=fail (RFC 8617):
issue 26 items 6 to 10, through ``defang test`` against the loopback DNS server."""

from __future__ import annotations

import authres
import dkim
import pytest
from authzones import ed_key, key
from test_auth_rfc import DMARC, PROBE, ar_value, body, refused, run, seen, write_config
from test_examples import EXAMPLES


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


@pytest.fixture
def cfg(tmp_path, ns, keydir):
    return write_config(tmp_path, ns, keydir)


def signed(keydir, msg: bytes, selector: bytes = b"sel", algorithm: bytes = b"rsa-sha256") -> bytes:
    if algorithm == b"ed25519-sha256":
        secret = ed_key("sender", keydir)[0].read_bytes().strip()
    else:
        secret = key("sender", keydir)[0].read_bytes()
    return dkim.sign(msg, selector, b"example.test", secret, canonicalize=(b"relaxed", b"relaxed"),
                     signature_algorithm=algorithm) + msg  # fmt: skip


# --- 6. forged Authentication-Results, however written (RFC 8601 5) --------------------------------

FORGED = [
    "mx.relay.test 1; dkim=pass header.d=example.test",  # a version
    "mx.relay.test (ours, honest); dkim=pass",  # a comment
    "(first) MX.Relay.Test; spf=pass",  # a comment before, another case
    '"mx.relay.test"; dmarc=pass',  # a quoted-string (authres cannot read it)
    '"mx.relay\\.test" ; dkim=pass',  # a quoted pair inside it
    "mx.relay.test;\r\n\tdkim=pass",  # folded
]
KEPT = ["other.example; spf=pass", "mx.relay.test.evil; dkim=pass", '"mx.relay.test x"; dkim=pass']


def test_every_authentication_results_claiming_our_id_is_removed_and_counted(cfg, tmp_path):
    fields = [*FORGED, *KEPT]
    extra = "".join(f"Authentication-Results: {v}\r\n" for v in fields)
    r = run(body(extra=extra), tmp_path, cfg, DMARC, sender="alice@example.test", ip="192.0.2.5")
    removed = sorted(a[2] for a in r["actions"] if a[0] == "delete_header")
    assert removed == list(range(1, len(FORGED) + 1)), r["actions"]
    assert "forged_auth_results" in r["tags"]


# --- 7. folded at 78, written in RFC 8601's grammar ----------------------------------------------------


def test_six_failing_signatures_give_a_folded_header_in_rfc_8601_grammar(cfg, probe, tmp_path, keydir):
    msg = body()
    for _ in range(6):
        msg = signed(keydir, msg)
    altered = msg.replace(b"The figures.", b"Other figures.")
    r = run(altered, tmp_path, cfg, probe, sender="x;dkim=pass@evil.test")
    value = ar_value(r)
    lines = f"Authentication-Results: {value}".split("\n")
    assert max(len(line) for line in lines) <= 78, lines
    assert all(line.startswith("\t") for line in lines[1:])
    assert "b'" not in value and 'b"' not in value
    parsed = authres.AuthenticationResultsHeader.parse_value(value.replace("\n", ""))
    assert [x.method for x in parsed.results] == ["spf"] + ["dkim"] * 6 + ["arc", "dmarc"]
    assert all(x.result == "fail" for x in parsed.results if x.method == "dkim")
    assert "dkim=fail (body hash mismatch got " in value.replace("\n\t", " ")
    # a hostile MAIL FROM stays one pvalue: its local part quoted, no second result
    assert 'smtp.mailfrom="x;dkim=pass"@evil.test' in value
    assert parsed.results[0].smtp_mailfrom == '"x;dkim=pass"@evil.test'


# --- 8. Ed25519 (RFC 8463) ---------------------------------------------------------------------------


def test_an_ed25519_signature_verifies(cfg, probe, tmp_path, keydir):
    d = seen(run(signed(keydir, body(), b"ed", b"ed25519-sha256"), tmp_path, cfg, probe))
    assert d["dkim"] == [["pass", "example.test", ""]] and d["dmarc"]["result"] == "pass"
    tampered = signed(keydir, body(), b"ed", b"ed25519-sha256").replace(b"The figures.", b"Changed.")
    assert seen(run(tampered, tmp_path, cfg, probe))["dkim"][0][0] == "fail"


def test_the_dkim_sign_example_signs_with_rsa_and_ed25519(tmp_path, ns, keydir):
    rsa, ed = key("relay", keydir)[0], ed_key("relay", keydir)[0]
    keys = (f'{{domain = "relay.test", selector = "s2026", key = "{rsa}"}}, '
            f'{{domain = "relay.test", selector = "ed2026", key = "{ed}"}}')  # fmt: skip
    cfg = write_config(tmp_path, ns, keydir, keys=keys)
    source = (EXAMPLES / "dkim_sign.py").read_text().replace('OUR_DOMAINS = {"example.com"}',
                                                              'OUR_DOMAINS = {"relay.test"}')  # fmt: skip
    (tmp_path / "dkim_sign.py").write_text(source)
    example = tmp_path / "dkim_sign.py"
    r = run(body("a@relay.test"), tmp_path, cfg, example, sender="a@relay.test", ip="127.0.0.1")
    sigs = [a for a in r["actions"] if a[0] == "insert_header" and a[2] == "DKIM-Signature"]
    assert sorted("a=ed25519-sha256" in s[3] for s in sigs) == [False, True], "one RSA, one Ed25519"
    out = body("a@relay.test")
    for s in reversed(sigs):
        out = f"DKIM-Signature: {s[3]}".replace("\n", "\r\n").encode() + b"\r\n" + out
    for idx in (0, 1):  # each verifies on its own, by its own key record
        assert dkim.DKIM(out).verify(idx=idx, dnsfunc=ns.txt_lookup())


@pytest.mark.parametrize("content, why", [
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
     "not an RSA private key dkimpy can read"),
    (b"c2hvcnQ=\n", "neither a PEM RSA private key nor an Ed25519 seed (base64, 32 bytes)"),
])  # fmt: skip
def test_a_key_that_cannot_sign_refuses_the_load_in_one_line(tmp_path, ns, keydir, content, why):
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    cfg = write_config(tmp_path, ns, keydir, keys=f'{{domain = "relay.test", selector = "x", key = "{bad}"}}')
    code = tmp_path / "sign.py"
    code.write_text("from defang import auth\ndef filter_end(msg):\n    auth.dkim_sign(msg, 'relay.test')\n")
    line = refused(body("a@relay.test"), tmp_path, cfg, code)
    assert line.startswith(f"{code}: key for relay.test ({bad}): {why}"), line


# --- 9. key records' h= (RFC 6376 3.6.1), rsa-sha1 (RFC 8301 3.1) ---------------------------------------


def test_the_key_record_s_hash_list_is_honoured(cfg, probe, tmp_path, keydir):
    d = seen(run(signed(keydir, body(), b"sha1only"), tmp_path, cfg, probe))["dkim"]
    assert d == [["fail", "example.test", "the key record allows h=sha1, not sha256"]]
    assert seen(run(signed(keydir, body(), b"both"), tmp_path, cfg, probe))["dkim"][0][0] == "pass"


def test_rsa_sha1_fails_unless_the_config_accepts_it(tmp_path, ns, keydir, probe):
    msg = signed(keydir, body(), b"sel", b"rsa-sha1")
    cfg = write_config(tmp_path, ns, keydir)
    d = seen(run(msg, tmp_path, cfg, probe))
    assert d["dkim"] == [["fail", "example.test", "rsa-sha1 is not accepted (RFC 8301 3.1)"]]
    assert d["dmarc"]["result"] == "fail"
    lax = write_config(tmp_path, ns, keydir, dkim_extra="accept_rsa_sha1 = true")
    assert seen(run(msg, tmp_path, lax, probe))["dkim"][0][0] == "pass"


# --- 10. ARC: the latest seal says cv=fail (RFC 8617 5.2) ---------------------------------------------


def test_a_chain_whose_latest_seal_says_fail_is_arc_fail(cfg, probe, tmp_path, keydir):
    pem = key("relay", keydir)[0].read_bytes()

    def seal(msg: bytes, arc: bytes) -> bytes:  # as a forwarder seals: cv= from its own arc= result
        msg = b"Authentication-Results: relay.test; arc=" + arc + b"\r\n" + msg
        return b"".join(dkim.arc_sign(msg, b"arc", b"relay.test", pem, b"relay.test")) + msg

    first = seal(body(), b"none")
    broken = seal(first.replace(b"The figures.", b"Changed after the first seal."), b"fail")
    assert broken.startswith(b"ARC-Seal: i=2; cv=fail;"), broken[:60]
    arc = seen(run(broken, tmp_path, cfg, probe))["arc"]
    assert arc[0] == "fail", arc
    assert seen(run(first, tmp_path, cfg, probe))["arc"][0] == "pass"
