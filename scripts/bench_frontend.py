"""CPU cost of defang's own processes per message, without Postfix in the way.

The fake MTA (tests/support/fakemta.py) plays Postfix's part of the milter protocol over the
Unix socket, CONCURRENCY sessions at a time, each sending whole SMTP transactions of a
~2 KB message; afterwards the CPU seconds (user + system) each defang process used are
divided by the message count.  CPU time, not wall time: it barely moves with what
else the machine is doing, so changes to the hot path can be compared run to run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support")]

from daemon import FILTERS, Defang  # noqa: E402
from fakemta import MilterSession  # noqa: E402

HEADERS = b"".join(b"X-Header-%d: some value number %d for the header\r\n" % (i, i) for i in range(12))
MSG = (b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: bench\r\n" + HEADERS
       + b"\r\n" + b"Hello Bob, this is line of text number xx in the body.\r\n" * 30)  # fmt: skip


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / 100.0


def run(filter_path: Path, messages: int, concurrency: int) -> dict[str, float]:
    with Defang(filter_path, settings={"daemon": {"log_level": "info"},
                                       "multiplexor": {"min_workers": 4, "max_workers": 4,
                                                       "max_requests": 0}}) as d:
        time.sleep(0.5)
        procs = {name: d.pids(name)[0] for name in ("defang-milter", "defang-multiplexor")}
        workers = d.pids("defang-worker")
        before = {n: cpu_seconds(p) for n, p in procs.items()}
        wbefore = sum(cpu_seconds(p) for p in workers)
        per = messages // concurrency

        def client(k: int) -> None:
            for i in range(per):
                with MilterSession(d.milter_path) as s:
                    s.connect(port=40000 + k)
                    s.helo()
                    s.mail("alice@example.org")
                    s.rcpt("bob@example.org")
                    r = s.message(MSG, queue_id=f"Q{k}x{i}")
                    assert r.reply in ("continue", "accept"), r

        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        n = per * concurrency
        out = {n_: (cpu_seconds(p) - before[n_]) * 1000 / n for n_, p in procs.items()}
        out["workers"] = (sum(cpu_seconds(p) for p in workers) - wbefore) * 1000 / n
        out["msg/s"] = n / wall
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--filter", default=str(FILTERS / "add_header_only.py"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for i in range(args.runs):
        r = run(Path(args.filter), args.messages, args.concurrency)
        print(f"run {i + 1}: CPU ms/msg: milter {r['defang-milter']:.3f}, multiplexor "
              f"{r['defang-multiplexor']:.3f}, workers {r['workers']:.3f}; {r['msg/s']:.0f} msg/s "
              f"(fake MTA, {args.concurrency} sessions)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
