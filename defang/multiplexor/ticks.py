"""Periodic jobs: ``filter_tick(n)`` every ``[filter] tick_interval`` seconds, on one worker.

MIMEDefang's tick, for jobs such as reading an allow list or a threshold file again
without a reload.  The rules, each there so that a tick never costs mail:

- only a filter that defines ``filter_tick`` gets ticks, and only while the pool is not
  stopping;
- a tick goes to an idle worker of the serving generation, and only when no request is
  queued; with none free the tick is skipped (a DEBUG line) and the next comes an
  interval later: ticks never queue, never pile up;
- a tick is bounded by ``[filter] tick_timeout`` (not ``busy_timeout``): past it the
  worker is killed as a hung one is (TERM, then KILL after ``busy_grace``), logged, and
  replaced by the pool's usual rules; a tick that raises is a filter error, logged with
  its traceback by the worker, and counted;
- ``n`` counts the ticks sent since the multiplexor started (1, 2, ...), so a filter can
  do a slow job every tenth tick.

Mixed into ``Pool``, whose state it shares; as pure as the pool (no I/O, the clock given).
"""

from __future__ import annotations

import logging
from typing import Any

from defang.core import wire
from defang.core.config import Config
from defang.multiplexor import events as ev

log = logging.getLogger("defang.multiplexor")

TICK_OP = wire.Tick.OP


class TickRules:
    cfg: Config
    gen: int
    generations: dict[int, Any]
    idle: list[Any]
    queue: Any
    stopping: float
    ticks: int
    next_tick: float

    def _assign(self, w: Any, job: ev.Job) -> None: ...

    def _ticking(self) -> bool:
        z = self.generations.get(self.gen)
        hooks = z.hooks if z is not None else None
        return bool(self.cfg.tick_interval) and hooks is not None and "filter_tick" in hooks

    def _tick_deadline(self, now: float) -> float:
        """When the next tick is due (far off when there are none)."""
        if not self._ticking() or self.stopping:
            return now + 3600.0
        if not self.next_tick:
            self.next_tick = now + self.cfg.tick_interval
        return self.next_tick

    def _job_limit(self, job: ev.Job) -> float:
        """How long a worker may hold ``job``: ``tick_timeout`` for a tick, else ``busy_timeout``."""
        return self.cfg.tick_timeout if job.op == TICK_OP else self.cfg.busy_timeout

    def _send_tick(self, now: float) -> None:
        if now < self._tick_deadline(now) or self.stopping:
            return
        self.next_tick = now + self.cfg.tick_interval
        if self.queue or not self.idle or self.idle[-1].gen != self.gen:
            log.debug("tick skipped: no idle worker (%d queued)", len(self.queue))
            return
        self.ticks += 1
        job = ev.Job(None, wire.encode_body(wire.Tick(self.ticks)), TICK_OP, "", f"tick {self.ticks}", now)
        self._assign(self.idle.pop(), job)
