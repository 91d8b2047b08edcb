"""A signing key that cannot sign is refused when the filter loads, in one line, and a
reload that meets one keeps the running filter (issue 26 item 8): never a tempfail per
message.  Real defang daemons, the fake MTA, the test DNS server."""

import shutil

from authzones import key, share_with_daemons
from daemon import Defang
from fakemta import MilterSession

MSG = b"From: a@relay.test\r\nTo: b@example.org\r\nSubject: %s\r\n\r\nHello\r\n"
SIGN = "from defang import auth\n\ndef filter_end(msg):\n    auth.dkim_sign(msg, 'relay.test')\n"


def signatures(d: Defang, subject: bytes) -> list[str]:
    with MilterSession(d.milter_path) as s:
        s.connect(port=40000)
        s.helo()
        s.mail("a@relay.test")
        s.rcpt("b@example.org")
        result = s.message(MSG % subject, queue_id="Q1")
    return [a[1][2] for a in result.actions if a[0] == "insheader" and a[1][1] == "DKIM-Signature"]


def test_a_key_that_cannot_sign_refuses_the_reload_and_the_old_filter_signs_on(ns, keydir):
    pem = keydir / "reload.pem"
    shutil.copy(key("relay", keydir)[0], pem)
    share_with_daemons(pem, 0o640)
    filt = keydir / "sign_filter.py"  # beside the key: reachable by the daemons' user
    filt.write_text(SIGN)
    filt.chmod(0o644)
    settings = {"dns": {"servers": [ns.server], "timeout": 1, "lifetime": 2},
                "dkim": {"keys": [{"domain": "relay.test", "selector": "s2026", "key": str(pem)}]},
                "multiplexor": {"min_workers": 1, "max_workers": 1}}  # fmt: skip
    d = Defang(filt, settings=settings).start()
    try:
        assert len(signatures(d, b"before")) == 1
        pem.write_bytes(b"not a key at all\n")
        r = d.ctl("reload")
        assert r.returncode == 1, r
        why = f"key for relay.test ({pem}): neither a PEM RSA private key nor an Ed25519 seed"
        assert why in r.stdout and len(r.stdout.strip().splitlines()) == 1, r.stdout
        assert d.status()["generation"] == 1
        assert len(signatures(d, b"after")) == 1, "the running filter, its key read at its load, signs on"
    finally:
        d.stop()
        d.cleanup()
        filt.unlink()
        pem.unlink()
