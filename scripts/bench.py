"""scripts/bench: defang against Postfix alone, MIMEDefang and a do-nothing pymilter milter.

Why this exists: defang must be measured the way it will be compared -- side by side, on
one machine, in one run, through a real Postfix -- or every number is an anecdote.  So
each *stack* (a milter or none) sits behind its own private Postfix on loopback relaying
to one smtp-sink, and the same client sends the same messages through each:

=================  =========================================================================
stack              what
=================  =========================================================================
postfix            Postfix alone, no milter: the ceiling
nullmilter         bench/nullmilter.py, pymilter accepting with one header: the ceiling of
                   any pymilter front end
defang-minimal     defang, bench/filters/defang_minimal.py (filter_end returns None)
defang-headers     defang, bench/filters/defang_headers.py (count parts, X-Scanned, 5xx .exe)
defang-minimal-inet  as defang-minimal on ``inet:PORT@127.0.0.1`` instead of a Unix socket
defang-minimal-inet-nodelay  the same with TCP_NODELAY set on the listening socket
                   (bench/nodelay_site: the Python-only fix proposed for milterd.py)
mimedefang-minimal / mimedefang-headers
                   Debian's MIMEDefang 3.3 (its multiplexor with embedded Perl, -q queue)
                   with bench/filters/mimedefang_*.pl; only when installed
=================  =========================================================================

Profiles: ``2k`` (plain text, 2000 messages, 20 connections), ``140k`` (base64
attachment, 500 messages, 20 connections), ``7m`` (base64 attachment, 50 messages, 10
connections).  In the attachment profiles every tenth message carries ``setup.exe``, so
the header filters reject 10% and the minimal ones accept everything.

Per run: messages/s (client side, first connect to last reply), end-of-DATA latency
(from sending the final "." to the reply, p50/p95/p99), accepted/rejected/tempfailed,
CPU seconds per message of the stack's process tree and of Postfix's (utime+stime of
every process in the tree plus cutime+cstime, i.e. children that exited and were reaped
inside the tree -- recycled workers and Postfix daemons count), and the peak of RSS and
PSS summed over the stack's processes (smaps_rollup sampled every 0.2 s).  Each cell runs
``--runs`` times, each run after a warm-up; the table shows the median and the min-max
spread.  The stacks take turns: round 1 runs every profile through each stack in order,
round 2 in the reverse order, and so on (see `turns`), so that the machine's drift lands
on every stack alike; only one stack is up at a time.

Other modes: ``--inet`` (the TCP milter socket investigation: one-connection latency,
strace and tcpdump evidence, LD_PRELOAD shim on each side, the Python fix) and
``--pyspy`` (py-spy profiles of defang's milter, multiplexor and workers during a 2k run).

Run as root (Postfix's master): ``scripts/bench``, ``scripts/bench --profile 2k --runs 1
--only defang,postfix`` for a one-minute check.  Results: stdout, and with ``--out`` a
Markdown and a JSON file (``scripts/bench_table.py`` renders bench/README.md's table from it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import grp
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from defang.testbed import PrivatePostfix, Sink, free_port  # noqa: E402
from defang.testbed.postfix import POSTFIX_USER, find_program  # noqa: E402
from defang.testbed.procs import stat_fields, titled  # noqa: E402

BENCH = REPO / "bench"
FILTERS = BENCH / "filters"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SENDER = "bench@client.invalid"
RCPT = "rcpt@bench.invalid"


# ====================================================================== message profiles
@dataclass(frozen=True)
class Profile:
    """A kind of message and how many to send over how many connections."""

    name: str
    count: int
    conns: int
    attachment: int  # bytes of binary attachment (0: plain text)
    text: int  # bytes of text body
    warmup: int


PROFILES: dict[str, Profile] = {
    "2k": Profile("2k", 2000, 20, 0, 1700, 300),
    "140k": Profile("140k", 500, 20, 100 * 1024, 1500, 100),
    "7m": Profile("7m", 50, 10, 5 * 1024 * 1024, 1500, 10),
}


class MessageFactory:
    """Builds the messages of one profile: CRLF, no line starting with "." (so no
    dot-stuffing is needed), unique Message-ID, every tenth attachment named setup.exe.

    The body is built once per profile (random, seeded: incompressible and the same in
    every run); only the header section differs per message.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        rnd = random.Random(42)
        words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
                 "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "magna"]  # fmt: skip
        lines, size = [], 0
        while size < profile.text:
            line = " ".join(rnd.choice(words) for _ in range(11)).capitalize() + "."
            lines.append(line)
            size += len(line) + 2
        self.text = ("\r\n".join(lines) + "\r\n").encode()
        self.b64 = b""
        if profile.attachment:
            blob = rnd.randbytes(profile.attachment)
            enc = base64.b64encode(blob)
            self.b64 = b"\r\n".join(enc[i : i + 76] for i in range(0, len(enc), 76)) + b"\r\n"

    def is_exe(self, i: int) -> bool:
        return bool(self.profile.attachment) and i % 10 == 9

    def build(self, tag: str, i: int) -> tuple[bytes, bytes]:
        """(header section + start of body, rest of body); sent back to back."""
        head = (
            f"From: Bench Sender <{SENDER}>\r\n"
            f"To: <{RCPT}>\r\n"
            f"Subject: bench {self.profile.name} message {i}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <{tag}.{i}@bench.invalid>\r\n"
            "MIME-Version: 1.0\r\n"
        )
        if not self.profile.attachment:
            head += "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            return head.encode(), self.text
        name = "setup.exe" if self.is_exe(i) else "report.pdf"
        boundary = f"=_bench_{i}_boundary"
        head += (
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            "This is a multi-part message in MIME format.\r\n"
            f"--{boundary}\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        tail = (
            f"\r\n--{boundary}\r\n"
            f'Content-Type: application/octet-stream; name="{name}"\r\n'
            "Content-Transfer-Encoding: base64\r\n"
            f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'
        ).encode()
        end = f"--{boundary}--\r\n".encode()
        return head.encode() + self.text + tail, self.b64 + end

    def size(self) -> int:
        a, b = self.build("x", 0)
        return len(a) + len(b)


# ====================================================================== SMTP load generator
@dataclass
class TxResult:
    """One transaction: its outcome class and end-of-DATA latency (seconds)."""

    status: str  # accepted, rejected, tempfailed, error
    eod: float | None
    detail: str = ""


class _Smtp:
    """Blocking SMTP connection; TCP_NODELAY (see defang.testbed.smtpclient on why)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")

    def reply(self) -> tuple[int, str]:
        text = []
        while True:
            line = self.rfile.readline(8192)
            if not line:
                raise ConnectionError("connection closed while awaiting a reply")
            text.append(line[4:].decode("latin-1").rstrip())
            if line[3:4] != b"-":
                return int(line[:3]), " ".join(text)

    def command(self, line: bytes) -> tuple[int, str]:
        self.sock.sendall(line)
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()


def transaction(host: str, port: int, data: tuple[bytes, bytes], timeout: float = 120) -> TxResult:
    """One message on a fresh connection; the final "." is sent on its own and timed."""
    try:
        c = _Smtp(host, port, timeout)
    except OSError as exc:
        return TxResult("error", None, f"connect: {exc}")
    try:
        code, text = c.reply()
        for cmd in (b"EHLO client.invalid\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode(),
                    f"RCPT TO:<{RCPT}>\r\n".encode(), b"DATA\r\n"):  # fmt: skip
            if code >= 400:
                break
            code, text = c.command(cmd)
        if code != 354:
            return TxResult(_klass(code), None, f"{code} {text}")
        c.sock.sendall(data[0])
        c.sock.sendall(data[1])
        t0 = time.perf_counter()
        c.sock.sendall(b".\r\n")
        code, text = c.reply()
        eod = time.perf_counter() - t0
        with contextlib.suppress(OSError, ConnectionError):
            c.command(b"QUIT\r\n")
        return TxResult(_klass(code), eod, "" if code < 300 else f"{code} {text}")
    except (OSError, ConnectionError, ValueError) as exc:
        return TxResult("error", None, str(exc))
    finally:
        c.close()


def _klass(code: int) -> str:
    return "accepted" if code < 300 else "tempfailed" if code < 500 else "rejected"


def send_load(port: int, factory: MessageFactory, count: int, conns: int, tag: str
              ) -> tuple[list[TxResult], float]:  # fmt: skip
    """``count`` messages over ``conns`` concurrent connections; (results, wall seconds).

    Threads, one transaction per connection at a time each; a shared counter hands out
    message numbers.  Socket I/O releases the GIL, so 20 threads keep 20 sessions busy.
    """
    results: list[TxResult | None] = [None] * count
    counter = itertools.count()

    def worker() -> None:
        while (i := next(counter)) < count:
            results[i] = transaction("127.0.0.1", port, factory.build(tag, i))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(conns, count))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None], time.perf_counter() - t0


# ====================================================================== process accounting
def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in ticks) for every process."""
    # fields[1] is the ppid, fields[11:15] utime..cstime
    return {pid: (int(f[1]), sum(int(x) for x in f[11:15])) for pid, f in stat_fields()}


def tree(roots: Sequence[int], stats: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """``roots`` and all their live descendants."""
    stats = stats if stats is not None else _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(roots: Sequence[int]) -> float:
    """CPU seconds of a process tree, exited-and-reaped children included.

    A live process's own time is not yet in any parent's cutime, and a reaped child's
    total (its own reaped children included) is in its parent's: summing
    utime+stime+cutime+cstime over the live tree counts every process once.
    """
    stats = _proc_stats()
    return sum(stats[p][1] for p in tree(roots, stats)) / CLK_TCK


def role_cpu(roles: dict[str, tuple[int, str]]) -> dict[str, float]:
    """CPU seconds per role: ``(pid, "own")`` is the process's own utime+stime, ``"tree"``
    its whole tree as in `tree_cpu`, ``"children"`` the tree without the root's own time
    (a multiplexor's workers, live and reaped)."""
    stats = _proc_stats()
    own = _own_cpu()
    out: dict[str, float] = {}
    for name, (pid, mode) in roles.items():
        if pid not in stats:
            continue
        total = sum(stats[p][1] for p in tree([pid], stats)) / CLK_TCK
        mine = own.get(pid, 0.0)
        out[name] = mine if mode == "own" else total if mode == "tree" else total - mine
    return out


def _own_cpu() -> dict[int, float]:
    """pid -> utime+stime seconds (without reaped children)."""
    return {pid: (int(f[11]) + int(f[12])) / CLK_TCK for pid, f in stat_fields()}


def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes from /proc/PID/smaps_rollup; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, pss


class MemSampler:
    """Samples summed RSS/PSS of a process tree in a thread; keeps the peaks."""

    def __init__(self, roots: Callable[[], Sequence[int]], interval: float = 0.2) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        roots = self.roots()
        if not roots:
            return
        pids = tree(roots)
        rss = pss = 0
        for pid in pids:
            r, p = _rollup(pid)
            rss += r
            pss += p
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ====================================================================== stacks under test
STACK_TMPFS_MIN = 2 * 2**30  # free bytes /dev/shm needs to hold the filters' spools


@functools.cache
def stack_parent() -> str:
    """Where each filter's own directory (spool, sockets) goes: /dev/shm, a tmpfs.

    Both filters are run as their admins would: defang's default spool is under
    /run/defang, a tmpfs; MIMEDefang's changelog advises keeping its spool "on a RAM
    disk for better performance".  On a disk, the cost of the files each creates and
    removes per message follows the file system's state (measured on this VM's ext4:
    MIMEDefang's CPU per 2 KB message 3.9 to 9.7 ms from one run to the next) instead of
    the filter.  /tmp when /dev/shm is missing or too small (a container's default 64 MB
    would not hold ten 7 MB messages).  Postfix's queues stay on disk, as in production.
    """
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return "/tmp"
    return "/dev/shm" if st.f_bavail * st.f_frsize >= STACK_TMPFS_MIN else "/tmp"


def traversable_dir(prefix: str) -> Path:
    """A fresh directory for a filter that Postfix's unprivileged daemons can enter."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=stack_parent()))
    d.chmod(0o755)
    return d


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:.0f}s")
        time.sleep(0.05)


def _stop_proc(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process we started (by its PID), then KILL its leftover descendants."""
    if proc is None or proc.poll() is not None:
        return
    kids = tree([proc.pid])
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in kids:
        if pid != proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Stack:
    """A milter (or none) in front of which Postfix runs; subclasses start real daemons."""

    name = "postfix"
    group = "postfix"
    kind = "none"  # minimal / headers / none / null: what ratios pair up

    def __init__(self) -> None:
        self.milter_spec: str | None = None
        self.env_extra: dict[str, str] = {}
        self.port: int | None = None  # inet milter port; None: pick a free one at start
        self.label = ""

    def start(self) -> None:
        """Start the milter daemons; ``milter_spec`` is then what Postfix connects to."""

    def stop(self) -> None:
        """Stop what ``start`` started."""

    def roots(self) -> list[int]:
        """PIDs whose process trees are this stack's (for CPU and memory)."""
        return []

    def roles(self) -> dict[str, tuple[int, str]]:
        """Where the filter's CPU goes, by role (see `role_cpu`); empty: no breakdown."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The configuration used, for the results file."""
        return {}


class DefangStack(Stack):
    """``defang run`` with a bench filter, on a Unix or inet milter socket."""

    group = "defang"

    def __init__(self, filter_name: str, inet: bool = False, nodelay: bool = False,
                 settings: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.kind = filter_name
        self.name = f"defang-{filter_name}" + ("-inet" if inet else "") + ("-nodelay" if nodelay else "")
        self.filter = FILTERS / f"defang_{filter_name}.py"
        self.inet, self.nodelay = inet, nodelay
        self.settings = {"daemon": {"log_level": "info"},
                         "multiplexor": {"min_workers": 2, "max_workers": 10, "queue_size": 200,
                                         "queue_timeout": 30, "max_requests": 500}}  # fmt: skip
        for section, table in (settings or {}).items():
            self.settings.setdefault(section, {}).update(table)
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.site_dirs: list[str] = []  # prepended to PYTHONPATH (a sitecustomize probe)

    def start(self) -> None:
        self.dir = traversable_dir("defang-bench-")
        runtime = self.dir / "run"
        config = self.dir / "defang.toml"
        config.write_text(_toml(self.settings))
        if self.inet:
            port = self.port = self.port or free_port()
            spec, self.milter_spec = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
        else:
            spec = f"unix:{runtime / 'milter.sock'}"
            self.milter_spec = spec
        self.socket = spec
        env = {**os.environ, **self.env_extra}
        site = list(self.site_dirs)
        if self.nodelay:
            site.append(str(BENCH / "nodelay_site"))
            env["DEFANG_BENCH_NODELAY"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([*site, str(REPO), env.get("PYTHONPATH", "")])
        self.log_path = self.dir / "defang.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "defang", "run", "--config", str(config), "--filter",
                 str(self.filter), "--runtime-dir", str(runtime), "--socket", spec],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
            )  # fmt: skip
        _wait(lambda: "defang running" in self.log_path.read_text(errors="replace")
              or self.proc.poll() is not None, 60, "defang run")  # fmt: skip
        if self.proc.poll() is not None:
            raise RuntimeError(f"defang run exited: {self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        _stop_proc(self.proc, signal.SIGTERM, 90)
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def roles(self) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        if self.proc is not None:
            out["run"] = (self.proc.pid, "own")
        for role, title, mode in (("milter", "defang-milter", "own"),
                                  ("multiplexor", "defang-multiplexor", "own"),
                                  ("zygote+workers", "defang-zygote", "tree")):  # fmt: skip
            pids = self.pids_titled(title)
            if pids:
                out[role] = (pids[0], mode)
        return out

    def pids_titled(self, prefix: str) -> list[int]:
        """Our processes whose title starts with ``prefix`` (defang-milter, defang-worker...)."""
        return titled(tree(self.roots()), prefix)

    def describe(self) -> dict[str, Any]:
        return {"command": f"defang run --socket {self.socket}", "filter": str(self.filter.relative_to(REPO)),
                "config": self.settings, "nodelay_listener_fix": self.nodelay}  # fmt: skip


class NullMilterStack(Stack):
    """bench/nullmilter.py: pymilter accepting with one added header."""

    group = "nullmilter"
    kind = "null"

    def __init__(self, inet: bool = False, reply_all: bool = False) -> None:
        super().__init__()
        self.inet, self.reply_all = inet, reply_all
        self.name = "nullmilter" + ("-replyall" if reply_all else "") + ("-inet" if inet else "")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.dir = traversable_dir("nullmilter-bench-")
        if self.inet:
            port = self.port = self.port or free_port()
            spec, self.milter_spec = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
        else:
            spec = self.milter_spec = f"unix:{self.dir / 'milter.sock'}"
        self.log_path = self.dir / "nullmilter.log"
        with open(self.log_path, "ab") as log:
            argv = [sys.executable, str(BENCH / "nullmilter.py"), spec]
            argv += ["reply-all"] if self.reply_all else []
            self.proc = subprocess.Popen(argv,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env_extra},
                                         start_new_session=True)  # fmt: skip
        _wait(lambda: "ready" in self.log_path.read_text() or self.proc.poll() is not None, 30,
              "nullmilter")  # fmt: skip
        time.sleep(0.2)

    def stop(self) -> None:
        _stop_proc(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def describe(self) -> dict[str, Any]:
        return {"command": f"python bench/nullmilter.py {self.milter_spec}"}


class MimeDefangStack(Stack):
    """Debian's MIMEDefang: mimedefang-multiplexor (-E embedded Perl) + the mimedefang milter.

    Private everything: a spool directory under /tmp (owner ``defang``, group ``postfix``,
    0750, so smtpd may reach the socket inside), its own sockets, -D (foreground: they are
    our children and we stop them by PID).  The pool matches defang's: 2 to 10 workers,
    500 requests each; a 128-deep queue (-q 128, its maximum; -Q 30) on the multiplexor, -q on
    mimedefang so new connections queue too) instead of the default "No free workers"
    tempfail.  -X: no X-Scanned-By header (the filters add their own).
    """

    group = "mimedefang"
    USER = "defang"

    def __init__(self, filter_name: str) -> None:
        super().__init__()
        self.kind = filter_name
        self.name = f"mimedefang-{filter_name}"
        self.filter_src = FILTERS / f"mimedefang_{filter_name}.pl"
        self.mx: subprocess.Popen | None = None
        self.md: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("mimedefang") is not None and shutil.which("mimedefang-multiplexor") is not None

    def start(self) -> None:
        d = self.dir = Path(tempfile.mkdtemp(prefix="mimedefang-bench-", dir=stack_parent()))
        shutil.chown(d, self.USER, POSTFIX_USER)
        d.chmod(0o750)
        self.filter = d / "mimedefang-filter"
        shutil.copy(self.filter_src, self.filter)
        self.filter.chmod(0o644)
        mx_sock, md_sock = d / "mimedefang-multiplexor.sock", d / "mimedefang.sock"
        self.mx_argv = ["mimedefang-multiplexor", "-D", "-U", self.USER, "-z", str(d), "-s", str(mx_sock),
                        "-F", str(self.filter), "-E", "-m", "2", "-x", "10", "-r", "500", "-i", "300",
                        "-b", "120", "-q", "128", "-Q", "30", "-G"]  # fmt: skip
        self.md_argv = ["mimedefang", "-D", "-U", self.USER, "-z", str(d), "-m", str(mx_sock),
                        "-p", f"unix:{md_sock}", "-G", "-q", "-X"]  # fmt: skip
        log = open(d / "mimedefang.log", "ab")  # noqa: SIM115 (closed in stop)
        self._log = log
        self.mx = subprocess.Popen(self.mx_argv, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=d)  # fmt: skip
        _wait(lambda: mx_sock.exists() or self.mx.poll() is not None, 30, "mimedefang-multiplexor")
        if self.mx.poll() is not None:
            raise RuntimeError(f"mimedefang-multiplexor exited {self.mx.returncode}: {self._logtext()}")
        self.md = subprocess.Popen(self.md_argv, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=d)  # fmt: skip
        _wait(lambda: md_sock.exists() or self.md.poll() is not None, 30, "mimedefang")
        if self.md.poll() is not None:
            raise RuntimeError(f"mimedefang exited {self.md.returncode}: {self._logtext()}")
        os.chown(md_sock, -1, grp.getgrnam(POSTFIX_USER).gr_gid)
        os.chmod(md_sock, 0o660)
        self.milter_spec = f"unix:{md_sock}"
        # Wait for the first worker (mimedefang-multiplexor starts one every 3 s, -w).
        _wait(lambda: len(tree([self.mx.pid])) > 1, 30, "MIMEDefang's first worker")

    def _logtext(self) -> str:
        assert self.dir is not None
        return (self.dir / "mimedefang.log").read_text(errors="replace")

    def stop(self) -> None:
        _stop_proc(self.md)
        _stop_proc(self.mx)
        self.md = self.mx = None
        if getattr(self, "_log", None):
            self._log.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def roots(self) -> list[int]:
        return [p.pid for p in (self.mx, self.md) if p is not None and p.poll() is None]

    def roles(self) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        if self.md is not None:
            out["milter"] = (self.md.pid, "tree")
        if self.mx is not None:
            out["multiplexor"] = (self.mx.pid, "own")
            out["workers"] = (self.mx.pid, "children")
        return out

    def describe(self) -> dict[str, Any]:
        return {"multiplexor": " ".join(self.mx_argv), "milter": " ".join(self.md_argv),
                "filter": str(self.filter_src.relative_to(REPO)),
                "version": _dpkg_version("mimedefang")}  # fmt: skip


def _toml(settings: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):  # of strings: a JSON array is a TOML array
            return json.dumps([str(x) for x in v])
        return json.dumps(str(v))

    lines = []
    for section, table in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# ====================================================================== one cell
@dataclass
class RunResult:
    """One run of one profile through one stack."""

    stack: str
    profile: str
    run: int
    messages: int
    wall_s: float
    msgs_per_s: float
    eod_ms: dict[str, float]
    accepted: int
    rejected: int
    tempfailed: int
    errors: int
    filter_cpu_ms_per_msg: float | None
    filter_cpu_by_role_ms: dict[str, float]
    postfix_cpu_ms_per_msg: float
    client_cpu_ms_per_msg: float
    peak_rss_mb: float | None
    peak_pss_mb: float | None
    peak_procs: int | None
    drain_s: float
    load_before: tuple[float, float, float]
    samples_errors: list[str] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: a p99 is a latency someone got)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


class Bed:
    """One sink for the whole benchmark; a private Postfix per stack."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sink = Sink(workdir / "sink", free_port())
        self.sink.start()

    def close(self) -> None:
        self.sink.stop()

    @contextlib.contextmanager
    def postfix(self, stack: Stack, extra: dict[str, str] | None = None) -> Iterator[PrivatePostfix]:
        pf = PrivatePostfix(self.workdir / f"postfix-{stack.name}", free_port(), self.sink.port,
                            milter=stack.milter_spec, extra=extra)  # fmt: skip
        pf.start()
        try:
            yield pf
        finally:
            pf.stop()
            shutil.rmtree(pf.workdir, ignore_errors=True)

    def wait_drained(self, pf: PrivatePostfix, expected: int, timeout: float = 600) -> float:
        """Wait until the sink holds ``expected`` messages and Postfix's queue is empty."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while self.sink.count() < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sink got {self.sink.count()} of {expected} messages in {timeout}s")
            time.sleep(0.05)
        pf.wait_queue_empty(timeout=max(5.0, deadline - time.monotonic()))
        return time.monotonic() - t0


def warm_up(bed: Bed, pf: PrivatePostfix, stack: Stack, factory: MessageFactory,
            log: Callable[[str], None] | None) -> None:  # fmt: skip
    """Send the profile's warm-up messages and wait until they are delivered.

    Before every measured run, not once per cell: the stacks take turns (see `main_bench`),
    and a pool left idle while the others ran may have shrunk or gone cold.  ``log``: say
    which headers the stack added on the way (the first time).
    """
    profile = factory.profile
    bed.sink.clear()
    warm, _ = send_load(pf.smtp_port, factory, profile.warmup, profile.conns, f"warm.{stack.name}")
    bed.wait_drained(pf, sum(r.status == "accepted" for r in warm))
    if log is not None:
        added = added_headers(bed.sink)
        log(f"  {stack.name:28} {profile.name:>4} warm-up: {len(warm)} sent, headers added on the way: "
            f"{', '.join(added) or 'none'}")


def measure(bed: Bed, pf: PrivatePostfix, stack: Stack, factory: MessageFactory, run: int,
            log: Callable[[str], None]) -> RunResult:  # fmt: skip
    """One measured run of the factory's profile through one (warmed-up) stack."""
    profile = factory.profile
    bed.sink.clear()
    settle()
    master = pf.master_pid()
    pf_roots = [master] if master else []
    load = os.getloadavg()
    roles = stack.roles()
    role0 = role_cpu(roles)
    cpu_f0 = tree_cpu(stack.roots()) if stack.roots() else None
    cpu_p0 = tree_cpu(pf_roots)
    cpu_c0 = _self_cpu()
    with MemSampler(stack.roots) as mem:
        results, wall = send_load(pf.smtp_port, factory, profile.count, profile.conns,
                                  f"{stack.name}.{profile.name}.{run}.{time.time_ns()}")  # fmt: skip
        accepted = sum(r.status == "accepted" for r in results)
        drain = bed.wait_drained(pf, accepted)
    cpu_c1 = _self_cpu()
    cpu_f1 = tree_cpu(stack.roots()) if stack.roots() else None
    role1 = role_cpu(roles)
    cpu_p1 = tree_cpu(pf_roots)
    n = len(results)
    eods = [r.eod for r in results if r.eod is not None]
    errs = sorted({r.detail for r in results if r.status != "accepted" and r.detail})[:5]
    rr = RunResult(
        stack=stack.name, profile=profile.name, run=run, messages=n, wall_s=round(wall, 3),
        msgs_per_s=round(n / wall, 1),
        eod_ms={f"p{p}": round(percentile(eods, p) * 1000, 2) for p in (50, 95, 99)},
        accepted=accepted, rejected=sum(r.status == "rejected" for r in results),
        tempfailed=sum(r.status == "tempfailed" for r in results),
        errors=sum(r.status == "error" for r in results),
        filter_cpu_ms_per_msg=None if cpu_f0 is None or cpu_f1 is None
        else round((cpu_f1 - cpu_f0) * 1000 / n, 3),
        filter_cpu_by_role_ms={k: round((role1[k] - role0[k]) * 1000 / n, 3)
                               for k in role1 if k in role0},
        postfix_cpu_ms_per_msg=round((cpu_p1 - cpu_p0) * 1000 / n, 3),
        client_cpu_ms_per_msg=round((cpu_c1 - cpu_c0) * 1000 / n, 3),
        peak_rss_mb=round(mem.peak_rss / 2**20, 1) if stack.roots() else None,
        peak_pss_mb=round(mem.peak_pss / 2**20, 1) if stack.roots() else None,
        peak_procs=mem.peak_procs if stack.roots() else None,
        drain_s=round(drain, 2), load_before=tuple(round(x, 2) for x in load),
        samples_errors=errs,
    )  # fmt: skip
    log(f"  {stack.name:28} {profile.name:>4} run {run}: {rr.msgs_per_s:7.1f} msg/s, "
        f"EOD p50 {rr.eod_ms['p50']:.1f} ms p99 {rr.eod_ms['p99']:.1f} ms, "
        f"acc/rej/tmp/err {rr.accepted}/{rr.rejected}/{rr.tempfailed}/{rr.errors}, "
        f"filter CPU {_fmt(rr.filter_cpu_ms_per_msg)} ms/msg, Postfix {rr.postfix_cpu_ms_per_msg:.2f}, "
        f"PSS {_fmt(rr.peak_pss_mb)} MB, load {load[0]:.2f}"
        + ("; by role: " + ", ".join(f"{k} {v:.2f}" for k, v in rr.filter_cpu_by_role_ms.items())
           if rr.filter_cpu_by_role_ms else ""))  # fmt: skip
    return rr


def settle(pause: float = 1.0) -> None:
    """Flush dirty pages (the sink's and Postfix's files of the previous run) and pause.

    Without this, writeback and block discards of one run's deleted files land in the
    next run (an ext4 mounted with ``discard`` makes deletes expensive): measured here, a
    cell that followed the 7 MB runs of another stack got ~40% more CPU per message.
    """
    os.sync()
    time.sleep(pause)


def added_headers(sink: Sink) -> list[str]:
    """Header fields of one relayed message that the client did not send (a check that
    the filter really ran: X-Scanned, X-Null-Milter), Postfix's Received excepted."""
    for path in sink._complete_files()[:1]:
        head = path.read_bytes().split(b"\n\n", 1)[0].decode("latin-1")
        names = [line.split(":", 1)[0] for line in head.split("\n") if line[:1] not in (" ", "\t")]
        sent = {"From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type", "Received"}
        return sorted({n for n in names if n and n not in sent and not n.startswith("X-Rcpt")
                       and n not in ("X-Mail-Args", "X-Helo-Args", "X-Client-Addr", "X-Client-Proto")})
    return []


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


# ====================================================================== machine facts
def _dpkg_version(pkg: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True,
                             timeout=10)  # fmt: skip
    except OSError:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: hardware, kernel, versions, the defang commit, load."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)  # fmt: skip
    postfix_version = subprocess.run([find_program("postconf"), "-d", "-h", "mail_version"],
                                     capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        import milter

        pymilter = ".".join(map(str, milter.getversion()))
        from importlib.metadata import version

        pymilter = f"{version('pymilter')} (libmilter {pymilter})"
    except Exception:
        pymilter = "?"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "filters_dir": stack_parent(),
        "python": platform.python_version(),
        "postfix": postfix_version,
        "mimedefang": _dpkg_version("mimedefang"),
        "pymilter": pymilter,
        "defang_commit": git.stdout.strip() or "?",
        "defang_dirty": bool(dirty.stdout.strip()),
        "loadavg_start": os.getloadavg(),
        "top_start": _top_summary(),
    }


def _top_summary() -> str:
    """The first lines of ``top -bn1`` (load, CPU split, the busiest processes)."""
    try:
        out = subprocess.run(["top", "-bn1", "-w", "160"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return "\n".join(out.splitlines()[:14])


def other_load() -> list[str]:
    """Processes of colleagues that would disturb a benchmark (pytest, other Postfixes)."""
    mine = set(tree([os.getpid()]))
    busy = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in mine:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.search(r"pytest|postfix/sbin/master|/usr/lib/postfix/sbin/master|defang-worker|smtp-sink", cmd):
            busy.append(f"{pid} {cmd[:100]}")
    return busy


# ====================================================================== reporting
def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per (profile, stack): medians and min-max over the runs."""
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.profile, r.stack), []).append(r)
    rows = []
    for (profile, stack), rs in cells.items():
        def agg(get: Callable[[RunResult], float | None],
                rs: list[RunResult] = rs) -> dict[str, float] | None:  # fmt: skip
            vals = [v for v in (get(r) for r in rs) if v is not None]
            if not vals:
                return None
            return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3),
                    "max": round(max(vals), 3)}  # fmt: skip

        rows.append({
            "profile": profile, "stack": stack, "runs": len(rs),
            "msgs_per_s": agg(lambda r: r.msgs_per_s),
            "eod_p50_ms": agg(lambda r: r.eod_ms["p50"]), "eod_p95_ms": agg(lambda r: r.eod_ms["p95"]),
            "eod_p99_ms": agg(lambda r: r.eod_ms["p99"]),
            "accepted": sum(r.accepted for r in rs), "rejected": sum(r.rejected for r in rs),
            "tempfailed": sum(r.tempfailed for r in rs), "errors": sum(r.errors for r in rs),
            "messages": sum(r.messages for r in rs),
            "filter_cpu_ms": agg(lambda r: r.filter_cpu_ms_per_msg),
            "filter_cpu_by_role_ms": {k: statistics.median(r.filter_cpu_by_role_ms.get(k, 0.0) for r in rs)
                                      for k in rs[0].filter_cpu_by_role_ms},
            "postfix_cpu_ms": agg(lambda r: r.postfix_cpu_ms_per_msg),
            "client_cpu_ms": agg(lambda r: r.client_cpu_ms_per_msg),
            "peak_rss_mb": agg(lambda r: r.peak_rss_mb), "peak_pss_mb": agg(lambda r: r.peak_pss_mb),
            "load1": agg(lambda r: r.load_before[0]),
        })  # fmt: skip
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """defang / MIMEDefang (same filter) and defang / Postfix alone, from the medians."""
    by = {(r["profile"], r["stack"]): r for r in rows}
    out = []
    for (profile, stack), r in by.items():
        if not stack.startswith("defang-"):
            continue
        kind = stack.split("-")[1]
        paired = stack in ("defang-minimal", "defang-headers")
        md = by.get((profile, f"mimedefang-{kind}")) if paired else None
        pf = by.get((profile, "postfix"))
        item: dict[str, Any] = {"profile": profile, "stack": stack}
        if md:
            item["vs_mimedefang"] = {
                "msgs_per_s": _ratio(r["msgs_per_s"], md["msgs_per_s"]),
                "eod_p50": _ratio(r["eod_p50_ms"], md["eod_p50_ms"]),
                "eod_p99": _ratio(r["eod_p99_ms"], md["eod_p99_ms"]),
                "filter_cpu": _ratio(r["filter_cpu_ms"], md["filter_cpu_ms"]),
                "peak_pss": _ratio(r["peak_pss_mb"], md["peak_pss_mb"]),
            }
        if pf:
            item["vs_postfix"] = {"msgs_per_s": _ratio(r["msgs_per_s"], pf["msgs_per_s"])}
        if len(item) > 2:
            out.append(item)
    return out


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b["median"]:
        return None
    return round(a["median"] / b["median"], 2)


def _spread(a: dict | None, nd: int = 1) -> str:
    if not a:
        return "-"
    if a["min"] == a["max"]:
        return f"{a['median']:.{nd}f}"
    return f"{a['median']:.{nd}f} ({a['min']:.{nd}f}–{a['max']:.{nd}f})"


STACK_ORDER = ["postfix", "nullmilter", "nullmilter-inet", "defang-minimal", "defang-headers",
               "defang-minimal-inet", "defang-minimal-inet-nodelay", "mimedefang-minimal",
               "mimedefang-headers"]  # fmt: skip


def table_markdown(rows: list[dict[str, Any]], rat: list[dict[str, Any]]) -> str:
    """The full results table (every stack and profile) and the ratios, as Markdown."""
    order = {s: i for i, s in enumerate(STACK_ORDER)}
    prof = {p: i for i, p in enumerate(PROFILES)}
    rows = sorted(rows, key=lambda r: (prof.get(r["profile"], 9), order.get(r["stack"], 99)))
    lines = ["| profile | stack | msg/s (min–max) | end-of-DATA p50 / p95 / p99 ms | acc / rej / tmpf / err "
             "| filter CPU ms/msg | Postfix CPU ms/msg | peak RSS / PSS MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lat = " / ".join(_fmt(r[k]["median"] if r[k] else None, 1) for k in ("eod_p50_ms", "eod_p95_ms",
                                                                             "eod_p99_ms"))  # fmt: skip
        mem = "-"
        if r["peak_pss_mb"]:
            mem = f"{r['peak_rss_mb']['median']:.0f} / {r['peak_pss_mb']['median']:.0f}"
        lines.append(
            f"| {r['profile']} | {r['stack']} | {_spread(r['msgs_per_s'])} | {lat} | "
            f"{r['accepted']} / {r['rejected']} / {r['tempfailed']} / {r['errors']} | "
            f"{_spread(r['filter_cpu_ms'], 2)} | {_spread(r['postfix_cpu_ms'], 2)} | {mem} |"
        )
    roles = [r for r in rows if r.get("filter_cpu_by_role_ms")]
    if roles:
        lines += ["", "| profile | stack | filter CPU ms/msg by process (median) |", "|---|---|---|"]
        for r in roles:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r["filter_cpu_by_role_ms"].items())
            lines.append(f"| {r['profile']} | {r['stack']} | {parts} |")
    if rat:
        lines += ["", "| profile | stack | msg/s ÷ MIMEDefang | p50 ÷ MD | p99 ÷ MD | filter CPU ÷ MD "
                  "| PSS ÷ MD | msg/s ÷ Postfix alone |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for it in sorted(rat, key=lambda x: (prof.get(x["profile"], 9), order.get(x["stack"], 99))):
            md = it.get("vs_mimedefang") or {}
            pf = it.get("vs_postfix") or {}
            cells = [md.get("msgs_per_s"), md.get("eod_p50"), md.get("eod_p99"), md.get("filter_cpu"),
                     md.get("peak_pss"), pf.get("msgs_per_s")]  # fmt: skip
            lines.append(f"| {it['profile']} | {it['stack']} | "
                         + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, doc: dict[str, Any]) -> None:
    """``out`` (.md) and the same name with .json."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    m = doc["machine"]
    md = [f"# defang benchmark, {m['date']}", "",
          f"- host `{m['host']}`: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, "
          f"kernel {m['kernel']}",
          f"- Python {m['python']}, Postfix {m['postfix']}, pymilter {m['pymilter']}, "
          f"MIMEDefang {m['mimedefang'] or 'not installed'}",
          f"- defang commit `{m['defang_commit']}`"
          + (" (with uncommitted changes)" if m["defang_dirty"] else ""),
          f"- filters' own directories (spools, sockets) under `{m.get('filters_dir', '/tmp')}`, "
          f"Postfix's queues and the sink under `/tmp`",
          f"- load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}; "
          f"other load seen: {len(doc.get('other_load') or [])} processes",
          f"- command: `{doc['command']}`", "",
          "Medians over the runs, (min–max) where runs differ. CPU is per message, summed over the "
          "process tree (exited workers included). Latency is client side, from the final \".\" to "
          "the reply. Memory is the peak of RSS and PSS summed over the filter's processes.", "",
          table_markdown(doc["summary"], doc["ratios"]), "",
          "## Configuration", "", "```json", json.dumps(doc["stacks"], indent=1), "```", ""]  # fmt: skip
    if doc.get("machine", {}).get("top_start"):
        md += ["## Machine at start (top -bn1)", "", "```", m["top_start"], "```", ""]
    out.write_text("\n".join(md))


# ====================================================================== main benchmark
def build_stacks(only: list[str] | None, with_md: bool, inet: bool = True) -> list[Stack]:
    stacks: list[Stack] = [Stack(), NullMilterStack(), DefangStack("minimal"), DefangStack("headers")]
    if inet:
        # defang itself sets TCP_NODELAY on an inet listener now ([milter] tcp_nodelay)
        stacks += [DefangStack("minimal", inet=True)]
    if with_md:
        stacks += [MimeDefangStack("minimal"), MimeDefangStack("headers")]
    if only:
        only = [ALIASES.get(o, o) for o in only]
        stacks = [s for s in stacks if any(s.name == o or s.group == o for o in only)]
    return stacks


#: other names --only takes: "pymilter" is the do-nothing pymilter milter
ALIASES = {"pymilter": "nullmilter"}


def turns(stacks: list[Stack], run: int) -> list[Stack]:
    """The order in which the stacks take their ``run``-th turn: forward, then backward.

    The machine's speed drifts (other tenants of the host, page cache, writeback): run
    stack by stack, a stack measured in a slow quarter of an hour looks slow against one
    measured in a fast one -- seen here, the same defang commit at 1.4x and at 1.8x
    MIMEDefang on 7 MB, in two runs an hour apart.  So the stacks take turns, one run of
    every profile each, and the even rounds go in the reverse order, which evens out a
    drift that lasts the whole benchmark.  One stack is up at a time: with all of them
    up, the pages of the interpreter and libraries that several stacks map would be
    shared out among them, and the summed PSS of each would look smaller than alone.
    """
    return list(stacks) if run % 2 else list(reversed(stacks))


def main_bench(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    with_md = MimeDefangStack.available() and not args.no_mimedefang
    if args.with_mimedefang and not MimeDefangStack.available():
        log("bench: --with-mimedefang but mimedefang is not installed (scripts/bench installs it)")
        return 2
    only = args.only.split(",") if args.only else None
    stacks = build_stacks(only, with_md, inet=not args.no_inet)
    profiles = [PROFILES[p] for p in args.profile.split(",")]
    if args.scale != 1.0:
        profiles = [Profile(p.name, max(2, int(p.count * args.scale)), p.conns, p.attachment, p.text,
                            max(1, int(p.warmup * args.scale))) for p in profiles]  # fmt: skip
    machine = machine_info()
    busy = other_load()
    log(f"bench: {len(stacks)} stacks x {len(profiles)} profiles x {args.runs} runs "
        f"on {machine['nproc']} CPUs, "
        f"load {machine['loadavg_start'][0]:.2f}; {len(busy)} other test processes running")
    for b in busy[:8]:
        log(f"  busy: {b}")
    workdir = Path(tempfile.mkdtemp(prefix="defang-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    bed = Bed(workdir)
    results: list[RunResult] = []
    described: dict[str, Any] = {}
    factories = [MessageFactory(p) for p in profiles]  # each body built once, for every run
    try:
        for run in range(1, args.runs + 1):
            for stack in turns(stacks, run):
                log(f"bench: {stack.name}, run {run}")
                try:
                    stack.start()
                    described.setdefault(stack.name, stack.describe())
                    with bed.postfix(stack) as pf:
                        described[stack.name].setdefault("postfix_milter", stack.milter_spec)
                        for factory in factories:
                            warm_up(bed, pf, stack, factory, log if run == 1 else None)
                            results.append(measure(bed, pf, stack, factory, run, log))
                finally:
                    stack.stop()
    finally:
        bed.close()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(results)
    rat = ratios(rows)
    machine["loadavg_end"] = os.getloadavg()
    print()
    print(table_markdown(rows, rat))
    doc = {"machine": machine, "other_load": busy, "command": " ".join(["scripts/bench", *sys.argv[1:]]),
           "profiles": {f.profile.name: {**asdict(f.profile), "message_bytes": f.size()} for f in factories},
           "stacks": described, "runs": [asdict(r) for r in results], "summary": rows,
           "ratios": rat}  # fmt: skip
    if args.out:
        out = Path(args.out.replace("<date>", time.strftime("%Y-%m-%d"))
                   .replace("<host>", socket.gethostname()))
        write_outputs(out, doc)
        log(f"bench: wrote {out} and {out.with_suffix('.json')}")
    return 0


def default_out() -> str:
    return str(REPO / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--profile", default="2k,140k,7m", help="comma list of 2k, 140k, 7m (default all)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per cell (default 3)")
    ap.add_argument("--only", help="comma list of stacks or groups: postfix, nullmilter (or pymilter), "
                    "defang, mimedefang, defang-minimal, defang-minimal-inet, ...")  # fmt: skip
    ap.add_argument("--scale", type=float, default=1.0, help="multiply message counts (quick checks)")
    ap.add_argument("--with-mimedefang", action="store_true",
                    help="require MIMEDefang (scripts/bench installs it first)")
    ap.add_argument("--no-mimedefang", action="store_true", help="skip MIMEDefang even if installed")
    ap.add_argument("--no-inet", action="store_true", help="skip the defang inet-socket stacks")
    ap.add_argument("--out", nargs="?", const=default_out(), default=None,
                    help="write results .md and .json (default path bench/results/<date>-<host>.md)")
    ap.add_argument("--inet", action="store_true", help="run the inet socket investigation instead")
    ap.add_argument("--pyspy", action="store_true", help="profile defang with py-spy instead")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the benchmark, or one of the investigation modes."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench must run as root (Postfix's master, smtp-sink)", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(text, flush=True)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every stack.stop()

    signal.signal(signal.SIGTERM, interrupted)

    if args.inet:
        from bench_inet import main_inet  # scripts/bench_inet.py

        return main_inet(args, log)
    if args.pyspy:
        from bench_pyspy import main_pyspy  # scripts/bench_pyspy.py

        return main_pyspy(args, log)
    return main_bench(args, log)


if __name__ == "__main__":
    sys.exit(main())
