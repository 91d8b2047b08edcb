"""The worker pool's rules, as a pure state machine: events in, commands out.

No sockets, no fork, no clock.  ``Pool.handle(event, now)`` takes one event
(``defang.multiplexor.events``) and the monotonic time it happened, and returns the
commands the multiplexor's loop must carry out, in order.  The random part of
``max_requests`` (its jitter) comes from the ``rng`` given.  So every lifecycle rule is a
unit test that runs in milliseconds (tests/unit/test_pool_rules.py).

Theory of operation
-------------------
Workers come from a *generation*: a zygote that imported one version of filter.py.
``gen`` is the generation new workers come from.  A worker is ``booting`` (spawn asked
for), ``idle`` or ``busy`` (one job); once told to go it is forgotten, and only its pid
is watched (``dying``) until the zygote reports its exit.

- Dispatch only to idle workers (the last to become idle first); otherwise queue, at
  most ``queue_size`` jobs for at most ``queue_timeout``; past either, ``on_busy``.
- A job whose worker dies, hangs past ``busy_timeout`` or sends garbage is answered
  ``on_internal_error`` and never run twice; a hung worker gets TERM, then KILL after
  ``busy_grace``.
- After each reply the pool decides whether the worker goes: ``max_requests`` (plus a
  random 0..``max_requests_jitter``, drawn at spawn, so the pool does not recycle all at
  once) or its RSS past ``max_rss`` (reported with the reply).  Going means closing its
  socket; it exits by itself after ``filter_cleanup``, and is KILLed after ``STOP_GRACE``.
- The pool keeps ``min_workers`` live and ``min_spare`` idle (booting ones count as
  spare), one more per queued job, never past ``max_workers``; a worker idle past
  ``idle_timeout`` retires while more than the minimums are left.  Spawns that fail (a
  filter_initialize that raises, a worker that dies booting or never says ready within
  ``BOOT_TIMEOUT``) back off exponentially, up to 30 s: a crash loop never spins.
- A reload starts a new generation.  Its zygote loads the filter; if that fails, the
  reload is refused and nothing changes.  Otherwise its first workers boot, and the
  first that is ready *promotes* the generation: new work goes to it, the old idle
  workers leave, the old busy ones after their job.  A new worker that cannot boot
  *abandons* the reload.  An old zygote leaves once its last worker has exited (it is
  their parent and reports their exits).  A generation carries the config it was
  started with (a reload's, re-read from the file); the pool runs with it from the
  promotion on (``ConfigApplied``), so a reload that fails changes no option either.
- A graceful stop stops accepting, finishes what is in flight (at most
  ``busy_timeout + busy_grace``), then shuts down; a fast stop answers everything in
  flight ``on_internal_error`` at once.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections import deque
from dataclasses import dataclass
from typing import Any

from defang.core import exits, wire
from defang.core.config import Config, ReplySpec
from defang.multiplexor import events as ev
from defang.multiplexor.events import BOOTING, BUSY, IDLE, STOPPING, Job
from defang.multiplexor.generations import Generation, GenerationRules
from defang.multiplexor.stats import Stats
from defang.multiplexor.ticks import TickRules

log = logging.getLogger("defang.multiplexor")

BOOT_TIMEOUT = 30.0
STOP_GRACE = 5.0


@dataclass(eq=False, slots=True)
class Worker:
    wid: int
    gen: int
    spawned: float
    limit: int = 0  # requests before it retires (max_requests plus its jitter); 0: none
    pid: int = 0
    state: str = BOOTING
    job: Job | None = None
    served: int = 0
    idle_since: float = 0.0
    rss: int = 0


class Pool(GenerationRules, TickRules):
    def __init__(self, cfg: Config, stats: Stats | None = None, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.stats = stats if stats is not None else Stats()
        self.rng = rng if rng is not None else random.Random()
        self.workers: dict[int, Worker] = {}
        self.idle: list[Worker] = []  # a stack: the longest idle at the bottom
        self.queue: deque[Job] = deque()
        self.dying: dict[int, tuple[float, int]] = {}  # pid -> (KILL deadline, wid)
        # pid -> (wid, gen) of every worker forked and not yet reported exited: a
        # zygote stays until its last worker has *exited* (it reaps them, reports each)
        self.children: dict[int, tuple[int, int]] = {}
        self.generations: dict[int, Generation] = {}
        self.gen = 0  # the generation new workers come from; 0 until the first loaded
        self.next_wid = 1
        self.stopping = 0.0  # graceful-stop deadline, 0 = running
        self.done = False
        self.spawn_failures = 0
        self.next_spawn = 0.0
        self.last_load_error = ""
        self.ticks, self.next_tick = 0, 0.0  # filter_tick: sent so far, when the next is due
        self._now = 0.0
        self._out: list[ev.Command] = []

    # ------------------------------------------------------------------ the interface
    def start(self) -> list[ev.Command]:
        """The first generation's zygote (the loop waits for its report)."""
        self._out = []
        self._start_zygote()
        return self._out

    def handle(self, event: ev.Event, now: float) -> list[ev.Command]:
        self._now = now
        self._out = []
        _HANDLERS[type(event)](self, event)
        return self._out

    def next_deadline(self, now: float) -> float:
        """When the loop should send the next Tick at the latest."""
        deadline = now + 1.0
        if self.queue:
            deadline = min(deadline, self.queue[0].enqueued + self.cfg.queue_timeout)
        for w in self.workers.values():
            if w.job is not None:
                deadline = min(deadline, w.job.started + self._job_limit(w.job))
        return min(deadline, self._tick_deadline(now))

    def in_flight(self) -> int:
        return len(self.queue) + sum(1 for w in self.workers.values() if w.state == BUSY)

    def hello(self) -> wire.HelloReply:
        z = self.generations.get(self.gen)
        return wire.HelloReply(self.gen, list(z.hooks) if z and z.hooks is not None else [])

    def worker_status(self, now: float, rss_of: Any) -> list[wire.WorkerStatus]:
        out = []
        for w in sorted(self.workers.values(), key=lambda w: w.wid):
            job = w.job
            out.append(wire.WorkerStatus(
                w.wid, w.pid, w.gen, w.state, w.served, rss_of(w.pid) if w.pid else None,
                job.queue_id if job else None, job.op if job else None,
                round(now - job.started, 3) if job else None))  # fmt: skip
        return out

    # ------------------------------------------------------------------ requests
    def _request_received(self, e: ev.RequestReceived) -> None:
        job = e.job
        if self.idle:
            self._assign(self.idle.pop(), job)
        elif len(self.queue) < self.cfg.queue_size:
            self.queue.append(job)
        else:
            log.warning("multiplexor: queue full (%d): busy tempfail for %s %s",
                        len(self.queue), job.op, job.queue_id or job.conn_id)  # fmt: skip
            self._answer_error(job, self.cfg.on_busy, "busy")

    def _assign(self, w: Worker, job: Job) -> None:
        job.started = self._now
        w.state, w.job = BUSY, job
        self._out.append(ev.Send(w.wid, job))

    def _answer_error(self, job: Job, spec: ReplySpec, error: str) -> None:
        self.stats.count(error, f"{job.queue_id or 'conn ' + job.conn_id} {job.op}")
        if job.client is not None:
            self._out.append(ev.Answer(job, spec=spec, error=error))

    def _worker_free(self, w: Worker) -> None:
        """The worker can take work: the oldest queued job, else idle (or gone)."""
        while self.queue:
            job = self.queue.popleft()
            if job.client is not None:
                self._assign(w, job)
                return
        if w.gen != self.gen or self.stopping:
            self.stats.recycles["reload" if w.gen != self.gen else "stop"] += 1
            self._stop_worker(w)
            return
        w.state, w.idle_since = IDLE, self._now
        self.idle.append(w)

    def _worker_replied(self, e: ev.WorkerReplied) -> None:
        w = self.workers.get(e.wid)
        if w is None:
            return
        job = w.job
        if w.state != BUSY or job is None:
            self._worker_lost(ev.WorkerLost(w.wid, f"it sent a reply while {w.state}"))
            return
        w.job = None
        w.served += 1
        self.stats.record(job.op, e.action, self._now - job.started, e.error, e.would, e.tags,
                          waited=job.started - job.enqueued, elapsed=e.elapsed, checks=e.checks,
                          actions=e.actions, qid=job.queue_id)  # fmt: skip
        if job.client is not None:
            self._out.append(ev.Answer(job, body=e.body))
        reason, why = self._retire_reason(w, e.rss)
        if reason:
            log.info("worker %d (pid %d) retiring after %d requests: %s", w.wid, w.pid, w.served, why)
            self.stats.recycles[reason] += 1
            self._stop_worker(w)
        else:
            self._worker_free(w)

    def _retire_reason(self, w: Worker, rss: int) -> tuple[str, str]:
        """Why ``w`` leaves after its reply: (the metrics' reason, the log's words), or ("", "")."""
        if w.limit and w.served >= w.limit:
            return "max_requests", f"max_requests {w.limit}"
        if self.cfg.max_rss and rss > self.cfg.max_rss:
            return "max_rss", f"RSS {rss // 1024} KiB over max_rss {self.cfg.max_rss // 1024} KiB"
        return "", ""

    # ------------------------------------------------------------------ workers
    def _booted(self, wid: int, pid: int, said: str) -> Worker | None:
        """The worker that said ``said`` (ready, or failed to boot), now that its pid is
        known; None if it is gone, or lost for saying it while not booting."""
        w = self.workers.get(wid)
        if w is not None and w.state != BOOTING:
            self._worker_lost(ev.WorkerLost(wid, f"it said {said!r} while {w.state}"))
            return None
        if w is not None:
            w.pid = pid
            self.children[pid] = (wid, w.gen)
        return w

    def _worker_ready(self, e: ev.WorkerReady) -> None:
        w = self._booted(e.wid, e.pid, "ready")
        if w is None:
            return
        w.rss = e.rss
        self.spawn_failures = 0
        if self.cfg.max_rss and e.rss >= self.cfg.max_rss:
            log.warning("worker %d (pid %d): RSS after boot is %d KiB, at or above max_rss %d KiB: it will "
                        "retire after every message; raise max_rss", w.wid, w.pid, e.rss // 1024,
                        self.cfg.max_rss // 1024)  # fmt: skip
        if w.gen > self.gen:
            self._promote(w.gen)
        log.debug("worker %d (pid %d, gen %d) ready, RSS %d KiB", w.wid, w.pid, w.gen, w.rss // 1024)
        self._worker_free(w)
        self._reload_progress()

    def _worker_boot_failed(self, e: ev.WorkerBootFailed) -> None:
        w = self._booted(e.wid, e.pid, "boot_failed")
        if w is None:
            return
        self._forget(w)
        if w.gen > self.gen:
            self._abandon_reload(w.gen, f"a worker of the new filter failed to boot: {e.error} "
                                        "(see the traceback above)")  # fmt: skip
        else:
            self._spawn_failed(f"worker {w.wid} failed to boot: {e.error}")

    def _worker_lost(self, e: ev.WorkerLost) -> None:
        """The worker's socket is gone: whatever it held gets a tempfail, never a rerun."""
        w = self.workers.get(e.wid)
        if w is None:
            return
        if e.kill and w.pid:
            self._out.append(ev.Signal(w.pid, signal.SIGKILL))
        job = w.job
        if job is not None:
            log.error("worker %d (pid %d) lost while handling %s %s (conn %s) after %.1fs: %s; answering "
                      "tempfail", w.wid, w.pid, job.op, job.queue_id or "-", job.conn_id,
                      self._now - job.started, e.why)  # fmt: skip
            w.job = None
            self.stats.recycles["lost"] += 1
            self._answer_error(job, self.cfg.on_internal_error, "worker_lost")
        elif w.state == BOOTING and w.gen > self.gen:
            self._forget(w)
            self._abandon_reload(w.gen, f"a worker of the new filter died while booting ({e.why})")
            return
        elif w.state == BOOTING:
            self._spawn_failed(f"worker {w.wid} died while booting ({e.why})")
        else:
            log.warning("worker %d (pid %d) lost while %s: %s", w.wid, w.pid, w.state, e.why)
        self._forget(w)

    def _worker_spawned(self, e: ev.WorkerSpawned) -> None:
        self.children[e.pid] = (e.wid, e.gen)
        w = self.workers.get(e.wid)
        if w is not None:
            w.pid = e.pid

    def _worker_exited(self, e: ev.WorkerExited) -> None:
        wid, gen = self.children.pop(e.pid, (0, 0))
        self.dying.pop(e.pid, None)
        who = f"worker {wid} (pid {e.pid})"
        if os.WIFSIGNALED(e.status):
            how = f"killed by signal {signal.Signals(os.WTERMSIG(e.status)).name}"
            self.stats.count("worker_killed", who)
        else:
            code = os.WEXITSTATUS(e.status)
            how = f"exited {code} ({exits.MEANING.get(code, 'unexpected exit code')})"
            self.stats.count("worker_retired" if code == 0 else "worker_crashed", who, error=code != 0)
        log.log(logging.INFO if how.startswith("exited 0") else logging.WARNING,
                "worker %d (pid %d) %s", wid, e.pid, how)  # fmt: skip
        if gen:
            self._retire_zygotes()

    def _spawn_failed_event(self, e: ev.SpawnFailed) -> None:
        w = self.workers.get(e.wid)
        if w is not None:
            self._forget(w)
            self._spawn_failed(f"zygote (gen {w.gen}) did not take a spawn request: {e.why}")

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.wid, None)
        if w in self.idle:
            self.idle.remove(w)
        self._out.append(ev.CloseWorker(w.wid))
        self._retire_zygotes()

    def _stop_worker(self, w: Worker) -> None:
        """Ask a worker to leave: closing its socket is the request (it exits on EOF)."""
        w.state = STOPPING
        if w.pid:
            self.dying[w.pid] = (self._now + STOP_GRACE, w.wid)
        self._forget(w)

    def _spawn(self, gen: int) -> None:
        wid = self.next_wid
        self.next_wid += 1
        cfg = self.cfg
        limit = cfg.max_requests + self.rng.randint(0, cfg.max_requests_jitter) if cfg.max_requests else 0
        self.workers[wid] = Worker(wid, gen, self._now, limit)
        self._out.append(ev.Spawn(gen, wid))

    def _spawn_failed(self, why: str) -> None:
        """Back off exponentially so a filter that crashes at start cannot make us spin."""
        self.spawn_failures += 1
        delay = min(0.1 * 2 ** min(self.spawn_failures, 10), 30.0)
        self.next_spawn = self._now + delay
        log.error("%s; %d failures in a row, next spawn in %.1fs", why, self.spawn_failures, delay)

    # ------------------------------------------------------------------ time
    def _tick(self, e: ev.Tick) -> None:
        now = self._now
        if self.stopping and (not self.in_flight() or now >= self.stopping):
            self._shutdown()
            return
        self._expire_queue(now)
        self._enforce_deadlines(now)
        if not self.stopping:
            self._send_tick(now)
            self._maintain_pool(now)

    def _expire_queue(self, now: float) -> None:
        limit = self.cfg.queue_timeout
        while self.queue and now - self.queue[0].enqueued >= limit:
            job = self.queue.popleft()
            if job.client is None:
                continue
            log.warning("multiplexor: no free worker within queue_timeout %.0fs: busy tempfail for %s %s",
                        limit, job.op, job.queue_id or job.conn_id)  # fmt: skip
            self._answer_error(job, self.cfg.on_busy, "busy")

    def _enforce_deadlines(self, now: float) -> None:
        for w in list(self.workers.values()):
            job = w.job
            if w.state == BUSY and job is not None and now - job.started > (limit := self._job_limit(job)):
                log.error("worker %d (pid %d) busy %.1fs on %s %s (conn %s), past %s %.0fs: "
                          "answering tempfail, sending TERM", w.wid, w.pid, now - job.started, job.op,
                          job.queue_id or "-", job.conn_id, "tick_timeout" if job.op == "tick" else
                          "busy_timeout", limit)  # fmt: skip
                w.job = None
                self.stats.recycles["busy_timeout"] += 1
                self._answer_error(job, self.cfg.on_internal_error, "busy_timeout")
                self._out.append(ev.Signal(w.pid, signal.SIGTERM))
                self.dying[w.pid] = (now + self.cfg.busy_grace, w.wid)
                w.state = STOPPING
                self._forget(w)
            elif w.state == BOOTING and now - w.spawned > BOOT_TIMEOUT:
                self._spawn_failed(f"worker {w.wid} not ready after {BOOT_TIMEOUT:.0f}s")
                if w.pid:
                    self._out.append(ev.Signal(w.pid, signal.SIGKILL))
                self._forget(w)
        for pid, (deadline, wid) in list(self.dying.items()):
            if now >= deadline:
                log.error("worker %d (pid %d) still alive after its grace period: KILL", wid, pid)
                self._out.append(ev.Signal(pid, signal.SIGKILL))
                del self.dying[pid]

    def _maintain_pool(self, now: float) -> None:
        """Spawn what the load and the minimums call for; retire what idles too long.

        Counted over the current generation: booting workers count as spare (they will
        be idle in a moment), queued requests call for one worker each.
        """
        z = self.generations.get(self.gen)
        if z is None or z.hooks is None:
            return
        cfg = self.cfg
        live = booting = idle = 0
        for w in self.workers.values():
            if w.gen == self.gen:
                live += 1
                booting += w.state == BOOTING
                idle += w.state == IDLE
        wanted = max(cfg.min_workers - live, cfg.min_spare - idle - booting, len(self.queue) - booting)
        wanted = min(wanted, cfg.max_workers - live)
        if wanted > 0 and now >= self.next_spawn:
            for _ in range(wanted):
                self._spawn(self.gen)
            return
        if cfg.idle_timeout and live > cfg.min_workers and idle > cfg.min_spare:
            w = self.idle[0] if self.idle else None  # the longest idle, at the bottom
            if w is not None and w.gen == self.gen and now - w.idle_since > cfg.idle_timeout:
                log.info("worker %d (pid %d) idle for %.0fs: retiring it (%d live, min %d)",
                         w.wid, w.pid, now - w.idle_since, live, cfg.min_workers)  # fmt: skip
                self.stats.recycles["idle_timeout"] += 1
                self._stop_worker(w)

    # ------------------------------------------------------------------ stopping
    def _stop_requested(self, e: ev.StopRequested) -> None:
        if e.fast:
            self._shutdown()
        elif not self.stopping:
            deadline = self.cfg.busy_timeout + self.cfg.busy_grace
            log.info("multiplexor: stopping: finishing %d requests (at most %.0fs)", self.in_flight(),
                     deadline)  # fmt: skip
            self.stopping = self._now + deadline
            self._out.append(ev.CloseListeners())

    def _shutdown(self) -> None:
        if self.done:
            return
        for job in self.queue:
            self._answer_error(job, self.cfg.on_internal_error, "shutdown")
        self.queue.clear()
        for w in list(self.workers.values()):
            if w.job is not None:
                self._answer_error(w.job, self.cfg.on_internal_error, "shutdown")
                w.job = None
            if w.pid:
                self._out.append(ev.Signal(w.pid, signal.SIGTERM))
            self._forget(w)
        gens = list(self.generations)
        for z in list(self.generations.values()):
            self._close_zygote(z)
        self.done = True
        self._out.append(ev.Stopped(gens))


_HANDLERS: dict[type, Any] = {
    ev.RequestReceived: Pool._request_received,
    ev.ZygoteLoaded: Pool._zygote_loaded,
    ev.ZygoteLoadFailed: Pool._zygote_load_failed,
    ev.ZygoteLost: Pool._zygote_lost,
    ev.WorkerSpawned: Pool._worker_spawned,
    ev.SpawnFailed: Pool._spawn_failed_event,
    ev.WorkerExited: Pool._worker_exited,
    ev.WorkerReady: Pool._worker_ready,
    ev.WorkerBootFailed: Pool._worker_boot_failed,
    ev.WorkerReplied: Pool._worker_replied,
    ev.WorkerLost: Pool._worker_lost,
    ev.ReloadRequested: Pool._reload_requested,
    ev.StopRequested: Pool._stop_requested,
    ev.Tick: Pool._tick,
}
