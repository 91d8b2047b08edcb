#!/usr/bin/env python3
"""scripts/soak: a big site's day through Postfix + defang, watching for slow leaks.

    scripts/soak [--messages 1000000] [--reload-every 100000] [--sample 60] [--out DIR]

What runs (all on 127.0.0.1, needs root): smtp-sink, a private Postfix relaying to it
with ``defang run`` as its milter (the default filter, filters/filter.py), and a client
sending a mix of messages: bench.py's 2 KB text (70%), 140 KB attachments (10%, every
tenth of those named setup.exe, which the default filter rejects) and the test corpus's
real-world messages in turn (20%, ../shared/corpus; some rejected, some rewritten).  The
number of concurrent connections changes every ``--batch`` messages, drawn between
``--conns-min`` and ``--conns-max`` (seeded, so every run is the same).  Workers recycle
(``max_requests`` 200) and the filter is reloaded (SIGHUP) every ``--reload-every``
messages.  A tempfailed message is sent again once the batch is done, as an MTA would.

Every ``--sample`` seconds: RSS and open descriptors of each defang process (the
supervisor, the milter, the multiplexor, the zygote and the workers: those summed, their
count and largest), and the spool directory (files and bytes).  Postfix's maillog and the
sink's files are cleared as they go, so a million messages need no disk.

At the end the script checks, and exits 1 if one fails:
  * sent = delivered + rejected (tempfails were sent again until accepted or rejected);
  * the spool directory is empty and Postfix's queue is empty;
  * the milter's and the multiplexor's RSS grew by at most ``--rss-bound`` MB and their
    descriptors by at most ``--fd-bound`` between the baseline (idle, after ``--warm``
    messages at the highest concurrency) and the end (idle); workers are recycled, so
    theirs are reported, not bounded.  The descriptor bound (80) allows for the front end's
    pool of idle connections to the multiplexor (at most 64, see defang.frontend.mxclient,
    as many as decisions were once in flight together); a leak per message would show as
    thousands.
Figures go to DIR/soak.json (every sample), DIR/soak.md (the summary) and, if
matplotlib is installed, DIR/soak.png (RSS and descriptors over time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from defang.cli import ctl  # noqa: E402
from defang.testbed import PrivatePostfix, Sink, free_port  # noqa: E402
from defang.testbed.access import reachable_by_others  # noqa: E402
from defang.testbed.procs import titled  # noqa: E402

REPO = bench.REPO
# the default filter refuses special-use domains such as bench.py's .invalid ones
bench.SENDER, bench.RCPT = "soak@client.example.com", "rcpt@relay.example.net"
CORPUS = REPO.parent / "shared" / "corpus"
ROLES = ("defang-run", "defang-milter", "defang-multiplexor", "defang-zygote", "defang-worker")


def smtp_data(raw: bytes) -> tuple[bytes, bytes]:
    """A stored message as DATA bytes: CRLF line ends, dot-stuffed, ending in CRLF."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return body, b""


class Mix:
    """Message i of the soak: 2 KB text, 140 KB attachment or a corpus message."""

    def __init__(self, corpus: Path) -> None:
        self.text = bench.MessageFactory(bench.PROFILES["2k"])
        self.attach = bench.MessageFactory(bench.PROFILES["140k"])
        files = sorted(corpus.glob("*.eml")) if corpus.is_dir() else []
        self.corpus = [smtp_data(p.read_bytes()) for p in files]

    def build(self, i: int) -> tuple[bytes, bytes]:
        slot = i % 10
        if slot < 2 and self.corpus:
            return self.corpus[(i // 10 * 2 + slot) % len(self.corpus)]
        if slot == 2:
            return self.attach.build("soak", i // 10)
        return self.text.build("soak", i)


@dataclass
class Tally:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    tempfailed_first: int = 0
    errors: list[str] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


def send_batch(port: int, mix: Mix, numbers: list[int], conns: int, tally: Tally) -> None:
    """Send ``numbers``; tempfailed ones again (up to 5 times, a second apart) at the end."""
    pending = numbers
    for attempt in range(6):
        pending = Batch(port, mix, tally, first=attempt == 0).send(pending, conns)
        if not pending:
            return
        time.sleep(1.0)
    tally.errors.append(f"{len(pending)} messages still tempfailed after 5 retries")


class Batch:
    """One pass over some message numbers by ``conns`` threads; returns what to retry."""

    def __init__(self, port: int, mix: Mix, tally: Tally, first: bool) -> None:
        self.port, self.mix, self.tally, self.first = port, mix, tally, first
        self.lock = threading.Lock()
        self.retry: list[int] = []

    def send(self, numbers: list[int], conns: int) -> list[int]:
        self.it = iter(numbers)
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(min(conns, len(numbers)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.retry

    def worker(self) -> None:
        tally = self.tally
        while True:
            with self.lock:
                i = next(self.it, None)
            if i is None:
                return
            r = bench.transaction("127.0.0.1", self.port, self.mix.build(i))
            with self.lock:
                if r.eod is not None and len(tally.latencies) < 200_000:
                    tally.latencies.append(r.eod)
                if r.status == "accepted":
                    tally.accepted += 1
                elif r.status == "rejected":
                    tally.rejected += 1
                    tally.reasons[r.detail[:70]] += 1
                else:
                    tally.tempfailed_first += self.first
                    if len(tally.errors) < 20:
                        tally.errors.append(r.detail)
                    self.retry.append(i)


def proc_sample(root: int) -> dict[str, Any]:
    """RSS (KB) and descriptors of every defang process under ``root``, by role."""
    out: dict[str, Any] = {}
    pids = bench.tree([root])
    for role in ROLES:
        mine = titled(pids, role) if role != "defang-run" else [root]
        rss, fds = [], []
        for pid in mine:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                rss.append(int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:"))))
                fds.append(len(os.listdir(f"/proc/{pid}/fd")))
            except (OSError, StopIteration):
                continue
        out[role] = {"n": len(rss), "rss_kb": sum(rss), "rss_max_kb": max(rss, default=0),
                     "fds": sum(fds), "fds_max": max(fds, default=0)}  # fmt: skip
    return out


def spool_sample(spool: Path) -> dict[str, int]:
    files = total = 0
    try:
        for e in os.scandir(spool):
            if e.is_file():
                files += 1
                total += e.stat().st_size
    except FileNotFoundError:
        pass
    return {"files": files, "bytes": total}


class Sampler(threading.Thread):
    """Every ``interval`` s: the processes and the spool; clears the sink and the maillog."""

    def __init__(self, root: int, spool: Path, sink: Sink, pf: PrivatePostfix, interval: float,
                 progress: dict[str, int]) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.root, self.spool, self.sink, self.pf = root, spool, sink, pf
        self.interval, self.progress = interval, progress
        self.samples: list[dict[str, Any]] = []
        self.delivered = 0
        self.t0 = time.monotonic()
        self.stopping = threading.Event()

    def collect(self) -> None:
        self.delivered += self.sink.clear()
        try:
            os.truncate(self.pf.maillog, 0)  # postlogd appends: safe to cut
        except OSError:
            pass

    def sample(self) -> dict[str, Any]:
        self.collect()
        s = {"t": round(time.monotonic() - self.t0, 1), "sent": self.progress["sent"],
             "delivered": self.delivered, "procs": proc_sample(self.root),
             "spool": spool_sample(self.spool)}  # fmt: skip
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            s = self.sample()
            p = s["procs"]
            print(f"soak: {s['t']:>8.0f}s sent {s['sent']:>8} delivered {s['delivered']:>8} "
                  f"milter {p['defang-milter']['rss_kb'] / 1024:.1f} MB/{p['defang-milter']['fds']} fds "
                  f"multiplexor {p['defang-multiplexor']['rss_kb'] / 1024:.1f} MB/"
                  f"{p['defang-multiplexor']['fds']} fds workers {p['defang-worker']['n']} "
                  f"spool {s['spool']['files']} files", flush=True)  # fmt: skip


def start_defang(filter_path: Path, args: argparse.Namespace) -> bench.DefangStack:
    """``defang run`` with the soak's pool settings (bench.py's stack, our filter)."""
    # as in production, the daemons drop root for the defang user, if it can reach this
    # checkout and its interpreter (not under /root, say)
    reachable = all(reachable_by_others(p) for p in (REPO, Path(sys.executable).resolve()))
    user = "defang" if reachable else "root"
    stack = bench.DefangStack("minimal", settings={
        "daemon": {"user": user},
        "multiplexor": {"min_workers": 2, "max_workers": args.max_workers, "max_requests": 200,
                        "queue_size": 400, "queue_timeout": 60}})  # fmt: skip
    stack.filter = filter_path
    stack.start()
    return stack


def summarize(first: dict[str, Any], last: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth from the idle baseline to the idle end, and the peaks in between."""
    out: dict[str, Any] = {}
    for role in ROLES:
        a, b = first["procs"][role], last["procs"][role]
        peak_rss = max(s["procs"][role]["rss_max_kb"] for s in samples)
        peak_fds = max(s["procs"][role]["fds_max"] for s in samples)
        out[role] = {"rss_first_mb": a["rss_kb"] / 1024, "rss_last_mb": b["rss_kb"] / 1024,
                     "rss_growth_mb": (b["rss_kb"] - a["rss_kb"]) / 1024, "rss_peak_one_mb": peak_rss / 1024,
                     "fds_first": a["fds"], "fds_last": b["fds"], "fds_peak_one": peak_fds}  # fmt: skip
    return out


def plot(samples: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [s["sent"] / 1000 for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for role in ("defang-milter", "defang-multiplexor", "defang-zygote"):
        ax1.plot(x, [s["procs"][role]["rss_kb"] / 1024 for s in samples], label=role)
    ax1.plot(x, [s["procs"]["defang-worker"]["rss_max_kb"] / 1024 for s in samples], label="largest worker")
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(fontsize=8)
    for role in ("defang-milter", "defang-multiplexor"):
        ax2.plot(x, [s["procs"][role]["fds"] for s in samples], label=role)
    ax2.plot(x, [s["spool"]["files"] for s in samples], label="spool files")
    ax2.set_ylabel("open descriptors / files")
    ax2.set_xlabel("messages sent (thousands)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"defang soak: {samples[-1]['sent']:,} messages through Postfix")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000, help="messages per connection-count step")
    ap.add_argument("--conns-min", type=int, default=20)
    ap.add_argument("--conns-max", type=int, default=100)
    ap.add_argument("--reload-every", type=int, default=100_000)
    ap.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--warm", type=int, default=2000,
                    help="messages sent at --conns-max before the baseline is taken (idle)")
    ap.add_argument("--max-workers", type=int, default=10)
    ap.add_argument("--rss-bound", type=float, default=16.0, help="MB of growth allowed")
    ap.add_argument("--fd-bound", type=int, default=80,
                    help="descriptors of growth allowed: the milter keeps up to 64 idle connections to "
                         "the multiplexor (as many as decisions were once in flight at the same time)")
    ap.add_argument("--filter", default=str(REPO / "filters" / "filter.py"))
    ap.add_argument("--out", default="", help="directory for soak.json, soak.md, soak.png")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/soak: needs root (Postfix's master and smtp-sink)", file=sys.stderr)
        return 2
    work = bench.traversable_dir("defang-soak-")
    mix = Mix(CORPUS)
    progress = {"sent": 0}
    sink = Sink(work / "sink", free_port(), backlog=2000)
    sink.start()
    stack = pf = sampler = None
    try:
        stack = start_defang(Path(args.filter), args)
        spool = stack.dir / "run" / "spool"
        pf = PrivatePostfix(work / "postfix", free_port(), sink.port, milter=stack.milter_spec,
                            extra={"default_process_limit": str(args.conns_max + 50),
                                   "smtpd_client_connection_count_limit": "0"})  # fmt: skip
        pf.start()
        sampler = Sampler(stack.proc.pid, spool, sink, pf, args.sample, progress)
        # The baseline: idle, after a warm-up at the highest concurrency (so every pool and
        # cache that grows with load has grown once), as the end is measured: idle.
        warm = Tally()
        send_batch(pf.smtp_port, mix, list(range(-args.warm, 0)), args.conns_max, warm)
        drain(sampler, sink, pf, warm.accepted)
        baseline = sampler.sample()
        sampler.delivered = 0
        sampler.start()
        tally, rnd, reloads = Tally(), random.Random(7), 0
        t0 = time.monotonic()
        for start in range(0, args.messages, args.batch):
            numbers = list(range(start, min(start + args.batch, args.messages)))
            send_batch(pf.smtp_port, mix, numbers, rnd.randint(args.conns_min, args.conns_max), tally)
            tally.sent = progress["sent"] = numbers[-1] + 1
            if tally.sent % args.reload_every < args.batch and tally.sent < args.messages:
                os.kill(stack.proc.pid, signal.SIGHUP)
                reloads += 1
        wall = time.monotonic() - t0
        sampler.stopping.set()
        sampler.join()
        drain(sampler, sink, pf, tally.accepted)
        final = sampler.sample()
        figures = summarize(baseline, final, sampler.samples)
        log_text = stack.log_path.read_text(errors="replace")
        status = ctl.request(str(stack.dir / "run" / "control.sock"), "status")
        checks = {
            "sent = delivered + rejected": tally.sent == sampler.delivered + tally.rejected,
            "spool empty": final["spool"]["files"] == 0,
            "postfix queue empty": True,
            f"milter RSS growth <= {args.rss_bound} MB":
                figures["defang-milter"]["rss_growth_mb"] <= args.rss_bound,
            f"multiplexor RSS growth <= {args.rss_bound} MB":
                figures["defang-multiplexor"]["rss_growth_mb"] <= args.rss_bound,
            f"milter fds growth <= {args.fd_bound}":
                figures["defang-milter"]["fds_last"] - figures["defang-milter"]["fds_first"] <= args.fd_bound,
            f"multiplexor fds growth <= {args.fd_bound}":
                figures["defang-multiplexor"]["fds_last"] - figures["defang-multiplexor"]["fds_first"]
                <= args.fd_bound,
        }  # fmt: skip
        lat = sorted(tally.latencies)
        summary = {
            "messages": tally.sent, "delivered": sampler.delivered, "rejected": tally.rejected,
            "tempfailed_then_retried": tally.tempfailed_first,
            "reject_reasons": dict(tally.reasons.most_common(10)), "errors": tally.errors,
            "reloads": reloads, "wall_s": round(wall, 1), "msg_per_s": round(tally.sent / wall, 1),
            "eod_p50_ms": round(bench.percentile(lat, 50) * 1000, 1),
            "eod_p99_ms": round(bench.percentile(lat, 99) * 1000, 1),
            "multiplexor_events": status.events, "multiplexor_verdicts": status.verdicts,
            "log_errors": [ln for ln in log_text.splitlines() if " ERROR " in ln][:20],
            "processes": figures, "checks": checks,
        }  # fmt: skip
        report(summary, sampler.samples, args.out)
        return 0 if all(checks.values()) else 1
    finally:
        if sampler is not None:
            sampler.stopping.set()
        if pf is not None:
            pf.stop()
        if stack is not None:
            stack.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)


def drain(sampler: Sampler, sink: Sink, pf: PrivatePostfix, accepted: int) -> None:
    """Wait for the accepted messages at the sink and an empty queue, then settle."""
    deadline = time.monotonic() + 300
    while sampler.delivered < accepted and time.monotonic() < deadline:
        sampler.collect()
        time.sleep(0.5)
    pf.wait_queue_empty(timeout=120)
    # Postfix keeps idle smtpd processes, each with its milter connection (and that
    # connection's to the multiplexor) open: a reload ends them, so that baseline and
    # end both count defang's own descriptors, not how many smtpd happen to be alive.
    pf.reload()
    time.sleep(3)


def report(summary: dict[str, Any], samples: list[dict[str, Any]], out: str) -> None:
    lines = [f"# defang soak: {summary['messages']:,} messages",
             "",
             f"{summary['msg_per_s']} msg/s over {summary['wall_s']} s; delivered {summary['delivered']:,}, "
             f"rejected {summary['rejected']:,}, tempfailed then sent again "
             f"{summary['tempfailed_then_retried']:,}; "
             f"{summary['reloads']} reloads; end-of-DATA p50 {summary['eod_p50_ms']} ms, "
             f"p99 {summary['eod_p99_ms']} ms.",
             "",
             "| process | RSS at start (MB) | at end | growth | largest one | fds at start | at end |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for role, f in summary["processes"].items():
        lines.append(f"| {role} | {f['rss_first_mb']:.1f} | {f['rss_last_mb']:.1f} | "
                     f"{f['rss_growth_mb']:+.1f} | "
                     f"{f['rss_peak_one_mb']:.1f} | {f['fds_first']} | {f['fds_last']} |")  # fmt: skip
    lines += ["", "Checks:", ""]
    lines += [f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in summary["checks"].items()]
    if summary["errors"]:
        lines += ["", "Client errors (first 20):", ""] + [f"- {e}" for e in summary["errors"]]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "soak.json").write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
        (d / "soak.md").write_text(text)
        if plot(samples, d / "soak.png"):
            print(f"plot: {d / 'soak.png'}")


if __name__ == "__main__":
    sys.exit(main())
