#!/usr/bin/env python3
"""Issue 25, item 10: what costly messages do to legitimate mail, through real Postfix.

    scripts/bench_budget.py [--ref main] [--attack 20] [--parts 4900] [--json FILE]
    scripts/bench_budget.py --one [--ref main] [--parts 4900]

``--one``: one such message through ``FilterRunner.handle`` in a fresh process (no MTA,
no daemons, no root), with three filters -- the walk alone (``has_extension``), the walk
and ``part.replace``, and the whole idiom (``part.quarantine`` + ``replace``) -- printing
each one's CPU seconds, peak RSS and quarantine files; the replace step's cost per part
is (replace - walk) / parts.

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
times, the quarantine's files and bytes afterwards, and the CPU seconds each part of
the stack used during the attack phase (the workers: "zygote+workers").  The machine is shared: compare
runs made back to back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


ONE = r"""
import json, os, resource, sys, tempfile, time
from pathlib import Path
from defang.core import config, wire
from defang.core.verdicts import tempfail
from defang.workers.loader import load_filter
from defang.workers.runner import FilterRunner
HEAD = ("from defang import DANGEROUS_EXTENSIONS\n"
        "def filter_part(msg, part):\n"
        "    if part.has_extension(DANGEROUS_EXTENSIONS):\n")
REPLACE = "        part.replace(f'removed {qid}', filename=part.filename + '.removed.txt')\n"
BODY = {"walk": "        pass\n", "replace": "        qid = 1\n" + REPLACE,
        "quarantine+replace": "        qid = part.quarantine('exe')\n" + REPLACE}
name, spool = sys.argv[1], sys.argv[2]
work = Path(tempfile.mkdtemp(prefix="defang-one-"))
cfg = config.finish(config.Config(runtime_dir=work / "run"))
(work / "run" / "quarantine").mkdir(parents=True)  # as defang run makes it
(work / "f.py").write_text(HEAD + BODY[name])
runner = FilterRunner(load_filter(str(work / "f.py")), on_filter_error=tempfail(), config=cfg)
conn = {"id": 1, "ip": "192.0.2.1", "hostname": "h", "port": 25, "helo": "h", "macros": {}, "notes": {}}
body = json.dumps({"v": wire.VERSION, "op": "eom", "conn": conn, "sender": "a@example.org", "sender_args": [],
                   "recipients": ["b@example.org"], "queue_id": "ONE", "spool": spool,
                   "size": os.path.getsize(spool)}).encode()
c0 = time.process_time()
reply = runner.handle_body(body)
cpu = time.process_time() - c0
files = sum(len(f) for _, _, f in os.walk(work / "run" / "quarantine"))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"filter": name, "cpu_s": round(cpu, 3), "verdict": reply.verdict.action,
                  "error": reply.error, "max_rss_mb": rss, "quarantine_files": files}))
"""


def one_message(code: Path, parts: int) -> list[dict[str, Any]]:
    """One costly message through FilterRunner.handle, in a fresh process per filter."""
    work = Path(tempfile.mkdtemp(prefix="defang-one-"))
    try:
        spool = work / "message"
        spool.write_bytes(attack_message(parts))
        out = []
        for name in ("walk", "replace", "quarantine+replace"):
            env = {**os.environ, "PYTHONPATH": str(code)}
            run = subprocess.run([sys.executable, "-c", ONE, name, str(spool)], cwd=code, capture_output=True,
                                 text=True, env=env, check=True)  # fmt: skip
            out.append(json.loads(run.stdout))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    ap.add_argument("--one", action="store_true", help="one message, no MTA (see above)")
    ap.add_argument("--max-cpu-seconds", type=float, default=None,
                    help="[filter] max_cpu_seconds for the daemons (default: the config's default)")
    args = ap.parse_args(argv)
    if args.one:
        code = code_tree(args.ref) if args.ref else REPO
        try:
            rows = one_message(code, args.parts)
        finally:
            if args.ref:
                shutil.rmtree(code, ignore_errors=True)
        walk, replace = rows[0]["cpu_s"], rows[1]["cpu_s"]
        print(json.dumps({"code": args.ref or "this checkout", "parts": args.parts, "filters": rows,
                          "replace_ms_per_part": round((replace - walk) * 1000 / args.parts, 3)}, indent=2))
        return 0
    if os.geteuid() != 0:
        print("scripts/bench_budget.py: needs root (Postfix's master and smtp-sink)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as cleanup:  # undone in reverse: Postfix, defang, the sink, the dirs
        work = bench.traversable_dir("defang-budget-")
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        code = code_tree(args.ref) if args.ref else REPO
        if args.ref:
            cleanup.callback(shutil.rmtree, code, ignore_errors=True)
        return attack_run(args, work, code, cleanup)


def attack_run(args: argparse.Namespace, work: Path, code: Path, cleanup: contextlib.ExitStack) -> int:
    """The two phases (see the module docstring); what it starts goes on ``cleanup``."""
    sink = Sink(work / "sink", free_port(), backlog=1000)
    sink.start()
    cleanup.callback(sink.stop)
    reachable = all(reachable_by_others(p) for p in (code, Path(sys.executable).resolve()))
    user = "defang" if reachable else "root"
    settings: dict[str, dict[str, Any]] = {"daemon": {"user": user}}
    if args.max_cpu_seconds is not None:
        settings["filter"] = {"max_cpu_seconds": args.max_cpu_seconds}
    stack = bench.DefangStack("quarantine_replace", settings=settings)
    if args.ref:  # the daemons start in (and import from) the other tree: python -m puts cwd first
        bench.REPO = code
    stack.start()
    cleanup.callback(stack.stop)
    pf = PrivatePostfix(work / "postfix", free_port(), sink.port, milter=stack.milter_spec,
                        extra={"message_size_limit": "52428800"})  # fmt: skip
    pf.start()
    cleanup.callback(pf.stop)
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
    roles = {**stack.roles(), "postfix": (pf.master_pid() or 0, "tree")}
    cpu0 = bench.role_cpu(roles)
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
    time.sleep(1)  # Postfix's cleanup and delivery of the last ones
    cpu1 = bench.role_cpu(roles)
    files, size = tree_size(stack.dir / "run" / "quarantine")
    out = {
        "code": args.ref or "this checkout", "max_cpu_seconds": args.max_cpu_seconds,
        "attack_messages": args.attack, "parts": args.parts,
        "attack_bytes": len(big), "legit_alone": latency(alone.results),
        "legit_during_attack": latency(during.results), "attack": latency(attack.results),
        "attack_replies": dict(Counter(r[3] for r in attack.results)),
        "attack_wall_s": round(attack_wall, 1), "quarantine_files": files,
        "quarantine_mb": round(size / 1e6, 1),
        "cpu_s_during_attack": {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1},
        "worker_log_lines": [ln for ln in stack.log_path.read_text(errors="replace").splitlines()
                             if "WARNING" in ln or "ERROR" in ln][:5],
    }  # fmt: skip
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
