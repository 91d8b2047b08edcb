#!/usr/bin/env python3
"""What worker recycling costs: throughput through Postfix + defang with max_requests = 1
(a fresh worker for every message) against max_requests = 500.

    sudo PYTHONPATH=. .venv/bin/python scripts/bench_recycle.py [--messages 1000] \\
        [--concurrency 20] [--size 2048] [--max-requests 1 500]

Everything runs on 127.0.0.1: a private Postfix (defang.testbed.PrivatePostfix) relaying to
smtp-sink, with ``defang run`` as its milter on a Unix socket.  The filter is minimal
(filter_end adds one header), so the figures show the pool's overhead, not a filter's.
One Postfix and sink serve every run; defang is restarted for each configuration.
``max_requests_jitter`` is 0 in every run: with the default jitter of 50, "max_requests = 1"
would really mean 1 to 51 messages per worker.

For each run: messages/s over the whole batch (wall clock, the client's view), p50/p95
of each message's SMTP transaction as the client timed it (connect to QUIT), how many
replies were not 250, how many messages reached the sink, and the multiplexor's own
counters (workers retired, its p50/p95 decision latency).  Needs root (Postfix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from defang.testbed import PrivatePostfix, Sink, free_port, postfix_available, send

REPO = Path(__file__).resolve().parents[1]
FILTER = '''"""Benchmark filter: the least a filter does."""


def filter_end(msg):
    msg.add_header("X-Bench", "defang")
'''


class DefangRun:
    """``defang run`` with a generated config, started and stopped by this script."""

    def __init__(self, workdir: Path, runtime: Path, filter_path: Path, multiplexor: dict[str, int]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.runtime = runtime
        self.config = workdir / "defang.toml"
        lines = ["[daemon]", 'log_level = "warning"', "[multiplexor]"]
        lines += [f"{k} = {v}" for k, v in multiplexor.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.filter = filter_path
        self.log_path = workdir / "defang.log"
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.runtime / "milter.sock"

    def start(self, timeout: float = 30.0) -> None:
        self.runtime.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "defang", "run", "--config", str(self.config), "--filter",
                 str(self.filter), "--runtime-dir", str(self.runtime), "--socket", f"unix:{self.socket}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"defang run exited {self.proc.returncode}: {self.log_path.read_text()}")
            status = self.status()
            if self.socket.exists() and status and sum(w["state"] == "idle" for w in status["workers"]):
                return
            time.sleep(0.1)
        raise RuntimeError(f"defang not ready within {timeout}s: {self.log_path.read_text()}")

    def status(self) -> dict[str, Any] | None:
        r = subprocess.run([sys.executable, "-m", "defang.cli.ctl", "--config", str(self.config),
                            "--runtime-dir", str(self.runtime), "--json", "status"],
                           capture_output=True, text=True, cwd=REPO)  # fmt: skip
        return json.loads(r.stdout) if r.returncode == 0 else None

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the milter, the multiplexor and all workers.

        Workers that already exited are counted through their parent, the zygote, which
        reaped them (its children's times), so max_requests = 1 is measured fully.
        """
        out = {"milter": 0.0, "multiplexor": 0.0, "workers": 0.0}
        assert self.proc is not None
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                title, t = " ".join(p.cmdline()), p.cpu_times()
            except psutil.Error:
                continue
            if title.startswith("defang-milter"):
                out["milter"] += t.user + t.system
            elif title.startswith("defang-multiplexor"):
                out["multiplexor"] += t.user + t.system
            elif title.startswith("defang-zygote"):
                out["workers"] += t.user + t.system + t.children_user + t.children_system
            elif title.startswith("defang-worker"):
                out["workers"] += t.user + t.system
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Result:
    max_requests: int
    messages: int
    seconds: float
    latencies: list[float]
    not_250: int
    delivered: int
    status: dict[str, Any]
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


def message(i: int, size: int) -> bytes:
    head = (f"From: bench@example.org\r\nTo: sink@example.org\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench.{i}.{time.monotonic_ns()}@example.org>\r\n\r\n").encode()  # fmt: skip
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopq\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy(m0: tuple[float, float], m1: tuple[float, float]) -> float:
    return (m1[0] - m0[0]) / max(m1[1] - m0[1], 1.0)


def _drain(postfix: PrivatePostfix) -> None:
    """Let Postfix deliver what it queued, so the next run does not pay for it."""
    try:
        postfix.wait_queue_empty(timeout=120)
    except Exception as exc:  # a benchmark reports and goes on
        print(f"warning: {exc}"[:300], file=sys.stderr)


def blast(port: int, count: int, concurrency: int, size: int, start: int) -> tuple[float, list, int]:
    """Send ``count`` messages, ``concurrency`` connections at a time; time each one."""

    def one(i: int) -> tuple[float, int]:
        data = message(start + i, size)
        t0 = time.perf_counter()
        r = send("127.0.0.1", port, "bench@example.org", ["sink@example.org"], data)
        return time.perf_counter() - t0, r.data[0] if r.data else r.mail[0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        out = list(pool.map(one, range(count)))
    wall = time.perf_counter() - t0
    return wall, [lat for lat, _ in out], sum(1 for _, code in out if code != 250)


def run_one(workdir: Path, postfix: PrivatePostfix, sink: Sink, filter_path: Path, max_requests: int,
            args: argparse.Namespace) -> Result:  # fmt: skip
    """One configuration: start defang, warm up, time the batch, read the counters."""
    _drain(postfix)
    sink.clear()
    d = DefangRun(workdir / f"defang-{max_requests}", workdir / "run", filter_path, {
        "min_workers": args.min_workers, "max_workers": args.max_workers,
        "max_requests": max_requests, "max_requests_jitter": 0,
    })  # fmt: skip
    d.start()
    try:
        blast(postfix.smtp_port, args.warmup, args.concurrency, args.size, 0)  # smtpd, workers
        load = os.getloadavg()[0]
        before, cpu0, mach0 = d.status() or {}, d.cpu_seconds(), machine_cpu()
        wall, lats, bad = blast(postfix.smtp_port, args.messages, args.concurrency, args.size, 10**6)
        mach1, cpu1, after = machine_cpu(), d.cpu_seconds(), d.status() or {}
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
        cpu["machine_busy"] = _busy(mach0, mach1)
        cpu["load_before"] = load
        try:
            sink.wait_for(args.warmup + args.messages - bad, timeout=120)
        except TimeoutError:
            pass
        delivered = sink.count() - args.warmup
        ev0, ev1 = before.get("events", {}), after.get("events", {})
        after["retired_during_run"] = ev1.get("worker_retired", 0) - ev0.get("worker_retired", 0)
        return Result(max_requests, args.messages, wall, lats, bad, delivered, after, cpu)
    finally:
        d.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes")
    ap.add_argument("--warmup", type=int, default=100, help="messages sent first, not counted")
    ap.add_argument("--min-workers", type=int, default=2)
    ap.add_argument("--max-workers", type=int, default=10)
    ap.add_argument("--max-requests", type=int, nargs="+", default=[1, 500])
    ap.add_argument("--baseline", action="store_true",
                    help="first the same batch through Postfix without any milter")  # fmt: skip
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not postfix_available():
        print("bench_recycle: needs root and Postfix (scripts/bootstrap installs it)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="defang-bench-", dir="/tmp"))
    workdir.chmod(0o755)  # Postfix's smtpd (user postfix) must reach the milter socket
    filter_path = workdir / "filter.py"
    filter_path.write_text(FILTER)
    results: list[Result] = []
    sink = Sink(workdir / "sink", free_port())
    postfix = PrivatePostfix(workdir / "postfix", free_port(), sink.port,
                             milter=f"unix:{workdir / 'run' / 'milter.sock'}")  # fmt: skip
    print(f"# {args.messages} messages of {args.size} bytes, {args.concurrency} concurrent connections, "
          f"pool {args.min_workers}..{args.max_workers} workers; {os.cpu_count()} CPUs",
          flush=True)  # fmt: skip
    try:
        sink.start()
        postfix.start()
        if args.baseline:
            # A second instance without any milter (not a reload of the first: a reload
            # right after a batch left half-written files in Postfix's incoming queue).
            plain = PrivatePostfix(workdir / "postfix-plain", free_port(), sink.port)
            plain.start()
            try:
                blast(plain.smtp_port, args.warmup, args.concurrency, args.size, 0)
                mach0, load0 = machine_cpu(), os.getloadavg()[0]
                wall, lats, bad = blast(plain.smtp_port, args.messages, args.concurrency, args.size, 10**6)
                busy = _busy(mach0, machine_cpu())
                _drain(plain)
            finally:
                plain.stop()
            base = Result(0, args.messages, wall, lats, bad, 0, {}, {})
            print(f"no milter        {base.rate:7.1f} msg/s   client p50 {base.pct(0.50):6.1f} ms  "
                  f"p95 {base.pct(0.95):6.1f} ms   not-250 {bad}   (machine {busy:.0%} busy, "
                  f"load average {load0:.1f} before)", flush=True)  # fmt: skip
        for mr in args.max_requests:
            r = run_one(workdir, postfix, sink, filter_path, mr, args)
            results.append(r)
            lat = r.status.get("latency_ms", {})
            print(f"max_requests={mr:<4} {r.rate:7.1f} msg/s   client p50 {r.pct(0.50):6.1f} ms  "
                  f"p95 {r.pct(0.95):6.1f} ms   not-250 {r.not_250}   delivered {r.delivered}/{r.messages}   "
                  f"workers retired {r.status['retired_during_run']}   multiplexor p50 {lat.get('p50')} ms "
                  f"p95 {lat.get('p95')} ms", flush=True)  # fmt: skip
            c = r.cpu
            print(f"                 CPU during the batch: machine {c['machine_busy']:.0%} busy "
                  f"(load average {c['load_before']:.1f} before); "
                  f"milter {c['milter']:.1f} s, multiplexor {c['multiplexor']:.1f} s, "
                  f"workers {c['workers']:.1f} s ({c['workers'] / r.messages * 1000:.1f} ms/message)",
                  flush=True)  # fmt: skip
    finally:
        postfix.stop()
        sink.stop()
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"ratio (max_requests={b.max_requests} / max_requests={a.max_requests}): "
              f"throughput x{b.rate / a.rate:.2f}, client p50 x{a.pct(0.5) / b.pct(0.5):.2f} faster, "
              f"p95 x{a.pct(0.95) / b.pct(0.95):.2f} faster")  # fmt: skip
        print("client latency mean: " + ", ".join(
            f"max_requests={r.max_requests} {statistics.mean(r.latencies) * 1000:.1f} ms" for r in results))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
