"""Test zones for defang.auth: blocklists, SPF, DKIM keys, DMARC records, served by NSD
(defang.testbed.dns), and the DKIM keys behind them (openssl genrsa, once per session)."""

from __future__ import annotations

import base64
import grp
import os
import subprocess
from functools import cache
from pathlib import Path

from defang.testbed.dns import txt


def share_with_daemons(path: Path, mode: int) -> None:
    """As a signing key is installed: readable by the defang group (the daemons drop root to
    it), nobody else."""
    try:
        os.chown(path, -1, grp.getgrnam("defang").gr_gid)
    except (KeyError, PermissionError):
        return
    os.chmod(path, mode)


@cache
def key(name: str, workdir: Path) -> tuple[Path, str]:
    """A 2048-bit RSA key: (the PEM file, the p= value for its DNS record)."""
    pem = workdir / f"{name}.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(pem), "2048"], check=True, capture_output=True)
    share_with_daemons(pem, 0o640)
    der = subprocess.run(["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout  # fmt: skip
    return pem, base64.b64encode(der).decode()


@cache
def ed_key(name: str, workdir: Path) -> tuple[Path, str]:
    """An Ed25519 key (RFC 8463, PyNaCl): (the file as dkimpy signs with it: the base64 of
    the 32-byte seed, the p= value for its DNS record)."""
    import nacl.signing

    signing = nacl.signing.SigningKey.generate()
    seed = workdir / f"{name}.ed25519"
    seed.write_bytes(base64.b64encode(bytes(signing)) + b"\n")
    share_with_daemons(seed, 0o640)
    return seed, base64.b64encode(bytes(signing.verify_key)).decode()


def zones(workdir: Path) -> dict[str, list[str]]:
    _, sender_key = key("sender", workdir)
    _, relay_key = key("relay", workdir)
    _, sender_ed = ed_key("sender", workdir)
    _, relay_ed = ed_key("relay", workdir)
    return {
        "bl.test": [  # an IP list: 192.0.2.99, 127.0.0.2 (the lists' test entry), 2001:db8::99
            "99.2.0.192 A 127.0.0.4", "99.2.0.192 TXT " + txt("192.0.2.99 is a spam source, see bl.test"),
            "2.0.0.127 A 127.0.0.2",
            "9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2 A 127.0.0.3",
        ],
        "local.bl.test": ["1.0.0.127 A 127.0.0.2", "1.0.0.127 TXT " + txt("loopback listed for the test")],
        "refusing.test": ["99.2.0.192 A 127.255.255.254"],
        "dbl.test": ["spammer.com A 127.0.1.2", "spammer.com TXT " + txt("spam domain")],
        "example.test": [
            "@ TXT " + txt("v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all"),
            "soft TXT " + txt("v=spf1 ~all"),
            "broken TXT " + txt("v=spf1 ip4:300.1.2.3 -all"),
            "fails TXT " + txt("v=spf1 -all"),
            "sel._domainkey TXT " + txt(f"v=DKIM1; k=rsa; p={sender_key}"),
            "_dmarc TXT " + txt("v=DMARC1; p=reject"),
            "quiet TXT " + txt("v=spf1 -all"),
            "_dmarc.quiet TXT " + txt("v=DMARC1; p=quarantine"),
            # a bounce's HELO name (SPF of postmaster@bouncer.example.test, RFC 7208 2.4)
            "bouncer TXT " + txt("v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all"),
            # several TXT records at _dmarc: one DMARC record among others; two DMARC records
            "mixed TXT " + txt("v=spf1 -all"),
            "_dmarc.mixed TXT " + txt("v=spf1 -all"), "_dmarc.mixed TXT " + txt("v=DMARC1; p=reject"),
            "_dmarc.mixed TXT " + txt("google-site-verification=abc"),
            "twice TXT " + txt("v=spf1 -all"),
            "_dmarc.twice TXT " + txt("v=DMARC1; p=reject"), "_dmarc.twice TXT " + txt("v=DMARC1; p=none"),
            # pct (RFC 7489 6.6.4): nobody sampled, everybody sampled
            "sampled TXT " + txt("v=spf1 -all"),
            "_dmarc.sampled TXT " + txt("v=DMARC1; p=reject; pct=0"),
            "everyone TXT " + txt("v=spf1 -all"),
            "_dmarc.everyone TXT " + txt("v=DMARC1; p=reject; pct=100"),
            # Ed25519 (RFC 8463); a key record that allows sha1 only (h=, RFC 6376 3.6.1)
            "ed._domainkey TXT " + txt(f"v=DKIM1; k=ed25519; p={sender_ed}"),
            "sha1only._domainkey TXT " + txt(f"v=DKIM1; h=sha1; k=rsa; p={sender_key}"),
            "both._domainkey TXT " + txt(f"v=DKIM1; h=sha1:sha256; k=rsa; p={sender_key}"),
            # strict alignment (RFC 7489 3.1.1, 3.1.2): a subdomain's SPF pass, a parent's
            # signature: aligned relaxed, not strict
            "strict TXT " + txt("v=spf1 -all"),
            "_dmarc.strict TXT " + txt("v=DMARC1; p=reject; adkim=s; aspf=s"),
            "mail.strict TXT " + txt("v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all"),
        ],
        "relay.test": [
            "@ TXT " + txt("v=spf1 ip4:127.0.0.1 -all"),
            "s2026._domainkey TXT " + txt(f"v=DKIM1; k=rsa; p={relay_key}"),
            "arc._domainkey TXT " + txt(f"v=DKIM1; k=rsa; p={relay_key}"),
            "ed2026._domainkey TXT " + txt(f"v=DKIM1; k=ed25519; p={relay_ed}"),
        ],
        # a TLD the public suffix list does not know: its organisational domains are one
        # label below it (the list's default rule "*"), so evil. does not align with bank.
        "nosuchtld": [
            "bank TXT " + txt("v=spf1 -all"), "_dmarc.bank TXT " + txt("v=DMARC1; p=reject"),
            "mail.bank TXT " + txt("v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all"),
            "evil TXT " + txt("v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all"),
        ],
        # strict alignment where the From domain is itself the organizational domain
        "strict.test": [
            "@ TXT " + txt("v=spf1 -all"), "_dmarc TXT " + txt("v=DMARC1; p=reject; adkim=s; aspf=s"),
            "mail TXT " + txt("v=spf1 ip4:192.0.2.0/24 -all"),
            "sel._domainkey.mail TXT " + txt(f"v=DKIM1; k=rsa; p={sender_key}"),
        ],
        "nodmarc.test": ["@ TXT " + txt("v=spf1 ip4:192.0.2.0/24 -all")],
        # the public suffix list knows no .test: DMARC's organizational domain of x.test is
        # "test", whose _dmarc record must be missing, not refused
        "test": [],
    }
