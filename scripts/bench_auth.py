#!/usr/bin/env python3
"""The sender-authentication profile of scripts/bench: the cost of defang.auth at 2 KB.

    scripts/bench --auth [--runs 3] [--count 2000] [--conns 20]

Two stacks behind private Postfix instances, the same 2 KB messages (bench.py's "2k"
profile, each DKIM-signed by the sending domain): defang-minimal (bench/filters/
defang_minimal.py, filter_end returns None) and defang-auth (bench/filters/
defang_auth.py: three IP blocklists at connect side by side, SPF at MAIL FROM, DKIM and
DMARC at end of message, an Authentication-Results header).  DNS: NSD on loopback
(defang.testbed.dns) serving the sender's SPF, DKIM key and DMARC records and three
empty blocklists; each worker caches answers for their TTL (300 s), as in production,
so after the warm-up most lookups are answered from the cache and the figures show
defang's and the libraries' own cost (pyspf, dkimpy's RSA verification in Python,
publicsuffixlist for DMARC).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cells  # noqa: E402

import bench  # noqa: E402
from defang.testbed.dns import Nsd, txt  # noqa: E402

DOMAIN = bench.SENDER.rpartition("@")[2]  # client.invalid: the bench's sender and From domain


class SignedFactory(bench.MessageFactory):
    """bench.py's messages, each with one DKIM-Signature by the sender's domain.  The
    signature covers From, To, Date and the body, the same in every message, so it is
    made once and every message carries it (Message-ID and Subject vary, unsigned)."""

    def __init__(self, profile: bench.Profile, pem: bytes) -> None:
        import dkim

        super().__init__(profile)
        head, tail = super().build("sig", 0)
        message = head + tail
        self.signature = dkim.sign(message, b"bench", DOMAIN.encode(), pem,
                                   canonicalize=(b"relaxed", b"relaxed"),
                                   include_headers=[b"from", b"to", b"date"])  # fmt: skip

    def build(self, tag: str, i: int) -> tuple[bytes, bytes]:
        head, tail = super().build(tag, i)
        return self.signature + head, tail


def zones(public_key: str) -> dict[str, list[str]]:
    return {
        DOMAIN: ["@ TXT " + txt("v=spf1 ip4:127.0.0.1 -all"),
                 "bench._domainkey TXT " + txt(f"v=DKIM1; k=rsa; p={public_key}"),
                 "_dmarc TXT " + txt("v=DMARC1; p=reject")],
        **{f"bl{i}.bench.test": ["example A 127.0.0.2"] for i in (1, 2, 3)},
    }  # fmt: skip


def make_key(directory: Path) -> tuple[bytes, str]:
    import base64

    pem = directory / "bench.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(pem), "2048"], check=True, capture_output=True)
    der = subprocess.run(["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout  # fmt: skip
    return pem.read_bytes(), base64.b64encode(der).decode()


def main() -> int:
    args = bench_cells.arguments("auth", __doc__)
    if args is None:
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    pem, public_key = make_key(workdir)
    profile = replace(bench.PROFILES["2k"], count=args.count, conns=args.conns)
    factory = SignedFactory(profile, pem)
    with Nsd(zones(public_key)) as ns:
        settings = {"dns": {"servers": [ns.server]}, "auth": {"authserv_id": "bench.invalid"}}
        stacks: list[bench.Stack] = [bench.DefangStack("minimal"),
                                     bench.DefangStack("auth", settings=settings)]  # fmt: skip
        results = bench_cells.take_turns(stacks, factory, args.runs, lambda text: print(text, flush=True))
    bench_cells.report("2 KB DKIM-signed messages", args, results, stacks, "auth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
