"""``scripts/bench --pyspy``: where defang's processes spend their CPU in the 2k run.

py-spy (a sampling profiler that reads the target's memory from outside; nothing is
injected, the target need not be restarted -- ``pip install py-spy`` into the venv)
records the milter front end, the multiplexor and every worker alive after the warm-up,
at 200 Hz with native frames (C code such as libmilter, libc, the socket module shows; py-spy
pauses the target briefly per sample), while 2000 plain 2 KB messages go
through defang-minimal over 20 connections.  Workers get ``max_requests = 0`` here so the
profiled processes live through the whole run (otherwise they retire after ~500).

For each process: total samples, the top functions by own time and by inclusive time
(from py-spy's collapsed stacks), written to ``bench/profiles/<date>-<host>-<proc>.txt``
with the raw collapsed stacks next to it (``.collapsed``, for flamegraph tools).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import PROFILES, REPO, Bed, DefangStack, MessageFactory, machine_info, role_cpu, send_load


def pyspy_path() -> str | None:
    """py-spy from the venv next to this Python, or on $PATH."""
    cand = Path(sys.executable).with_name("py-spy")
    return str(cand) if cand.exists() else shutil.which("py-spy")


IDLE_LEAVES = frozenset({"poll", "epoll_wait", "recv", "accept", "select", "read", "__poll", "nanosleep",
                         "clock_nanosleep", "waitpid", "wait4"})  # fmt: skip
LOCK_FRAMES = ("pthread_cond_timedwait", "pthread_cond_wait", "pthread_mutex_lock", "take_gil", "sem_wait")


def classify(frames: list[str]) -> str:
    """"idle" (blocked in a waiting syscall), "lock" (waiting for a mutex or the GIL:
    native profiles show these as pthread_cond_timedwait/futex frames) or "cpu"."""
    leaf = frames[-1].split(" (", 1)[0]
    if leaf in IDLE_LEAVES:
        return "idle"
    if any(f.split(" (", 1)[0] in LOCK_FRAMES for f in frames[-3:]):
        return "lock"
    return "cpu"


Top = list[tuple[str, int]]


def summarize(collapsed: str, top: int = 25) -> tuple[dict[str, int], Top, Top]:
    """(sample counts by class, top own-time frames, top inclusive frames) of the on-CPU samples.

    Each line is ``frame;frame;...;leaf COUNT``; a frame is ``function (file:line)``.
    Own time goes to the leaf; inclusive time to every distinct function on the stack
    (line numbers dropped, so a function counts once per sample).  Samples blocked in a
    waiting syscall or on a lock are counted by class but left out of the tops: with
    --native py-spy samples them too, and they are not where CPU goes.
    """
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    classes: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_strip_line(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        kind = classify(frames)
        classes[kind] += n
        if kind != "cpu":
            continue
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return dict(classes), own.most_common(top), incl.most_common(top)


def _strip_line(frame: str) -> str:
    """``fn (path/file.py:123)`` -> ``fn (file.py)``: aggregate a function over its lines."""
    if frame.endswith(")") and " (" in frame:
        fn, _, loc = frame[:-1].rpartition(" (")
        path = loc.rsplit(":", 1)[0]
        short = "/".join(Path(path).parts[-2:]) if "site-packages" not in path else Path(path).name
        return f"{fn} ({short})"
    return frame


def render(name: str, pid: int, classes: dict[str, int], own: list[tuple[str, int]],
           incl: list[tuple[str, int]], duration: float, messages: int, extra: str = "") -> str:  # fmt: skip
    """A text summary of one process's profile."""
    total = sum(classes.values())
    cpu = classes.get("cpu", 0)
    lines = [f"py-spy profile: {name} (pid {pid}), {duration:.1f} s at 200 Hz with --native{extra}",
             f"samples: {total} (thread-samples), on CPU {cpu} "
             f"(= {cpu / 200 * 1000 / max(messages, 1):.3f} ms "
             f"per message), waiting on a lock/GIL {classes.get('lock', 0)}, "
             f"blocked in a waiting syscall {classes.get('idle', 0)}", "",
             "Top functions by own time (% of on-CPU samples):"]  # fmt: skip
    lines += [f"  {n * 100 / max(cpu, 1):5.1f}%  {n:6d}  {f}" for f, n in own]
    lines += ["", "Top functions by inclusive time (% of on-CPU samples):"]
    lines += [f"  {n * 100 / max(cpu, 1):5.1f}%  {n:6d}  {f}" for f, n in incl]
    return "\n".join(lines) + "\n"


def main_pyspy(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """Run defang-minimal under py-spy for one 2k run; write bench/profiles/*."""
    pyspy = pyspy_path()
    if pyspy is None:
        log("bench --pyspy: py-spy not found; install it: .venv/bin/pip install py-spy")
        return 2
    profile = PROFILES["2k"]
    count = max(100, int(profile.count * args.scale))
    machine = machine_info()
    stamp = f"{time.strftime('%Y-%m-%d')}-{machine['host']}"
    outdir = REPO / "bench" / "profiles"
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-pyspy-", dir="/tmp"))
    work.chmod(0o755)
    bed = Bed(work)
    stack = DefangStack("minimal", settings={"multiplexor": {"max_requests": 0}})
    stack.start()
    spies: list[tuple[str, int, Path, subprocess.Popen]] = []
    try:
        with bed.postfix(stack) as pf:
            factory = MessageFactory(profile)
            send_load(pf.smtp_port, factory, 200, profile.conns, "warm")
            targets = [("milter", p) for p in stack.pids_titled("defang-milter")]
            targets += [("multiplexor", p) for p in stack.pids_titled("defang-multiplexor")]
            targets += [(f"worker-{i}", p) for i, p in enumerate(stack.pids_titled("defang-worker"), 1)]
            for name, pid in targets:
                raw = work / f"{name}.collapsed"
                argv = [pyspy, "record", "--pid", str(pid), "--rate", "200", "--native", "--format", "raw",
                        "--output", str(raw)]  # fmt: skip
                if name == "milter":
                    argv.append("--threads")
                spies.append((name, pid, raw, subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.DEVNULL)))  # fmt: skip
            time.sleep(1.5)
            t0 = time.monotonic()
            results, wall = send_load(pf.smtp_port, factory, count, profile.conns, f"spy.{time.time_ns()}")
            duration = time.monotonic() - t0
            for _name, _pid, _raw, proc in spies:
                proc.send_signal(signal.SIGINT)
            for _name, _pid, _raw, proc in spies:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log(f"bench --pyspy: {len(results)} messages in {wall:.1f} s "
                f"({len(results) / wall:.0f} msg/s under "
                f"py-spy), {sum(r.status == 'accepted' for r in results)} accepted")  # fmt: skip
        for name, pid, raw, _proc in spies:
            if not raw.exists():
                log(f"  {name}: no profile written")
                continue
            collapsed = raw.read_text(errors="replace")
            classes, own, incl = summarize(collapsed)
            text = render(name, pid, classes, own, incl, duration, count,
                          f"; {count} messages; load at start {machine['loadavg_start'][0]:.2f}")  # fmt: skip
            (outdir / f"{stamp}-{name}.txt").write_text(text)
            (outdir / f"{stamp}-{name}.collapsed").write_text(collapsed)
            log(f"\n== {name} ==\n" + "\n".join(text.splitlines()[:16]))
    finally:
        for _n, _p, _r, proc in spies:
            if proc.poll() is None:
                proc.kill()
        stack.stop()
        bed.close()
        shutil.rmtree(work, ignore_errors=True)
    log(f"bench --pyspy: summaries in {outdir}/{stamp}-*.txt")
    text = probe_frontend(count, machine, log)
    (outdir / f"{stamp}-milter-callbacks.txt").write_text(text)
    log(text)
    return 0


def probe_frontend(count: int, machine: dict, log: Callable[[str], None]) -> str:
    """Thread-CPU of each front-end callback and step (bench/frontend_probe), same run shape."""
    profile = PROFILES["2k"]
    work = Path(tempfile.mkdtemp(prefix="bench-probe-", dir="/tmp"))
    work.chmod(0o755)
    dump = work / "probe.json"
    bed = Bed(work)
    stack = DefangStack("minimal", settings={"multiplexor": {"max_requests": 0}})
    stack.site_dirs = [str(REPO / "bench" / "frontend_probe")]
    stack.env_extra = {"DEFANG_BENCH_PROBE": str(dump)}
    stack.start()
    try:
        with bed.postfix(stack) as pf:
            factory = MessageFactory(profile)
            send_load(pf.smtp_port, factory, 200, profile.conns, "warm")
            milter = stack.pids_titled("defang-milter")[0]
            roles = {"milter": (milter, "own")}
            cpu0 = role_cpu(roles)["milter"]
            results, wall = send_load(pf.smtp_port, factory, count, profile.conns, f"probe.{time.time_ns()}")
            cpu1 = role_cpu(roles)["milter"]
    finally:
        stack.stop()  # SIGTERM: milter.main returns, atexit writes the dump
        bed.close()
    try:
        doc = json.loads(dump.read_text())
    except (OSError, ValueError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        return f"front-end probe: no dump ({exc})\n"
    shutil.rmtree(work, ignore_errors=True)
    total = 200 + count  # the probe counts the warm-up too
    per_msg = (cpu1 - cpu0) * 1e6 / count
    lines = [f"Front end (defang-milter) thread-CPU by callback and step, bench/frontend_probe; "
             f"{count} messages of 2 KB, 20 connections, defang-minimal; load at start "
             f"{machine['loadavg_start'][0]:.2f}",
             f"whole milter process: {per_msg:.0f} us CPU per message "
             f"({len(results) / wall:.0f} msg/s)", "",
             f"{'step':58} {'calls':>7} {'CPU us/call':>12} {'CPU us/msg':>11} "
             f"{'wall us/call':>13}"]  # fmt: skip
    py_total = 0.0
    for name, st in doc["steps"].items():
        calls = st["calls"] or 1
        us_msg = st["cpu_ns"] / 1000 / total
        if name.startswith("callback"):
            py_total += us_msg
        lines.append(f"{name:58} {st['calls']:7d} {st['cpu_ns'] / 1000 / calls:12.1f} {us_msg:11.1f} "
                     f"{st['wall_ns'] / 1000 / calls:13.1f}")  # fmt: skip
    lines += ["", f"Python callbacks together: {py_total:.0f} us CPU per message; "
              f"the rest of the process "
              f"({per_msg - py_total:.0f} us) is libmilter's threads, pymilter's glue and GIL "
              "handoffs."]  # fmt: skip
    return "\n".join(lines) + "\n"
