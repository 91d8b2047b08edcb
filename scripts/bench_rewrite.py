#!/usr/bin/env python3
"""What rewriting a message costs a worker: FilterRunner.handle, no MTA, no daemons.

For a 100 KB and a 5 MB message (a text body, an HTML alternative, a PDF-like
attachment that makes up the size, and a small .exe), three filters are timed:

* pass    -- walks every part and reads its name, changes nothing (no new body);
* rewrite -- the same walk, drops the .exe and appends a boilerplate to both
             bodies, so the body is rebuilt into <spool file>.new;
* notice  -- replaces the .exe with a notice and quarantines the message.

Each figure is the median of N runs of one ``handle`` call (parse, walk, hooks,
rebuild, reply), in milliseconds.  Usage: ``scripts/bench_rewrite.py [-n N]``.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from defang.core import config  # noqa: E402
from defang.core.verdicts import tempfail  # noqa: E402
from defang.core.wire import VERSION  # noqa: E402
from defang.workers.loader import load_filter  # noqa: E402
from defang.workers.runner import FilterRunner  # noqa: E402

FILTERS = {
    "pass": """
def filter_part(msg, part):
    part.filename
""",
    "rewrite": """
def filter_part(msg, part):
    if part.has_extension(["exe"]):
        part.drop()
def filter_end(msg):
    msg.append_boilerplate("-- scanned by defang --", "<p>scanned by defang</p>")
""",
    "notice": """
def filter_part(msg, part):
    if part.has_extension(["exe"]):
        msg.quarantine("executable")
        part.replace("The attachment was removed.", filename="removed.txt")
""",
}


def message(size: int) -> bytes:
    """A realistic multipart message of about ``size`` bytes."""
    text = ("Hello,\r\n\r\n" + "This is the body of a test message. " * 20 + "\r\n") * 3
    html = "<html><body>" + "<p>This is the HTML body of a test message.</p>" * 30 + "</body></html>"
    head = (
        "From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: benchmark\r\n"
        "Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
        '--mix\r\nContent-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        f"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
        f"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--alt--\r\n"
    ).encode()
    exe = base64.encodebytes(b"MZ" + os.urandom(2000)).replace(b"\n", b"\r\n")
    tail_exe = (b'--mix\r\nContent-Type: application/octet-stream; name="setup.exe"\r\n'
                b'Content-Disposition: attachment; filename="setup.exe"\r\n'
                b"Content-Transfer-Encoding: base64\r\n\r\n" + exe)  # fmt: skip
    room = max(0, size - len(head) - len(tail_exe) - 200)
    pdf = base64.encodebytes(os.urandom(room * 3 // 4)).replace(b"\n", b"\r\n")
    attachment = (b'--mix\r\nContent-Type: application/pdf; name="report.pdf"\r\n'
                  b'Content-Disposition: attachment; filename="report.pdf"\r\n'
                  b"Content-Transfer-Encoding: base64\r\n\r\n" + pdf)  # fmt: skip
    return head + attachment + tail_exe + b"--mix--\r\n"


def bench(runners: dict[str, FilterRunner], spool: Path, n: int) -> dict[str, float]:
    """Median milliseconds per ``handle`` for each runner, runs interleaved (so that
    drift in the machine's speed hits every filter alike), after one warm-up run."""
    request = {"v": VERSION, "op": "eom", "conn": {"id": 1, "ip": "192.0.2.1", "hostname": "h", "port": 25,
               "helo": "h", "macros": {}, "notes": {}}, "sender": "alice@example.org", "sender_args": [],
               "recipients": ["bob@example.org"], "queue_id": "BENCH", "spool": str(spool),
               "size": spool.stat().st_size}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(n + 1):
        for name, runner in runners.items():
            Path(f"{spool}.new").unlink(missing_ok=True)
            started = time.perf_counter()
            reply = runner.handle(request)
            elapsed = time.perf_counter() - started
            if "error" in reply:
                raise SystemExit(f"{name}: filter failed: {reply['error']}")
            if i:
                times[name].append(elapsed)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=30, help="runs per figure (median is printed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="defang-bench-") as tmp:
        work = Path(tmp)
        cfg = config.finish(config.Config(runtime_dir=work / "run"))
        runners = {}
        for name, code in FILTERS.items():
            path = work / f"{name}.py"
            path.write_text(code)
            runners[name] = FilterRunner(load_filter(str(path)), on_filter_error=tempfail(), config=cfg)
        print(f"median of {args.n} runs of FilterRunner.handle, milliseconds per message")
        columns = ("pass", "rewrite", "notice", "rewrite-pass")
        print(f"{'message':>10} " + " ".join(f"{c:>12}" for c in columns) + f" {'new body':>10}")
        for label, size in (("100 KB", 100 * 1024), ("5 MB", 5 * 1024 * 1024)):
            spool_dir = work / "spool" / label.replace(" ", "")
            spool_dir.mkdir(parents=True)
            spool = spool_dir / "message"
            spool.write_bytes(message(size))
            ms = bench(runners, spool, args.n)
            bench({"rewrite": runners["rewrite"]}, spool, 1)  # leaves its .new body, to measure
            new_size = Path(f"{spool}.new").stat().st_size
            print(f"{label:>10} {ms['pass']:>12.2f} {ms['rewrite']:>12.2f} {ms['notice']:>12.2f} "
                  f"{ms['rewrite'] - ms['pass']:>+12.2f} {new_size / 1024:>8.0f}KB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
