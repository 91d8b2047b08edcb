#!/usr/bin/env python3
"""scripts/dashboard: etc/grafana-dashboard.json's panels, from a real run, as a PNG.

    scripts/dashboard [--duration 180] [--out bench/results/2026-12-07-dashboard.png]

What runs (all on 127.0.0.1, needs root): smtp-sink, a private Postfix relaying to it
with ``defang run`` as its milter (bench/filters/defang_dashboard.py: no scanner, the
Subject picks the verdict and the tags) and ``[metrics] listen`` on, and Debian's
``prometheus`` scraping that page every second (its own config and TSDB in a temporary
directory).  A client sends mail for ``--duration`` seconds in four phases: normal mail
(mostly accepted, some spam and phishing rejected, newsletters tagged, a few discarded),
a spam wave, an upstream outage (30% tempfailed, the filter slow, more
connections than workers: the queue fills), then normal mail again with a reload
(SIGHUP) in the middle; workers recycle every 150 messages.

Then every panel of etc/grafana-dashboard.json is drawn: each target's PromQL
expression is asked of Prometheus's HTTP API (``/api/v1/query_range``, with
``$__rate_interval`` as ``--rate-interval``), the series named by the target's
``legendFormat``, laid out on the dashboard's 24-column grid (``gridPos``), with
matplotlib.  This is not Grafana's own rendering: Grafana is neither in Debian 12 nor on
PyPI, so the panels are drawn by this script, from the same queries.

Every process the script starts is stopped by its PID at the end, on an error, on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "etc" / "grafana-dashboard.json"
DEFAULT_OUT = REPO / "bench" / "results" / "2026-12-07-dashboard.png"

# query_range's answer: one series is its labels and its [(unix time, value)]
Series = tuple[dict[str, str], list[tuple[float, float]]]
Query = Callable[[str, float, float, float], list[Series]]


# ---- the panels: queries and legends (no matplotlib, no Prometheus: unit-tested) ----


@dataclass
class Line:
    label: str
    points: list[tuple[float, float]]


@dataclass
class Panel:
    title: str
    unit: str
    grid: dict[str, int]
    exprs: list[str] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)


def expand(expr: str, rate_interval: str) -> str:
    """Grafana's variables in an expression, as this run has them."""
    return expr.replace("$__rate_interval", rate_interval)


def legend(fmt: str, labels: dict[str, str]) -> str:
    """A series' name from a target's legendFormat ({{label}}), as Grafana names it."""
    if not fmt:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{labels.get('__name__', '')}{{{inner}}}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def collect(dashboard: dict[str, Any], query: Query, start: float, end: float, step: float,
            rate_interval: str) -> list[Panel]:  # fmt: skip
    """Every panel of ``dashboard`` with each target's series from ``query``."""
    panels = []
    for p in dashboard["panels"]:
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        panel = Panel(p["title"], unit, p["gridPos"])
        for target in p.get("targets", []):
            expr = expand(target["expr"], rate_interval)
            panel.exprs.append(expr)
            for labels, points in query(expr, start, end, step):
                panel.lines.append(Line(legend(target.get("legendFormat", ""), labels), points))
        panels.append(panel)
    return panels


def matrix(answer: dict[str, Any]) -> list[Series]:
    """Prometheus's query_range JSON answer as series (NaN stays NaN: a gap)."""
    if answer.get("status") != "success":
        raise RuntimeError(f"prometheus: {answer.get('errorType', '?')}: {answer.get('error', '?')}")
    return [(s["metric"], [(float(t), float(v)) for t, v in s["values"]]) for s in answer["data"]["result"]]


# ---- drawing ----

BG, PANEL_BG, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0",
           "#37872d", "#fade2a", "#ca95e5", "#96d98d"]  # fmt: skip
UNITS = {"reqps": ("per second", 1.0), "s": ("milliseconds", 1000.0), "short": ("", 1.0)}


def draw(panels: list[Panel], title: str, subtitle: str, out: Path) -> None:
    """The panels on the dashboard's grid (24 columns; a row unit is about 30 px)."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import UTC, datetime

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    rows = max(p.grid["y"] + p.grid["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.42 + 1.0), facecolor=BG)
    top = 1 - 1.0 / (rows * 0.42 + 1.0)
    fig.suptitle(title, color=TEXT, fontsize=15, x=0.01, ha="left", y=0.995, va="top")
    fig.text(0.01, 1 - 0.42 / (rows * 0.42 + 1.0), "\n".join(textwrap.wrap(subtitle, 190)), color="#8e8e8e",
             fontsize=9, va="top")  # fmt: skip
    for panel in panels:
        g = panel.grid
        # the panel's box in figure coordinates, then room for its title, axis and legend
        left, width = g["x"] / 24, g["w"] / 24
        height = g["h"] / rows * top
        bottom = top - (g["y"] + g["h"]) / rows * top
        fig.patches.append(plt.Rectangle((left + 0.003, bottom + 0.003), width - 0.006, height - 0.006,
                                         transform=fig.transFigure, facecolor=PANEL_BG,
                                         edgecolor=GRID, zorder=-1))  # fmt: skip
        ax = fig.add_axes((left + 0.045, bottom + height * 0.30, width - 0.06, height * 0.58))
        ax.set_facecolor(PANEL_BG)
        fig.text(left + 0.008, bottom + height - 0.012, panel.title, color=TEXT, fontsize=11,
                 fontweight="bold", va="top")  # fmt: skip
        label, scale = UNITS.get(panel.unit, (panel.unit, 1.0))
        drawn = 0
        for i, line in enumerate(panel.lines):
            pts = [(datetime.fromtimestamp(t, UTC), v * scale) for t, v in line.points]
            if not pts or all(math.isnan(v) for _, v in pts):
                continue
            ax.plot([t for t, _ in pts], [v for _, v in pts], color=PALETTE[i % len(PALETTE)],
                    linewidth=1.4, label=line.label or "(no name)")  # fmt: skip
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center",
                    color="#8e8e8e", fontsize=14)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_ylim(bottom=0)
            ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, tz=UTC))
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
            # as many columns as the panel's width holds (at 80 dpi, about 6 px a character)
            longest = max(len(line.get_label()) for line in ax.get_lines())
            ncol = max(1, min(drawn, int((width * 16 * 80 - 60) / (6 * longest + 40))))
            ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=ncol, fontsize=8.5,
                      frameon=False, labelcolor=TEXT, handlelength=1.2, columnspacing=1.2)  # fmt: skip
        ax.set_ylabel(label, color=TEXT, fontsize=8.5)
        ax.tick_params(colors=TEXT, labelsize=8.5)
        ax.grid(color=GRID, linewidth=0.6)
        for s in ax.spines.values():
            s.set_visible(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BG)
    plt.close(fig)


# ---- the run: processes, mail ----


def free_port() -> int:
    from defang.testbed import free_port as fp

    return fp()


class Prometheus:
    """Debian's prometheus on 127.0.0.1, its config and TSDB in ``workdir``, scraping ``target``."""

    def __init__(self, workdir: Path, target: str, scrape: float) -> None:
        self.dir, self.target, self.scrape = workdir, target, scrape
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(
                "prometheus is not installed (apt-get install --no-install-recommends prometheus)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {self.scrape:g}s\n  evaluation_interval: {self.scrape:g}s\n"
            f"scrape_configs:\n  - job_name: defang\n"
            f"    static_configs:\n      - targets: ['{self.target}']\n"
        )
        self.log = open(self.dir / "prometheus.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: see {self.dir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus: not ready within {timeout:.0f}s")

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                    "step": f"{step:g}"})  # fmt: skip
        with urllib.request.urlopen(f"{self.url}/api/v1/query_range?{q}", timeout=30) as r:
            return matrix(json.load(r))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


# Each phase: its share of the run, concurrent connections, the filter's work time (ms,
# drawn up to), and the Subject mix (weights).
PHASES = [
    ("normal", 0.25, 4, 20, {"hello": 80, "newsletter": 8, "spam": 7, "phish": 2, "drop": 3}),
    ("spam wave", 0.20, 6, 20, {"hello": 40, "newsletter": 5, "spam": 45, "phish": 8, "drop": 2}),
    ("upstream outage", 0.20, 12, 300, {"hello": 55, "newsletter": 5, "spam": 10, "later": 30}),
    ("normal again", 0.35, 4, 20, {"hello": 78, "newsletter": 8, "invoice": 5, "spam": 7, "drop": 2}),
]


def message(subject: str, work_ms: int, i: int) -> bytes:
    return (f"From: <dash@client.example.com>\r\nTo: <rcpt@relay.example.net>\r\nSubject: {subject} {i}\r\n"
            f"Message-ID: <{i}.{subject}@dashboard.example.com>\r\nX-Work-Ms: {work_ms}\r\n\r\n"
            + "Some text for the dashboard.\r\n" * 40).encode()  # fmt: skip


def drive(port: int, duration: float, on_phase: Callable[[str], None]) -> Counter:
    """Send the phases' mix for ``duration`` seconds; the replies' classes counted."""
    from defang.testbed import send

    tally: Counter = Counter()
    lock = threading.Lock()
    rnd = random.Random(28)
    n = [0]
    for name, share, conns, work, mix in PHASES:
        on_phase(name)
        until = time.monotonic() + duration * share
        subjects, weights = list(mix), list(mix.values())

        def one(until: float = until, subjects: list[str] = subjects, weights: list[int] = weights,
                work: int = work) -> None:  # fmt: skip
            while time.monotonic() < until:
                with lock:
                    n[0] += 1
                    i, subject = n[0], rnd.choices(subjects, weights)[0]
                    ms = rnd.randint(0, work)
                try:
                    r = send("127.0.0.1", port, "dash@client.example.com", ["rcpt@relay.example.net"],
                             message(subject, ms, i), helo="client.example.com", timeout=30)  # fmt: skip
                    code = r.data[0] if r.data else r.mail[0]
                    what = "accepted" if code < 300 else "tempfailed" if code < 500 else "rejected"
                except OSError:
                    what = "connection error"
                with lock:
                    tally[what] += 1

        threads = [threading.Thread(target=one, daemon=True) for _ in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 60)
    return tally


def start_defang(metrics_port: int) -> Any:
    sys.path.insert(0, str(REPO / "scripts"))
    import bench
    from defang.testbed.access import reachable_by_others

    reachable = all(reachable_by_others(p) for p in (REPO, Path(sys.executable).resolve()))
    stack = bench.DefangStack("dashboard", settings={
        "daemon": {"user": "defang" if reachable else "root"},
        "multiplexor": {"min_workers": 2, "max_workers": 6, "max_requests": 150, "queue_size": 40,
                        "queue_timeout": 60},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"}})  # fmt: skip
    stack.start()
    return stack


def run(args: argparse.Namespace) -> int:
    from defang.testbed import PrivatePostfix, Sink

    work = Path(tempfile.mkdtemp(prefix="defang-dashboard-"))
    work.chmod(0o755)
    sink = Sink(work / "sink", free_port())
    stack = pf = prom = None
    try:
        sink.start()
        metrics_port = free_port()
        stack = start_defang(metrics_port)
        pf = PrivatePostfix(work / "postfix", free_port(), sink.port, milter=stack.milter_spec,
                            extra={"default_process_limit": "100",
                                   "smtpd_client_connection_count_limit": "0"})  # fmt: skip
        pf.start()
        prom = Prometheus(work / "prometheus", f"127.0.0.1:{metrics_port}", args.scrape)
        prom.start()
        t_start = time.time()
        t0 = time.monotonic()
        reload_at = t0 + args.duration * (1 - PHASES[-1][1] / 2)

        def on_phase(name: str) -> None:
            print(f"dashboard: {time.monotonic() - t0:5.0f}s {name}", flush=True)

        reloader = threading.Thread(target=_reload_at, args=(stack.proc.pid, reload_at, t0), daemon=True)
        reloader.start()
        tally = drive(pf.smtp_port, args.duration, on_phase)
        time.sleep(3 * args.scrape + 1)  # the last scrapes
        t_end = time.time()
        sink.clear()
        counts = ", ".join(f"{v} {k}" for k, v in sorted(tally.items()))
        print(f"dashboard: sent {sum(tally.values())}: {counts}")
        dashboard = json.loads(DASHBOARD.read_text())
        step = max(1.0, (t_end - t_start) / 400)
        panels = collect(dashboard, prom.query_range, t_start, t_end, step, args.rate_interval)
        sub = (f"etc/grafana-dashboard.json's panels drawn by scripts/dashboard from Debian's Prometheus "
               f"(scrape {args.scrape:g}s, $__rate_interval={args.rate_interval}) over a "
               f"{args.duration:.0f}s run through Postfix: {sum(tally.values())} messages, {counts}; phases: "
               + ", ".join(p[0] for p in PHASES))  # fmt: skip
        draw(panels, f"{dashboard.get('title', '')} (UTC)", sub, Path(args.out))
        print(f"dashboard: wrote {args.out}")
        return 0
    finally:
        for part in (prom, pf, stack):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - stop the others anyway
                    print(f"dashboard: stopping {type(part).__name__}: {exc}", file=sys.stderr)
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)


def _reload_at(pid: int, when: float, t0: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))
    try:
        os.kill(pid, signal.SIGHUP)
        print(f"dashboard: {time.monotonic() - t0:5.0f}s reload (SIGHUP)", flush=True)
    except ProcessLookupError:
        pass


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of mail (10 to 3600)")
    ap.add_argument("--scrape", type=float, default=1.0, help="Prometheus's scrape interval, seconds")
    ap.add_argument("--rate-interval", default="15s", help="what $__rate_interval stands for")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    if not 10 <= args.duration <= 3600:
        print("scripts/dashboard: --duration: between 10 and 3600 seconds", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("scripts/dashboard: needs root (Postfix's master and smtp-sink)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("scripts/dashboard: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"scripts/dashboard: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
