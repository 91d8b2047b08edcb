#!/usr/bin/env python3
"""Issue 25, item 10: what costly messages do to legitimate mail, through real Postfix.

    scripts/bench_budget.py [--ref main] [--attack 20] [--parts 4900] [--json FILE]

What runs (all on 127.0.0.1, needs root): smtp-sink, a private Postfix relaying to it with
``defang run`` as its milter (default pool: 2 to 10 workers), the filter
bench/filters/defang_quarantine_replace.py (docs/filters.md's quarantine-and-replace
idiom, per part).  ``--ref REF`` runs the daemons from that git revision (``git archive``
into a temporary directory) instead of this checkout: the "before" figure.

Two phases, the same client:

1. *alone*: a 2 KB legitimate message every ``--interval`` seconds for ``--alone``
   seconds;
2. *attack*: ``--attack`` messages of ``--parts`` tiny .exe parts each are sent at once
   (one connection each), while legitimate messages keep coming every ``--interval``
   seconds (each on its own connection, so a slow one does not hold up the next) until
   the last attack message is answered.

Printed (and written to ``--json``): each phase's legitimate latency (connect to the
reply to the final ".", seconds: p50, p95, max) and the attack messages' replies and
times, and the quarantine's files and bytes afterwards.  The machine is shared: compare
runs made back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from defang.testbed import PrivatePostfix, Sink, free_port, send  # noqa: E402
from defang.testbed.access import reachable_by_others  # noqa: E402

REPO = bench.REPO
SENDER, RCPT = "bench@client.example.com", "rcpt@relay.example.net"


def attack_message(parts: int) -> bytes:
    """``parts`` tiny base64 .exe attachments after a one-line text (about 170 bytes a part)."""
    out = [b"From: a@client.example.com\r\nTo: rcpt@relay.example.net\r\nSubject: many parts\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"]  # fmt: skip
    for i in range(parts):
        out.append(b'--b\r\nContent-Type: application/octet-stream; name="f%d.exe"\r\n'
                   b'Content-Disposition: attachment; filename="f%d.exe"\r\n'
                   b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n" % (i, i))  # fmt: skip
    out.append(b"--b--\r\n")
    return b"".join(out)


def legit_message(i: int) -> bytes:
    body = ("Hello,\r\n\r\n" + "This is a legitimate message. " * 60 + "\r\n").encode()
    return (f"From: a@client.example.com\r\nTo: rcpt@relay.example.net\r\nSubject: legit {i}\r\n"
            f"Message-ID: <legit{i}@client.example.com>\r\n\r\n").encode() + body  # fmt: skip


def code_tree(ref: str) -> Path:
    """``ref``'s source tree, runnable as the daemons' ``defang`` (PYTHONPATH first)."""
    where = bench.traversable_dir("defang-budget-code-")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    # an installed defang maps workers/ to defang.workers (pyproject's package-dir)
    (where / "defang" / "workers").symlink_to("../workers")
    return where


class Timed:
    """Sends in threads; keeps (start, seconds, reply code, text) of each."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.results: list[tuple[float, float, int, str]] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def start(self, data: bytes) -> None:
        t = threading.Thread(target=self._send, args=(data,), daemon=True)
        t.start()
        self.threads.append(t)

    def _send(self, data: bytes) -> None:
        t0 = time.monotonic()
        try:
            r = send("127.0.0.1", self.port, SENDER, [RCPT], data, timeout=300)
            reply = r.data or r.mail
            code, text = reply[0], str(reply[1]).split(" queued as")[0][:80]
        except OSError as exc:
            code, text = 0, f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.results.append((t0, time.monotonic() - t0, code, text))

    def join(self) -> None:
        for t in self.threads:
            t.join()


def latency(results: list[tuple[float, float, int, str]]) -> dict[str, Any]:
    secs = sorted(r[1] for r in results)
    return {"n": len(secs), "p50_s": round(bench.percentile(secs, 50), 3),
            "p95_s": round(bench.percentile(secs, 95), 3), "max_s": round(max(secs), 3) if secs else None,
            "codes": dict(Counter(r[2] for r in results))}  # fmt: skip


def tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            size += st.st_blocks * 512  # on disk, as du counts
    return files, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench_budget.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--ref", default="", help="run the daemons from this git revision (e.g. main)")
    ap.add_argument("--attack", type=int, default=20, help="costly messages sent at once")
    ap.add_argument("--parts", type=int, default=4900, help=".exe parts per costly message")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between legitimate messages")
    ap.add_argument("--alone", type=float, default=10.0, help="seconds of legitimate mail alone")
    ap.add_argument("--json", default="", help="write the figures here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench_budget.py: needs root (Postfix's master and smtp-sink)", file=sys.stderr)
        return 2
    work = bench.traversable_dir("defang-budget-")
    code = code_tree(args.ref) if args.ref else REPO
    sink = Sink(work / "sink", free_port(), backlog=1000)
    sink.start()
    stack = pf = None
    try:
        reachable = all(reachable_by_others(p) for p in (code, Path(sys.executable).resolve()))
        user = "defang" if reachable else "root"
        stack = bench.DefangStack("quarantine_replace", settings={"daemon": {"user": user}})
        if args.ref:
            stack.site_dirs = [str(code)]
        stack.start()
        pf = PrivatePostfix(work / "postfix", free_port(), sink.port, milter=stack.milter_spec,
                            extra={"message_size_limit": "52428800"})  # fmt: skip
        pf.start()
        alone = Timed(pf.smtp_port)
        i = 0
        t_end = time.monotonic() + args.alone
        while time.monotonic() < t_end:
            alone.start(legit_message(i))
            i += 1
            time.sleep(args.interval)
        alone.join()
        attack, during = Timed(pf.smtp_port), Timed(pf.smtp_port)
        big = attack_message(args.parts)
        t0 = time.monotonic()
        for _ in range(args.attack):
            attack.start(big)
        while any(t.is_alive() for t in attack.threads):
            during.start(legit_message(i))
            i += 1
            time.sleep(args.interval)
        attack_wall = time.monotonic() - t0
        attack.join()
        during.join()
        files, size = tree_size(stack.dir / "run" / "quarantine")
        out = {
            "code": args.ref or "this checkout", "attack_messages": args.attack, "parts": args.parts,
            "attack_bytes": len(big), "legit_alone": latency(alone.results),
            "legit_during_attack": latency(during.results), "attack": latency(attack.results),
            "attack_replies": dict(Counter(r[3] for r in attack.results)),
            "attack_wall_s": round(attack_wall, 1), "quarantine_files": files,
            "quarantine_mb": round(size / 1e6, 1),
            "worker_log_lines": [ln for ln in stack.log_path.read_text(errors="replace").splitlines()
                                 if "WARNING" in ln or "ERROR" in ln][:5],
        }  # fmt: skip
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0
    finally:
        if pf is not None:
            pf.stop()
        if stack is not None:
            stack.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
        if args.ref:
            shutil.rmtree(code, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
