"""Worker pool lifecycle, graceful reload and defangctl, through a real Postfix on loopback.

Each scenario is shown where it matters: at the SMTP client (the reply and how long it
took), at the sink (what was delivered, counted by Message-ID, and which worker served
it, from the ``X-Worker-Pid`` header the test filters add), in ``defangctl status
--json`` and in the defang log.  Counters are compared as differences around a
scenario, so tests that share one running stack do not depend on their order.

The filters live in tests/filters/pool_*.py; ``pool_control.py`` does what the message's
headers say (hold while a file exists, sleep, pick a verdict), so that the *same bytes*
can hang on the first attempt and go through on the retry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon import FILTERS, REPO, Defang, _descendants, traversable_dir, write_config
from mta import Stack, delivered, message, needs_postfix, send_in_thread, shared_dir, wait_for

from defang.testbed import SendResult, send, send_many

pytestmark = [pytest.mark.integration, needs_postfix]

CONTROL = FILTERS / "pool_control.py"
LIVE = ("booting", "idle", "busy")
MIB = 1024 * 1024


# ---------------------------------------------------------------- helpers


def figure(what: str, value: Any) -> None:
    """Print a measured figure (shown with ``pytest -s``; the assertions do the judging)."""
    print(f"\n[figure] {what}: {value}", end="")


def live_workers(status: dict) -> list[dict]:
    return [w for w in status["workers"] if w["state"] in LIVE]


def pool_is(d: Defang, size: int, gen: int | None = None) -> Callable[[], dict | None]:
    """A predicate: the pool has ``size`` live workers, all ready (idle), of ``gen``."""

    def check() -> dict | None:
        st = d.status()
        ws = live_workers(st)
        if len(ws) == size and all(w["state"] == "idle" and (gen is None or w["gen"] == gen)
                                   for w in ws):  # fmt: skip
            return st
        return None

    return check


def header(raw: bytes, name: str) -> str | None:
    head = raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
    for line in head.split("\r\n"):
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value.strip()
    return None


def counts(status: dict, table: str) -> dict[str, int]:
    return dict(status.get(table) or {})


def delta(before: dict, after: dict, table: str) -> dict[str, int]:
    """Per-key growth of a counter table between two status snapshots (zeros left out)."""
    a, b = counts(before, table), counts(after, table)
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) != a.get(k, 0)}


def events_grow(d: Defang, before: dict, expected: dict[str, int]) -> dict:
    """Wait until the status events grew by exactly ``expected`` (exits are reported by
    the zygote a moment after the fact); return that status."""
    last: dict = {}

    def check() -> dict | None:
        nonlocal last
        last = d.status()
        return last if delta(before, last, "events") == expected else None

    try:
        return wait_for(f"events to grow by {expected}", check, timeout=10)
    except AssertionError:
        raise AssertionError(f"events grew by {delta(before, last, 'events')}, want {expected}") from None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def zombie(pid: int) -> bool:
    """True if ``pid`` exited but nobody reaped it (its parent is gone or never waits)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False


def describe(pid: int) -> str:
    """pid, state, parent and title of a process, for assertion messages."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"{pid} (gone)"
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return f"{pid} state {state} ppid {ppid} {title or stat.split('(', 1)[1].split(')')[0]}"


def ctl(runtime: Path, *args: str) -> subprocess.CompletedProcess:
    """defangctl against any runtime dir (for the 'unreachable' exit code)."""
    return subprocess.run([sys.executable, "-m", "defang.cli.ctl", "--runtime-dir", str(runtime), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip


# ---------------------------------------------------------------- a shared stack for faults
FAULT_SETTINGS = {"multiplexor": {
    "min_workers": 2, "max_workers": 2, "min_spare": 0, "busy_timeout": 3, "busy_grace": 1,
    "queue_size": 4, "queue_timeout": 30, "max_requests": 0,
}}  # fmt: skip


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """Two workers, busy_timeout 3 s (+1 s grace), a queue of 4; shared by the fault tests."""
    s = Stack(CONTROL, settings=FAULT_SETTINGS).start()
    s.tmp = shared_dir("defang-pool-")  # hold files: the workers (user defang) write beside them
    yield s
    s.stop()
    shutil.rmtree(s.tmp, ignore_errors=True)


def test_kill_9_mid_message_gives_4xx_and_the_retry_is_delivered_once(faults):
    """A worker killed with SIGKILL while it holds a message: that message gets a 4xx (the
    multiplexor never reruns it), the client's retry of the same bytes is delivered
    exactly once, and the pool is back to two workers."""
    d = faults.defang
    wait_for("a full pool", pool_is(d, 2))
    before = d.status()
    hold = faults.tmp / "kill.hold"
    hold.touch()
    data, mid = message("kill-9", X_Hold_While=str(hold))
    th, out = send_in_thread(faults, data)
    try:
        pid = int(wait_for("the worker to take the message", lambda: _read(Path(f"{hold}.pid"))))
    except BaseException:
        hold.unlink()  # do not leave a message held for the other tests
        raise
    st = d.status()
    [busy] = [w for w in st["workers"] if w["pid"] == pid]
    assert busy["state"] == "busy" and busy["op"] == "eom" and busy["queue_id"], busy
    qid = busy["queue_id"]

    os.kill(pid, signal.SIGKILL)
    th.join(30)
    first: SendResult = out["result"]
    assert first.data == (451, "4.3.0 Mail filter unavailable, try again later"), first
    assert first.queue_id is None

    hold.unlink()  # the sending MTA retries: same bytes, and this time the filter lets it go
    retry = faults.send(data)
    assert retry.data[0] == 250, retry
    wait_for("the retry at the sink", lambda: delivered(faults, mid))
    faults.postfix.wait_queue_empty()
    time.sleep(0.3)
    assert len(delivered(faults, mid)) == 1, "delivered more than once"
    figure("kill -9: first attempt / retry / copies at the sink", (first.data, retry.data, 1))

    after = wait_for("the pool back to size", pool_is(d, 2))
    assert pid not in {w["pid"] for w in after["workers"]}
    assert len(d.pids("defang-worker")) == 2
    events_grow(d, before, {"worker_lost": 1, "worker_killed": 1})
    assert delta(before, after, "verdicts") == {"accept": 1}  # the retry; the lost one is no verdict
    log = d.log()
    assert re.search(rf"worker \d+ \(pid {pid}\) lost while handling eom {qid} ", log), log[-3000:]
    assert f"(pid {pid}) killed by signal SIGKILL" in log
    assert re.search(rf"{qid}: milter-reject: END-OF-MESSAGE .*4\.3\.0", faults.postfix.log_text())


def test_busy_timeout_tempfails_in_time_and_replaces_the_worker(faults):
    """A hook sleeping far past busy_timeout: the client has its 4xx within busy_timeout
    plus busy_grace (plus a margin: this is a bound, not a speed claim), the worker is
    TERMed and replaced, and the log names the worker, the queue ID and the time."""
    d = faults.defang
    cfg = FAULT_SETTINGS["multiplexor"]
    wait_for("a full pool", pool_is(d, 2))
    before = d.status()
    data, _ = message("sleepy", X_Sleep="30")
    t0 = time.monotonic()
    r = faults.send(data)
    waited = time.monotonic() - t0
    assert r.data == (451, "4.3.0 Mail filter unavailable, try again later"), r
    assert cfg["busy_timeout"] <= waited < cfg["busy_timeout"] + cfg["busy_grace"] + 3.0, waited

    log = d.wait_log("past busy_timeout")
    m = re.search(r"worker (\d+) \(pid (\d+)\) busy ([\d.]+)s on eom (\w+) \(conn [^)]*\), past "
                  r"busy_timeout 3s: answering tempfail, sending TERM", log)  # fmt: skip
    assert m, log[-3000:]
    wid, pid, secs, qid = int(m[1]), int(m[2]), float(m[3]), m[4]
    assert cfg["busy_timeout"] <= secs < cfg["busy_timeout"] + 1.5
    figure("busy_timeout 3 s + grace 1 s: client waited / log says", (round(waited, 2), f"worker {wid} "
           f"pid {pid} busy {secs}s on {qid}"))  # fmt: skip
    wait_for(f"worker pid {pid} to be gone", lambda: not pid_alive(pid), timeout=cfg["busy_grace"] + 3)
    d.wait_log(f"worker {wid} (pid {pid}) killed by signal SIGTERM")
    after = wait_for("the pool back to size", pool_is(d, 2))
    assert pid not in {w["pid"] for w in after["workers"]}
    events_grow(d, before, {"busy_timeout": 1, "worker_killed": 1})
    assert re.search(rf"{qid}: milter-reject: END-OF-MESSAGE .*4\.3\.0", faults.postfix.log_text())


def test_busy_timeout_kills_a_worker_that_ignores_term(faults):
    """A filter that ignores SIGTERM is KILLed busy_grace after the TERM."""
    d = faults.defang
    wait_for("a full pool", pool_is(d, 2))
    before = d.status()
    data, _ = message("stubborn", X_Sleep="30", X_Ignore_Term="yes")
    r = faults.send(data)
    assert r.data[0] == 451, r
    t0 = time.monotonic()
    log = d.wait_log("still alive after its grace period: KILL", timeout=10)
    figure("TERM-ignoring worker KILLed after (s)", round(time.monotonic() - t0, 2))
    m = re.search(r"worker (\d+) \(pid (\d+)\) still alive after its grace period: KILL", log)
    wait_for("the stubborn worker to die", lambda: not pid_alive(int(m[2])), timeout=5)
    d.wait_log(f"(pid {m[2]}) killed by signal SIGKILL")
    wait_for("the pool back to size", pool_is(d, 2))
    events_grow(d, before, {"busy_timeout": 1, "worker_killed": 1})


def send_staggered(port: int, messages: list[bytes], gap: float) -> list[SendResult]:
    """Send each message on its own connection, starting one every ``gap`` seconds
    (all of them run concurrently; the stagger only keeps their starts apart)."""
    results: list[SendResult | None] = [None] * len(messages)

    def one(i: int) -> None:
        results[i] = send("127.0.0.1", port, "a@example.org", ["bob@example.org"], messages[i])

    threads = []
    for i in range(len(messages)):
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(gap)
    for t in threads:
        t.join(60)
    return [r for r in results if r is not None]


def test_burst_larger_than_pool_and_queue(faults):
    """2 workers, queue_size 4, a hook of 0.5 s, 10 messages at once: 2 run, 4 wait in
    the queue and then succeed, 4 get "451 4.3.2 defang busy".

    Exact counts hold when all 10 requests reach the multiplexor within the 0.5 s the
    first two take, and queue_timeout (30 s) is far above the 1 s the last queued one
    waits.  If a request came in after a worker freed up, it would find room and more
    than 6 would succeed: that is the slack, and the multiplexor's own counters must
    agree with the client whatever happens.

    "At once" is 10 connections started 30 ms apart (all in flight within 0.3 s), not
    in the same instant: libmilter's worker pool (Debian builds it with
    _FFR_WORKERS_POOL) can lose a wake-up when sessions become ready simultaneously,
    and such a session then waits for another session's callback to return -- here
    for the first 0.5 s hook, by which time a worker is free (seen as 7/3 and 8/2 when
    all 10 started together on a loaded machine).
    """
    d = faults.defang
    cfg = FAULT_SETTINGS["multiplexor"]
    workers, queue, overflow = cfg["max_workers"], cfg["queue_size"], 4
    total = workers + queue + overflow
    port = faults.postfix.smtp_port
    warm = [("a@example.org", ["bob@example.org"], message(f"warm{i}")[0]) for i in range(total)]
    assert all(r.data[0] == 250 for r in send_many("127.0.0.1", port, warm, concurrency=total))
    wait_for("a full pool", pool_is(d, 2))
    before = d.status()
    burst = [message(f"burst{i}", X_Sleep="0.5")[0] for i in range(total)]
    t0 = time.monotonic()
    results = send_staggered(port, burst, gap=0.03)
    took = time.monotonic() - t0
    ok = [r for r in results if r.data and r.data[0] == 250]
    busy = [r for r in results if r.data == (451, "4.3.2 defang busy, try again later")]
    assert len(ok) + len(busy) == total, [r.data for r in results]
    figure("burst of 10 (2 workers, queue 4): 250 / 451 4.3.2 / seconds",
           (len(ok), len(busy), round(took, 2)))  # fmt: skip
    after = d.status()
    assert delta(before, after, "events") == {"busy": len(busy)}
    assert delta(before, after, "verdicts") == {"accept": len(ok)}
    assert (len(ok), len(busy)) == (workers + queue, overflow), [r.data for r in results]
    assert d.log().count("queue full (4): busy tempfail") >= overflow
    # 6 messages of 0.5 s on 2 workers: three rounds
    assert took >= 3 * 0.5, took


def test_status_counts_match_what_was_sent(faults):
    """Verdict totals, requests, latency percentiles, rates and the workers list agree
    with the traffic this test sent (and with the processes that exist)."""
    d = faults.defang
    wait_for("a full pool", pool_is(d, 2))
    before = d.status()
    plan = {"accept": 3, "continue": 4, "reject": 2}
    replies: dict[str, list[int]] = {}
    for verdict, n in plan.items():
        for i in range(n):
            r = faults.send(message(f"{verdict}{i}", X_Verdict=verdict)[0])
            replies.setdefault(verdict, []).append(r.data[0])
    assert replies == {"accept": [250] * 3, "continue": [250] * 4, "reject": [550] * 2}
    after = d.status()
    # status counts an end-of-message "continue" as what it is for the MTA: accepted
    assert delta(before, after, "verdicts") == {"accept": plan["accept"] + plan["continue"],
                                                 "reject": plan["reject"]}
    assert delta(before, after, "requests") == {"eom": sum(plan.values())}
    assert delta(before, after, "events") == {}
    lat = after["latency_ms"]
    assert all(lat[p] is not None and lat[p] >= 0 for p in ("p50", "p95", "p99")), lat
    assert lat["p50"] <= lat["p95"] <= lat["p99"]
    assert after["messages_per_second"]["1m"] > 0
    figure("status after the plan", {"verdicts+": delta(before, after, "verdicts"), "latency_ms": lat,
                                     "rate": after["messages_per_second"]})  # fmt: skip
    assert sum(after["histogram"]["counts"]) == sum(after["verdicts"].values())
    ws = live_workers(after)
    assert {w["pid"] for w in ws} == set(d.pids("defang-worker"))
    assert all(w["rss"] and w["rss"] > MIB and w["gen"] == 1 for w in ws), ws
    assert sum(w["served"] for w in ws) >= sum(plan.values())
    assert after["queue"] == {"depth": 0, "size": 4}
    assert after["pool"] == {"min_workers": 2, "max_workers": 2, "min_spare": 0}
    assert after["spawn_failures"] == 0 and after["last_load_error"] is None


def test_defangctl_human_output_and_exit_codes(faults, tmp_path):
    """status, workers and histo render for humans with exit code 0; an unreachable
    multiplexor is exit code 3 (the failed reload's 1 is in the reload test)."""
    d = faults.defang
    faults.send(message("for-histo")[0])
    st = d.ctl("status")
    assert st.returncode == 0, st.stderr
    assert "multiplexor pid" in st.stdout and "(generation 1)" in st.stdout
    assert re.search(r"latency:\s+p50 [\d.]+ ms, p95 [\d.]+ ms, p99 [\d.]+ ms", st.stdout), st.stdout
    assert re.search(r"rate:\s+[\d.]+/s 1m", st.stdout)
    wk = d.ctl("workers")
    assert wk.returncode == 0, wk.stderr
    lines = wk.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "PID", "GEN", "STATE"]
    assert {int(line.split()[1]) for line in lines[1:]} == set(d.pids("defang-worker"))
    hi = d.ctl("histo")
    assert hi.returncode == 0, hi.stderr
    assert re.search(r"<= [\d.]+ ms \| #+ \d+", hi.stdout), hi.stdout
    for cmd in ("status", "workers", "histo"):
        r = d.ctl("--json", cmd)
        assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    nowhere = ctl(tmp_path / "no-such-runtime", "status")
    assert nowhere.returncode == 3 and "cannot reach the multiplexor" in nowhere.stderr


# ---------------------------------------------------------------- recycling
def probe_baseline_rss(filter_path: Path, tmp: Path) -> int:
    """A fresh worker's RSS for this filter, read from status --json workers[].rss.

    Runs only the multiplexor (no milter front end: it stops in a moment, where the
    libmilter front end needs up to 5 s).
    """
    tmp = traversable_dir("defang-probe-")  # not pytest's tmp_path: the daemons drop root
    runtime = tmp / "probe-run"
    cfg = write_config(tmp / "probe.toml", {"multiplexor": {"min_workers": 1, "max_workers": 1}})
    proc = subprocess.Popen([sys.executable, "-m", "defang", "multiplexor", "--config", str(cfg),
                             "--filter", str(filter_path), "--runtime-dir", str(runtime)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        def ready() -> int | None:
            r = ctl(runtime, "--json", "status")
            if r.returncode != 0:
                return None
            ws = [w for w in json.loads(r.stdout)["workers"] if w["state"] == "idle" and w["rss"]]
            return ws[0]["rss"] if ws else None

        return wait_for("the probe worker", ready, timeout=20, every=0.1)
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)


def test_max_rss_recycles_a_leaking_worker(tmp_path):
    """A filter that leaks 4 MiB per message is retired by max_rss (baseline + 10 MiB): the
    worker PID changes after a few messages, with "exited 0 (retired)" and the reason."""
    leak = FILTERS / "pool_leak.py"
    baseline = probe_baseline_rss(leak, tmp_path)
    limit = baseline + 10 * MIB
    settings = {"multiplexor": {"min_workers": 1, "max_workers": 1, "min_spare": 0, "max_requests": 0,
                                "max_rss": limit}}  # fmt: skip
    with Stack(leak, settings=settings) as stack:
        st = stack.defang.status()
        [w] = live_workers(st)
        assert w["rss"] < limit, (w["rss"], limit)
        served_by = serving_pids(stack, [f"leak{i}" for i in range(8)])
        runs = _runs(served_by)
        figure("max_rss: baseline / limit / messages per worker", (baseline, limit, runs))
        # 10 MiB of headroom at 4 MiB a message: a worker lasts at most 3 messages (the
        # first message also grows the worker a little: parsing, imports).
        assert len(runs) >= 3 and max(runs) <= 3, (served_by, baseline, limit)
        recycled = sorted(set(served_by), key=served_by.index)[:-1]  # all but the one serving now
        wait_for("every recycled worker's exit in the log", lambda: all(
            f"(pid {pid}) exited 0 (retired)" in stack.defang.log() for pid in recycled))  # fmt: skip
        assert re.search(r"retiring after \d+ requests: RSS \d+ KiB over max_rss \d+ KiB", stack.defang.log())
        events = stack.defang.status()["events"]
        assert events.get("worker_retired", 0) >= len(recycled) and "worker_lost" not in events


def test_max_requests_changes_the_worker_every_n_messages():
    """max_requests = 3 (no jitter), one worker: the PID changes exactly every 3 messages."""
    settings = {"multiplexor": {"min_workers": 1, "max_workers": 1, "min_spare": 0, "max_requests": 3,
                                "max_requests_jitter": 0}}  # fmt: skip
    with Stack(CONTROL, settings=settings) as stack:
        served_by = serving_pids(stack, [f"req{i}" for i in range(9)])
        figure("max_requests 3: messages per worker pid", _runs(served_by))
        assert _runs(served_by) == [3, 3, 3], served_by
        assert len(set(served_by)) == 3
        stack.defang.wait_log("retiring after 3 requests: max_requests 3")
        wait_for("two retirements in the log", lambda: stack.defang.log().count("exited 0 (retired)") >= 2)


def serving_pids(stack: Stack, tags: list[str]) -> list[int]:
    """Send one message per tag, one after another (each must get 250), and return the
    PID of the worker that filtered each, read from its X-Worker-Pid at the sink."""
    mids = []
    for tag in tags:
        data, mid = message(tag)
        assert stack.send(data).data[0] == 250
        mids.append(mid)
    return [int(header(wait_for(mid, lambda m=mid: delivered(stack, m))[0].raw, "X-Worker-Pid"))
            for mid in mids]  # fmt: skip


def _runs(seq: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive values: [7,7,7,9,9] -> [3, 2]."""
    out: list[int] = []
    for i, v in enumerate(seq):
        if i and v == seq[i - 1]:
            out[-1] += 1
        else:
            out.append(1)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- reload under load
def test_five_reloads_under_continuous_mail_and_a_broken_one(tmp_path):
    """Two client threads send without pause while the filter is reloaded five times:
    every reply is 250 (no 4xx from the swap), generation goes 1 -> 6, and a reload of a
    filter with a syntax error exits 1 with file:line while mail keeps flowing."""
    filt = tmp_path / "filter.py"
    shutil.copy(CONTROL, filt)
    settings = {"multiplexor": {"min_workers": 2, "max_workers": 4, "min_spare": 1}}
    with Stack(filt, settings=settings) as stack:
        d = stack.defang
        stop = threading.Event()
        replies: list[tuple[int, str]] = []
        mids: list[str] = []
        lock = threading.Lock()

        def sender(n: int) -> None:
            i = 0
            while not stop.is_set():
                data, mid = message(f"reload{n}.{i}")
                r = stack.send(data)
                with lock:
                    replies.append(r.data)
                    mids.append(mid)
                i += 1

        threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for("mail flowing", lambda: len(replies) >= 10)
            seen_pids: set[int] = set()
            for gen in range(2, 7):
                seen_pids |= {w["pid"] for w in d.status()["workers"] if w["pid"]}
                filt.write_text(CONTROL.read_text() + f"\n# generation {gen}\n")
                r = d.ctl("reload")
                assert r.returncode == 0, r.stdout + r.stderr
                assert f"generation {gen}" in r.stdout
                n = len(replies)
                wait_for("mail after the reload", lambda n=n: len(replies) >= n + 5)
            filt.write_text("def filter_end(msg):\n    msg.add_header('X', 'y'\n")
            broken = d.ctl("reload")
            assert broken.returncode == 1, broken.stdout
            assert f"{filt}:2" in broken.stdout and "SyntaxError" in broken.stdout, broken.stdout
            n = len(replies)
            wait_for("mail after the broken reload", lambda: len(replies) >= n + 10)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        bad = [r for r in replies if r[0] != 250]
        figure("reloads under load: replies / not 250", (len(replies), len(bad)))
        assert not bad, f"{len(bad)} of {len(replies)} replies were not 250: {bad[:5]}"
        st = d.status()
        assert st["generation"] == 6
        assert "SyntaxError" in (st["last_load_error"] or "")
        assert all(w["gen"] == 6 for w in live_workers(st))
        faults_seen = {k: v for k, v in st["events"].items() if k != "worker_retired"}
        assert faults_seen == {}, st["events"]  # old generations left by retiring, nothing else
        # Every old worker's exit was reaped by its zygote and reported, none left a zombie.
        old = seen_pids - {w["pid"] for w in st["workers"]}
        assert len(old) >= 5 * 2, old
        wait_for("every old worker's exit reported", lambda: all(
            f"(pid {pid}) exited 0 (retired)" in d.log() for pid in old))  # fmt: skip
        assert not [pid for pid in old if zombie(pid)]
        assert d.status()["events"]["worker_retired"] >= len(old)
        assert len(d.pids("defang-zygote")) == 1  # the old zygotes left ...
        assert not [p for p in _descendants(d.proc.pid) if zombie(p)]  # ... and were reaped
        stack.postfix.wait_queue_empty()
        wait_for("every message at the sink", lambda: stack.sink.count() >= len(mids), timeout=30)
        assert stack.sink.count() == len(mids)


# ---------------------------------------------------------------- pool sizing
def test_pool_grows_on_demand_keeps_a_spare_and_shrinks_when_idle(tmp_path):
    """min_workers 2 at start; two held messages -> 2 busy + 1 spare (min_spare 1); six
    held messages -> 5 workers (max_workers), one request queued; released and idle past
    idle_timeout (2 s) -> retired one by one back to min_workers."""
    cfg = {"min_workers": 2, "max_workers": 5, "min_spare": 1, "idle_timeout": 2, "queue_size": 20}
    hold_dir = shared_dir("defang-pool-")
    hold = hold_dir / "hold"
    seen: list = []

    def shape(d: Defang, busy: int, idle: int, depth: int = 0) -> Callable[[], dict | None]:
        """A predicate: exactly ``busy`` busy and ``idle`` idle workers (nothing booting)
        and ``depth`` queued requests; every distinct shape on the way is kept in seen."""

        def check() -> dict | None:
            st = d.status()
            states = [w["state"] for w in st["workers"]]
            now = (states.count("busy"), states.count("idle"), st["queue"]["depth"])
            if not seen or seen[-1] != (now, states):
                seen.append((now, states))
            return st if now == (busy, idle, depth) and len(states) == busy + idle else None

        return check

    with Stack(CONTROL, settings={"multiplexor": cfg}) as stack:
        d = stack.defang
        try:
            start = wait_for("the initial pool", pool_is(d, 2))
            assert len(live_workers(start)) == cfg["min_workers"]
            hold.touch()
            sends: list = []

            def hold_one_more() -> None:
                """Start one more held message and wait until the multiplexor has it.

                One at a time on purpose: libmilter's worker pool (Debian builds it with
                _FFR_WORKERS_POOL) can lose a wake-up when several sessions become ready
                at once, and a session that lost it waits until another session's
                callback returns -- here, until the holds are released.
                """
                n = len(sends) + 1
                sends.append(send_in_thread(stack, message(f"grow{n}", X_Hold_While=str(hold))[0]))

                def arrived() -> bool:
                    st = d.status()
                    return sum(w["state"] == "busy" for w in st["workers"]) + st["queue"]["depth"] >= n

                wait_for(f"held message {n} at the multiplexor", arrived)

            for _ in range(2):
                hold_one_more()
            wait_for("2 busy and 1 spare", shape(d, busy=2, idle=1))
            for _ in range(4):
                hold_one_more()
            try:
                st = wait_for("5 busy (max_workers) and 1 queued", shape(d, busy=5, idle=0, depth=1))
            except AssertionError:
                raise AssertionError(f"pool shapes seen: {seen}") from None
            assert len(st["workers"]) == cfg["max_workers"]
            time.sleep(0.5)  # nothing more is spawned past max_workers
            assert len(live_workers(d.status())) == cfg["max_workers"]
            hold.unlink()
            released = time.monotonic()
            for th, _ in sends:
                th.join(30)
            assert [out["result"].data[0] for _, out in sends] == [250] * 6
            time.sleep(max(0.0, released + 1.0 - time.monotonic()))
            assert len(live_workers(d.status())) == cfg["max_workers"], "retired before idle_timeout"
            wait_for("the pool back to min_workers", pool_is(d, cfg["min_workers"]), timeout=15)
            assert time.monotonic() - released >= cfg["idle_timeout"]
            figure("pool shapes (busy, idle, queued)", [shape for shape, _ in seen])
            figure("back to min_workers after release (s)", round(time.monotonic() - released, 2))
            retired = re.findall(r"idle for \d+s: retiring it", d.log())
            assert len(retired) == cfg["max_workers"] - cfg["min_workers"], retired
            time.sleep(cfg["idle_timeout"] + 1.5)  # and it stays there: min_workers is a floor
            assert len(live_workers(d.status())) == cfg["min_workers"]
        finally:
            shutil.rmtree(hold_dir, ignore_errors=True)  # release held messages before the stop


def test_filter_initialize_that_always_raises_backs_off(tmp_path):
    """Every worker fails to boot: spawn attempts back off exponentially (few "failures in
    a row" lines over 5 s, not a fork loop), status shows spawn_failures, and mail gets a
    4xx after queue_timeout instead of hanging."""
    settings = {"multiplexor": {"min_workers": 2, "max_workers": 2, "queue_timeout": 2}}
    with Stack(FILTERS / "pool_init_fails.py", settings=settings) as stack:
        d = stack.defang
        t0 = time.monotonic()
        r = stack.send(message("no-workers")[0])
        waited = time.monotonic() - t0
        assert r.data == (451, "4.3.2 defang busy, try again later"), r
        assert 2.0 <= waited < 6.0, waited
        time.sleep(max(0.0, t0 + 5.0 - time.monotonic()))
        log = d.log()
        failures = re.findall(r"failures in a row, next spawn in ([\d.]+)s", log)
        assert 1 <= len(failures) < 10, failures
        delays = [float(x) for x in failures]
        figure("failing filter_initialize: client waited / failure lines in 5 s / delays", (
            round(waited, 2), len(failures), delays))  # fmt: skip
        assert delays == sorted(delays) and delays[-1] >= 1.0, delays  # growing back-off
        assert "database at 127.0.0.1:1 is down" in log
        st = d.status()
        assert st["spawn_failures"] > 0
        assert not [w for w in st["workers"] if w["state"] in ("idle", "busy")]


# ---------------------------------------------------------------- stopping
def test_sigterm_finishes_messages_in_flight_then_exits(tmp_path):
    """SIGTERM to `defang run` with two messages in flight (hooks of 2 s and 7 s; the
    second outlasts libmilter's 5 s listener poll): both complete with 250, then every
    defang process exits and the sockets are gone."""
    with Stack(CONTROL, settings={"multiplexor": {"busy_timeout": 30}}) as stack:
        d = stack.defang
        wait_for("a full pool", pool_is(d, 2))
        sends = [send_in_thread(stack, message(f"term{s}", X_Sleep=str(s))[0]) for s in (2, 7)]
        wait_for("both messages at the workers",
                 lambda: sum(w["state"] == "busy" for w in d.status()["workers"]) == 2, timeout=10)
        procs = _descendants(d.proc.pid)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(60)
        stopped = time.monotonic() - t0
        for th, _ in sends:
            th.join(30)
        assert [out["result"].data[0] for _, out in sends] == [250, 250], [out for _, out in sends]
        figure("SIGTERM: replies / stop took (s)",
               ([out["result"].data for _, out in sends], round(stopped, 2)))  # fmt: skip
        assert rc == 0
        assert stopped < 7 + 10, stopped
        assert not [describe(p) for p in procs if pid_alive(p) or zombie(p)]
        assert not d.control_socket.exists() and not Path(d.milter_path).exists()
        # libmilter returns from main() up to 5 s after the signal: by then the 2 s message
        # may be done, the 7 s one is not -- it is the one the drain waits for.
        assert re.search(r"milter: [12] message\(s\) in progress: waiting for them", d.log())


def test_sigint_is_a_fast_stop(tmp_path):
    """SIGINT with a 20 s hook in flight, in a worker that even ignores SIGTERM: the
    client has its 4xx at once, defang exits within a few seconds (libmilter polls for
    the stop every 5 s), and nothing is left running -- the stubborn worker included."""
    with Stack(CONTROL, settings={"multiplexor": {"busy_timeout": 60}}) as stack:
        d = stack.defang
        wait_for("a full pool", pool_is(d, 2))
        th, out = send_in_thread(stack, message("int", X_Sleep="20", X_Ignore_Term="yes")[0])
        wait_for("the message at a worker", lambda: any(w["state"] == "busy" for w in d.status()["workers"]))
        procs = _descendants(d.proc.pid)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGINT)
        rc = d.proc.wait(30)
        stopped = time.monotonic() - t0
        th.join(30)
        figure("SIGINT: reply / client waited / stop took (s)", (out["result"].data, round(out["waited"], 2),
                                                                 round(stopped, 2)))  # fmt: skip
        assert rc == 0
        assert stopped < 8, stopped
        assert out["result"].data == (451, "4.3.0 Mail filter unavailable, try again later"), out
        assert out["waited"] < 3, out
        left = [describe(p) for p in procs if pid_alive(p) or zombie(p)]
        assert not left, left
