"""The pool's lifecycle rules, one by one, on the pure state machine (no process, no socket,
a clock of our own): events in, the commands it answers checked.

The same rules through real processes are in tests/daemons/test_pool.py and
tests/postfix/test_postfix_pool.py.
"""

from __future__ import annotations

import logging
import random
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from defang.core import config
from defang.core.reconfig import reconfigure
from defang.multiplexor import events as ev
from defang.multiplexor.events import Job
from defang.multiplexor.pool import BOOT_TIMEOUT, STOP_GRACE, Pool
from defang.multiplexor.stats import Stats


class Harness:
    """A pool whose first generation has loaded, and a clock that only moves when told."""

    def __init__(self, seed: int = 1, **settings: Any) -> None:
        settings = {"min_workers": 1, "max_workers": 4, "min_spare": 0, "max_requests": 0, **settings}
        self.cfg = config.finish(config.Config(runtime_dir=Path("/nonexistent"), **settings))
        self.pool = Pool(self.cfg, Stats(), random.Random(seed))
        self.now = 1000.0
        self.pids = iter(range(5000, 6000))
        assert self.pool.start() == [ev.StartZygote(1)]
        self.send(ev.ZygoteLoaded(1, ["filter_end"]))

    def send(self, event: ev.Event) -> list[ev.Command]:
        return self.pool.handle(event, self.now)

    def tick(self, seconds: float = 0.0) -> list[ev.Command]:
        self.now += seconds
        return self.send(ev.Tick())

    def boot(self, commands: list[ev.Command], gen: int = 1) -> list[int]:
        """Every worker the commands spawn: forked, then ready.  Their wids."""
        wids = []
        for c in commands:
            if isinstance(c, ev.Spawn):
                pid = next(self.pids)
                self.send(ev.WorkerSpawned(c.gen, c.wid, pid))
                self.send(ev.WorkerReady(c.wid, pid, 10_000_000))
                wids.append(c.wid)
        return wids

    def job(self, qid: str = "Q", client: Any = "client") -> Job:
        return Job(client, b"{}", "eom", qid, "c1", self.now)

    def request(self, qid: str = "Q") -> tuple[Job, list[ev.Command]]:
        job = self.job(qid)
        return job, self.send(ev.RequestReceived(job))

    def reply(self, wid: int, action: str = "continue", rss: int = 0) -> list[ev.Command]:
        return self.send(ev.WorkerReplied(wid, b'{"op":"reply"}', action, None, rss))

    def pid(self, wid: int) -> int:
        return self.pool.workers[wid].pid


def of(kind: type, commands: list[ev.Command]) -> list[Any]:
    return [c for c in commands if isinstance(c, kind)]


def answered(commands: list[ev.Command]) -> list[tuple[str, str]]:
    """(queue id, what) for each answer: "reply" or the error tag."""
    return [(c.job.queue_id, "reply" if c.body is not None else c.error) for c in of(ev.Answer, commands)]


# --- size of the pool -----------------------------------------------------------------


def test_min_workers_then_min_spare_then_max_workers():
    h = Harness(min_workers=2, max_workers=3, min_spare=1)
    first = h.tick()
    assert [(c.gen, c.wid) for c in of(ev.Spawn, first)] == [(1, 1), (1, 2)]
    assert of(ev.Spawn, h.tick()) == []  # booting workers count: nothing more yet
    h.boot(first)
    _, cmds = h.request("Q1")
    assert of(ev.Send, cmds)[0].wid == 2  # the last to become idle goes first
    assert of(ev.Spawn, h.tick()) == []  # one idle left: min_spare 1 is kept
    h.request("Q2")
    third = h.tick()
    assert len(of(ev.Spawn, third)) == 1  # no spare left: one more, up to max_workers
    h.boot(third)
    h.request("Q3")
    assert of(ev.Spawn, h.tick()) == []  # 3 live = max_workers


def test_one_more_worker_per_queued_request_until_max_workers():
    h = Harness(min_workers=1, max_workers=3)
    h.boot(h.tick())
    for i in range(4):
        h.request(f"Q{i}")
    assert len(h.pool.queue) == 3
    assert len(of(ev.Spawn, h.tick())) == 2  # 3 queued, but max_workers 3 of which 1 live


def test_idle_workers_retire_after_idle_timeout_down_to_the_minimums():
    h = Harness(min_workers=1, max_workers=3, idle_timeout=10)
    h.boot(h.tick())
    jobs = [h.request(f"Q{i}")[0] for i in range(3)]
    wids = h.boot(h.tick())
    assert len(wids) == 2
    for wid in list(h.pool.workers):
        if h.pool.workers[wid].job is not None:
            h.reply(wid)
    assert all(j.started for j in jobs) and len(h.pool.idle) == 3
    assert of(ev.CloseWorker, h.tick(9)) == []
    first = of(ev.CloseWorker, h.tick(2))
    second = of(ev.CloseWorker, h.tick())
    assert len(first) == len(second) == 1 and first != second  # one at a time, longest idle first
    assert of(ev.CloseWorker, h.tick(100)) == []  # min_workers 1 stays
    assert len(h.pool.workers) == 1


# --- dispatch and the queue ---------------------------------------------------------------


def test_requests_wait_in_order_for_the_next_free_worker():
    h = Harness(min_workers=1, max_workers=1)
    (wid,) = h.boot(h.tick())
    h.request("Q1")
    h.request("Q2")
    h.request("Q3")
    cmds = h.reply(wid)
    assert answered(cmds) == [("Q1", "reply")]
    assert [c.job.queue_id for c in of(ev.Send, cmds)] == ["Q2"]
    assert [c.job.queue_id for c in of(ev.Send, h.reply(wid))] == ["Q3"]


def test_a_full_queue_answers_on_busy():
    h = Harness(min_workers=1, max_workers=1, queue_size=1)
    h.boot(h.tick())
    h.request("Q1")  # on the worker
    h.request("Q2")  # queued
    _, cmds = h.request("Q3")
    assert answered(cmds) == [("Q3", "busy")] and of(ev.Answer, cmds)[0].spec == h.cfg.on_busy
    assert h.pool.stats.events["busy"] == 1


def test_a_request_queued_past_queue_timeout_answers_on_busy():
    h = Harness(min_workers=1, max_workers=1, queue_timeout=30)
    h.boot(h.tick())
    h.request("Q1")
    h.request("Q2")
    gone = h.job("Q3", client=None)  # its front end connection went away: no answer due
    h.send(ev.RequestReceived(gone))
    assert h.pool.next_deadline(h.now) == pytest.approx(h.now + 1.0)
    assert answered(h.tick(29.9)) == []
    assert answered(h.tick(0.2)) == [("Q2", "busy")]
    assert not h.pool.queue


def test_next_deadline_is_the_earliest_of_queue_and_busy_deadlines():
    h = Harness(min_workers=1, max_workers=1, queue_timeout=0.5, busy_timeout=0.3)
    h.boot(h.tick())
    h.request("Q1")
    assert h.pool.next_deadline(h.now) == pytest.approx(h.now + 0.3)
    h.now += 0.1
    h.request("Q2")
    assert h.pool.next_deadline(h.now) == pytest.approx(h.now + 0.2)


# --- faults ------------------------------------------------------------------------------------


def test_a_hung_worker_is_answered_on_internal_error_termed_then_killed():
    h = Harness(busy_timeout=60, busy_grace=5)
    (wid,) = h.boot(h.tick())
    pid = h.pid(wid)
    h.request("Q1")
    assert answered(h.tick(59)) == []
    cmds = h.tick(2)
    assert answered(cmds) == [("Q1", "busy_timeout")]
    assert of(ev.Answer, cmds)[0].spec == h.cfg.on_internal_error
    assert ev.Signal(pid, signal.SIGTERM) in cmds and ev.CloseWorker(wid) in cmds
    assert ev.Signal(pid, signal.SIGKILL) not in h.tick(4)
    assert ev.Signal(pid, signal.SIGKILL) in h.tick(2)
    assert of(ev.Send, h.tick()) == []  # the job is never run again


def test_a_worker_lost_mid_job_is_a_tempfail_never_a_rerun():
    h = Harness(min_workers=2)
    wids = h.boot(h.tick())
    _, cmds = h.request("Q1")
    wid = of(ev.Send, cmds)[0].wid
    cmds = h.send(ev.WorkerLost(wid, "it closed its socket"))
    assert answered(cmds) == [("Q1", "worker_lost")] and ev.CloseWorker(wid) in cmds
    assert of(ev.Send, cmds) == []  # not handed to the other worker
    assert h.pool.stats.events["worker_lost"] == 1 and set(h.pool.workers) == set(wids) - {wid}


def test_garbage_from_a_worker_kills_it():
    h = Harness()
    (wid,) = h.boot(h.tick())
    pid = h.pid(wid)
    cmds = h.send(ev.WorkerLost(wid, "it sent garbage", kill=True))
    assert ev.Signal(pid, signal.SIGKILL) in cmds and ev.CloseWorker(wid) in cmds


def test_a_reply_from_a_worker_that_has_no_job_loses_the_worker():
    h = Harness()
    (wid,) = h.boot(h.tick())
    assert ev.CloseWorker(wid) in h.reply(wid)


def test_a_worker_that_says_ready_twice_is_lost():
    h = Harness()
    (wid,) = h.boot(h.tick())
    assert ev.CloseWorker(wid) in h.send(ev.WorkerReady(wid, h.pid(wid), 1))
    assert wid not in h.pool.workers


def test_workers_that_cannot_boot_back_off_exponentially_and_a_ready_one_resets():
    h = Harness(min_workers=1)
    delays = []
    for _ in range(4):
        (spawn,) = of(ev.Spawn, h.tick())
        h.send(ev.WorkerBootFailed(spawn.wid, next(h.pids), "filter_initialize raised"))
        delays.append(round(h.pool.next_spawn - h.now, 3))
        assert of(ev.Spawn, h.tick(delays[-1] - 0.01)) == []  # nothing before the back-off ends
        h.now += 0.01
    assert delays == [0.2, 0.4, 0.8, 1.6] and h.pool.spawn_failures == 4
    h.boot(h.tick())
    assert h.pool.spawn_failures == 0


def test_a_worker_not_ready_within_boot_timeout_is_killed_and_counts_as_a_failure():
    h = Harness()
    (spawn,) = of(ev.Spawn, h.tick())
    h.send(ev.WorkerSpawned(1, spawn.wid, 4321))
    cmds = h.tick(BOOT_TIMEOUT + 1)
    assert ev.Signal(4321, signal.SIGKILL) in cmds and ev.CloseWorker(spawn.wid) in cmds
    assert h.pool.spawn_failures == 1


def test_exits_are_counted_by_how_the_worker_ended():
    h = Harness(min_workers=3)
    wids = h.boot(h.tick())
    a, b, c = (h.pid(w) for w in wids)
    h.send(ev.WorkerExited(a, 0))  # exit 0: retired
    h.send(ev.WorkerExited(b, 4 << 8))  # exit 4: crashed
    h.send(ev.WorkerExited(c, signal.SIGKILL))  # killed
    assert dict(h.pool.stats.events) == {"worker_retired": 1, "worker_crashed": 1, "worker_killed": 1}
    # defangctl top's last errors: the crash and the kill, each naming its worker; no retirement
    assert [e.split(" ", 1)[1] for e in h.pool.stats.errors] == [
        f"worker {wids[1]} (pid {b}): worker_crashed", f"worker {wids[2]} (pid {c}): worker_killed"]


def test_a_lost_zygote_is_replaced_with_a_back_off():
    h = Harness()
    h.boot(h.tick())
    cmds = h.send(ev.ZygoteLost(1, 1))
    assert of(ev.StartZygote, cmds) == [ev.StartZygote(2)] and h.pool.spawn_failures == 1


# --- recycling ----------------------------------------------------------------------------------


def test_max_requests_retires_a_worker_after_its_own_limit(caplog):
    caplog.set_level(logging.INFO, logger="defang.multiplexor")
    h = Harness(min_workers=1, max_workers=1, max_requests=3, max_requests_jitter=0)
    (wid,) = h.boot(h.tick())
    pid = h.pid(wid)
    for i in range(3):
        h.request(f"Q{i}")
        cmds = h.reply(wid)
    assert answered(cmds) == [("Q2", "reply")] and ev.CloseWorker(wid) in cmds  # after the answer
    assert cmds.index(ev.CloseWorker(wid)) > cmds.index(of(ev.Answer, cmds)[0])
    assert "retiring after 3 requests: max_requests 3" in caplog.text
    assert dict(h.pool.stats.recycles) == {"max_requests": 1}  # the metrics' reason
    assert ev.Signal(pid, signal.SIGKILL) in h.tick(STOP_GRACE + 0.1)  # if it does not leave


def test_max_requests_jitter_spreads_the_limits():
    h = Harness(min_workers=20, max_workers=20, max_requests=100, max_requests_jitter=10)
    h.tick()
    limits = [w.limit for w in h.pool.workers.values()]
    assert all(100 <= n <= 110 for n in limits) and len(set(limits)) > 3


def test_max_rss_retires_a_worker_whose_reply_reports_more(caplog):
    caplog.set_level(logging.INFO, logger="defang.multiplexor")
    h = Harness(max_rss=50_000_000)
    (wid,) = h.boot(h.tick())
    h.request("Q1")
    assert of(ev.CloseWorker, h.reply(wid, rss=49_000_000)) == []
    h.request("Q2")
    assert ev.CloseWorker(wid) in h.reply(wid, rss=51_000_000)
    assert "retiring after 2 requests: RSS 49804 KiB over max_rss 48828 KiB" in caplog.text
    assert dict(h.pool.stats.recycles) == {"max_rss": 1}  # the metrics' reason


def test_a_worker_whose_rss_at_boot_passes_max_rss_is_warned_about(caplog):
    h = Harness(max_rss=5_000_000)
    with caplog.at_level(logging.WARNING):
        h.boot(h.tick())
    assert "at or above max_rss 4882 KiB: it will retire after every message; raise max_rss" in caplog.text


# --- reloads ---------------------------------------------------------------------------------


def test_a_reload_serves_once_a_new_worker_is_ready_then_old_workers_leave():
    h = Harness(min_workers=2, max_workers=4)
    old = h.boot(h.tick())
    old_pids = [h.pid(w) for w in old]
    _, cmds = h.request("Q1")
    busy = of(ev.Send, cmds)[0].wid
    (idle,) = set(old) - {busy}
    assert h.send(ev.ReloadRequested("ctl")) == [ev.StartZygote(2)]
    spawns = h.send(ev.ZygoteLoaded(2, ["filter_end", "filter_part"]))
    assert [c.gen for c in of(ev.Spawn, spawns)] == [2, 2]
    assert h.pool.gen == 1  # not before a new worker is ready
    h.send(ev.WorkerSpawned(2, spawns[0].wid, 7000))
    cmds = h.send(ev.WorkerReady(spawns[0].wid, 7000, 1))
    assert h.pool.gen == 2 and ev.CloseWorker(idle) in cmds
    assert ev.AnswerControl("ctl", ev.ControlResult(True, gen=2, hooks=["filter_end", "filter_part"])) in cmds
    assert ev.CloseWorker(busy) in h.reply(busy)  # the old busy one after its job
    assert h.pool.hello().gen == 2
    assert ev.CloseZygote(1) not in h.send(ev.WorkerExited(old_pids[0], 0))
    assert ev.CloseZygote(1) in h.send(ev.WorkerExited(old_pids[1], 0))  # its last worker has exited


def test_a_reload_whose_filter_does_not_load_changes_nothing():
    h = Harness(min_workers=2)
    h.boot(h.tick())
    h.send(ev.ReloadRequested("ctl"))
    cmds = h.send(ev.ZygoteLoadFailed(2, "filter.py:1: SyntaxError: invalid syntax"))
    assert cmds == [ev.AnswerControl("ctl", ev.ControlResult(False, error="filter.py:1: SyntaxError: invalid "
                                                                           "syntax")), ev.CloseZygote(2)]
    assert h.pool.gen == 1 and len(h.pool.workers) == 2 and h.pool.last_load_error.startswith("filter.py:1")


def test_a_reload_whose_worker_cannot_boot_is_abandoned():
    h = Harness(min_workers=1)
    h.boot(h.tick())
    h.send(ev.ReloadRequested("ctl"))
    (spawn,) = of(ev.Spawn, h.send(ev.ZygoteLoaded(2, ["filter_end"])))
    h.send(ev.WorkerSpawned(2, spawn.wid, 7000))
    cmds = h.send(ev.WorkerBootFailed(spawn.wid, 7000, "filter_initialize raised"))
    (answer,) = of(ev.AnswerControl, cmds)
    assert not answer.result.ok and "failed to boot" in answer.result.error
    assert h.pool.gen == 1 and ev.CloseZygote(2) not in cmds  # its worker has not exited yet
    assert ev.CloseZygote(2) in h.send(ev.WorkerExited(7000, 3 << 8))


def test_a_second_reload_supersedes_the_first_and_both_waiters_get_the_answer():
    h = Harness(min_workers=1)
    h.boot(h.tick())
    h.send(ev.ReloadRequested("first"))
    h.send(ev.ReloadRequested("second"))
    h.send(ev.ZygoteLoaded(2, ["filter_end"]))
    (spawn,) = of(ev.Spawn, h.send(ev.ZygoteLoaded(3, ["filter_end"])))
    assert spawn.gen == 3
    cmds = h.send(ev.WorkerReady(spawn.wid, 7000, 1))
    assert {c.waiter for c in of(ev.AnswerControl, cmds)} == {"first", "second"}


def test_a_reload_s_config_takes_over_with_its_generation_and_not_before():
    h = Harness(min_workers=1, max_workers=4, queue_size=200)
    h.boot(h.tick())
    fresh = replace(h.cfg, min_workers=2, max_workers=6, queue_size=50, milter_socket="unix:/elsewhere.sock")
    r = reconfigure(h.cfg, fresh)
    assert h.send(ev.ReloadRequested("ctl", r)) == [ev.StartZygote(2)]
    spawns = of(ev.Spawn, h.send(ev.ZygoteLoaded(2, ["filter_end"])))
    assert len(spawns) == 2  # the new generation starts with its own min_workers
    assert h.pool.cfg is h.cfg  # nothing applied before a new worker is ready
    cmds = h.send(ev.WorkerReady(spawns[0].wid, 7000, 1))
    assert ev.ConfigApplied(r.cfg) in cmds and h.pool.cfg is r.cfg
    assert h.pool.cfg.queue_size == 50 and h.pool.cfg.milter_socket == h.cfg.milter_socket
    (answer,) = of(ev.AnswerControl, cmds)
    assert answer.result.config == {
        "changed": ["[multiplexor] min_workers: 1 -> 2", "[multiplexor] max_workers: 4 -> 6",
                    "[multiplexor] queue_size: 200 -> 50"],
        "restart": [f"[milter] socket: {h.cfg.milter_socket} -> unix:/elsewhere.sock (needs a restart; "
                    f"still {h.cfg.milter_socket})"], "warnings": []}  # fmt: skip


def test_a_reload_whose_filter_does_not_load_keeps_the_running_config():
    h = Harness(min_workers=1, queue_size=200)
    h.boot(h.tick())
    h.send(ev.ReloadRequested("ctl", reconfigure(h.cfg, replace(h.cfg, queue_size=1))))
    cmds = h.send(ev.ZygoteLoadFailed(2, "filter.py:1: SyntaxError"))
    assert not of(ev.ConfigApplied, cmds) and h.pool.cfg is h.cfg and h.pool.cfg.queue_size == 200


# --- stopping ------------------------------------------------------------------------------------


def test_a_graceful_stop_finishes_what_is_in_flight():
    h = Harness(min_workers=1, max_workers=1)
    (wid,) = h.boot(h.tick())
    h.request("Q1")
    assert h.send(ev.StopRequested(fast=False)) == [ev.CloseListeners()]
    assert of(ev.Stopped, h.tick()) == []
    cmds = h.reply(wid)
    assert answered(cmds) == [("Q1", "reply")] and ev.CloseWorker(wid) in cmds
    assert of(ev.Stopped, h.tick()) == [ev.Stopped([1])]
    assert h.pool.done


def test_a_graceful_stop_gives_up_after_busy_timeout_and_grace():
    h = Harness(min_workers=1, max_workers=1, busy_timeout=60, busy_grace=5)
    h.boot(h.tick())
    h.request("Q1")
    h.send(ev.StopRequested(fast=False))
    cmds = h.tick(66)
    assert answered(cmds) == [("Q1", "shutdown")] and of(ev.Stopped, cmds)


def test_a_fast_stop_answers_everything_in_flight_at_once():
    h = Harness(min_workers=1, max_workers=1)
    (wid,) = h.boot(h.tick())
    h.request("Q1")
    h.request("Q2")
    cmds = h.send(ev.StopRequested(fast=True))
    assert sorted(answered(cmds)) == [("Q1", "shutdown"), ("Q2", "shutdown")]
    assert ev.Signal(5000, signal.SIGTERM) in cmds and ev.CloseWorker(wid) in cmds
    assert ev.CloseZygote(1) in cmds and cmds[-1] == ev.Stopped([1])
