"""The pool's rules for filter generations: load, promote, abandon, retire (see the
theory of operation in ``defang.multiplexor.pool``, which mixes these in).

A generation is one version of filter.py, loaded by its own zygote.  A reload starts a
new one; it serves only once one of its workers booted (filter_initialize ran), and an
old generation's zygote leaves only once its last worker has exited.  Like the rest of
the pool: state and commands, no I/O.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from defang.core import wire
from defang.core.config import Config
from defang.core.reconfig import Reconfig
from defang.multiplexor import events as ev
from defang.multiplexor.events import BOOTING

log = logging.getLogger("defang.multiplexor")


@dataclass(eq=False)
class Generation:
    gen: int
    cfg: Config  # the config it runs with: the pool's once it serves
    hooks: list[str] | None = None  # None until its zygote loaded the filter
    reconfig: Reconfig | None = None  # a reload's re-read config: what it changes, what it cannot
    warnings: tuple[str, ...] = ()
    waiters: list[Any] = field(default_factory=list)  # control clients awaiting the reload
    abandoned: bool = False  # a reload that failed: closed once its workers have exited


class GenerationRules:
    """Mixed into ``Pool``, whose state it shares."""

    cfg: Config
    gen: int
    generations: dict[int, Generation]
    workers: dict[int, Any]
    idle: list[Any]
    children: dict[int, tuple[int, int]]
    stopping: float
    next_spawn: float
    last_load_error: str
    stats: Any  # defang.multiplexor.stats.Stats
    _out: list[ev.Command]

    def _spawn(self, gen: int) -> None: ...
    def _forget(self, w: Any) -> None: ...
    def _stop_worker(self, w: Any) -> None: ...
    def _spawn_failed(self, why: str) -> None: ...

    def _start_zygote(self, reconfig: Reconfig | None = None, warnings: tuple[str, ...] = ()) -> int:
        gen = max(self.generations, default=self.gen) + 1
        cfg = reconfig.cfg if reconfig is not None else self.cfg
        self.generations[gen] = Generation(gen, cfg, reconfig=reconfig, warnings=warnings)
        self._out.append(ev.StartZygote(gen, cfg))
        return gen

    def _close_zygote(self, z: Generation) -> None:
        self.generations.pop(z.gen, None)
        self._out.append(ev.CloseZygote(z.gen))

    def _zygote_loaded(self, e: ev.ZygoteLoaded) -> None:
        z = self.generations.get(e.gen)
        if z is None:
            return
        z.hooks = list(e.hooks)
        hooks = ", ".join(z.hooks) or "none"
        if self.gen == 0:  # the first: nothing served before it
            self.gen = e.gen
            log.info("filter %s loaded (gen %d), hooks: %s", self.cfg.filter, e.gen, hooks)
            return
        # It takes over only once one of its workers has booted (filter_initialize
        # ran): until then the old pool serves as before.
        log.info("reload: filter %s loaded (gen %d), hooks: %s; starting its workers", z.cfg.filter,
                 e.gen, hooks)  # fmt: skip
        for _ in range(max(1, min(z.cfg.min_workers, z.cfg.max_workers))):
            self._spawn(e.gen)

    def _zygote_load_failed(self, e: ev.ZygoteLoadFailed) -> None:
        z = self.generations.get(e.gen)
        if z is None:
            return
        self.last_load_error = e.error
        self.stats.reloads["failed"] += 1
        log.error("reload failed, the running filter and config stay in place: %s", e.error)
        self._answer_waiters(z, wire.ControlResult(False, error=e.error))
        self._close_zygote(z)

    def _zygote_lost(self, e: ev.ZygoteLost) -> None:
        if self.generations.pop(e.gen, None) is None:
            return
        for pid in [p for p, (_, g) in self.children.items() if g == e.gen]:
            del self.children[pid]  # nobody left to report those exits
        if e.gen == self.gen and not self.stopping:
            log.error("zygote of gen %d exited unexpectedly (%s); starting a new one", e.gen, e.status)
            self._spawn_failed("zygote lost")
            self._start_zygote()

    def _reload_requested(self, e: ev.ReloadRequested) -> None:
        gen = self._start_zygote(e.reconfig, e.warnings)
        if e.waiter is not None:
            self.generations[gen].waiters.append(e.waiter)

    def _answer_waiters(self, z: Generation, result: wire.ControlResult) -> None:
        for waiter in z.waiters:
            self._out.append(ev.AnswerControl(waiter, result))
        z.waiters.clear()

    def _promote(self, gen: int) -> None:
        """A worker of the new generation booted: new workers come from it from now on."""
        old, self.gen = self.gen, gen
        log.info("reload: generation %d serving; generation %d workers retire as they finish", gen, old)
        self.stats.reloads["ok"] += 1
        self.next_spawn = 0.0
        z = self.generations[gen]
        if z.cfg is not self.cfg:
            self.cfg = z.cfg
            self._out.append(ev.ConfigApplied(z.cfg))
        if z.reconfig is not None:
            for line in z.reconfig.changed:
                log.info("reload: applied %s", line)
            for line in z.reconfig.restart:
                log.warning("reload: not applied: %s", line)
        for older in [g for g in self.generations if old <= g < gen]:
            z = self.generations[older]  # a reload superseded by a newer one
            self.generations[gen].waiters.extend(z.waiters)
            z.waiters.clear()

    def _abandon_reload(self, gen: int, why: str) -> None:
        self.last_load_error = why
        self.stats.reloads["failed"] += 1
        log.error("reload abandoned, the running filter stays in place: %s", why)
        z = self.generations.get(gen)
        if z is not None:
            z.abandoned = True  # closed by _retire_zygotes once its workers have exited
            self._answer_waiters(z, wire.ControlResult(False, error=why))
        for w in [w for w in self.workers.values() if w.gen == gen]:
            if w.pid:
                self._out.append(ev.Signal(w.pid, signal.SIGTERM))
            self._forget(w)
        self._retire_zygotes()

    def _reload_progress(self) -> None:
        """Retire old workers once the new generation is in; answer reload waiters."""
        z = self.generations.get(self.gen)
        if z is None or not any(w.gen == self.gen and w.state != BOOTING for w in self.workers.values()):
            return
        for w in [w for w in self.idle if w.gen < self.gen]:
            self._stop_worker(w)
        done = wire.ControlResult(True, gen=self.gen, hooks=z.hooks)
        if z.reconfig is not None:
            done.config = {"changed": list(z.reconfig.changed), "restart": list(z.reconfig.restart),
                           "warnings": list(z.warnings)}  # fmt: skip
        self._answer_waiters(z, done)

    def _retire_zygotes(self) -> None:
        """An old (or abandoned) generation's zygote leaves once its last worker has exited.

        Not merely once we stopped talking to the workers: the zygote is their parent; it
        reaps them and reports each exit ("exited 0 (retired)", the counters).  Closed any
        earlier, it would exit first, the exits would go unreported and the workers would
        be orphans (zombies where PID 1 does not reap).
        """
        for gen, z in list(self.generations.items()):
            done = z.abandoned or (gen < self.gen and z.hooks is not None)
            if (done and not any(w.gen == gen for w in self.workers.values())
                    and all(g != gen for _, g in self.children.values())):  # fmt: skip
                self._close_zygote(z)
