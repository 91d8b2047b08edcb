"""The multiplexor's answers to defangctl (``control.sock``): status, and reload.

A reload re-reads the config file first (``reread``, handed over by the command line with
its overrides): a file that does not load changes nothing and says why in one line.
Otherwise the pool starts a new generation with the re-read config
(``defang.core.reconfig`` says which options it applies and which need a restart); the
config takes over with the new filter, when one of its workers is ready, and the answer
lists what changed.  Mixed into ``Multiplexor``, whose loop and sockets it uses.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from defang.core import procinfo, wire
from defang.core.config import Config, ConfigError
from defang.core.configcheck import timeout_warnings
from defang.core.privileges import refuse_change
from defang.core.reconfig import reconfigure
from defang.multiplexor import events as ev
from defang.multiplexor.pool import Pool

log = logging.getLogger("defang.multiplexor")


class ControlCommands:
    pool: Pool
    reread: Callable[[], Config] | None
    started: float

    @property
    def cfg(self) -> Config:
        """The config in force: the pool's, which a reload replaces once it takes over."""
        return self.pool.cfg

    def _feed(self, event: ev.Event) -> None: ...
    def _send_client(self, client: Any, frame: bytes) -> None: ...

    def _on_control(self, client: Any, body: bytes) -> None:
        try:
            request = wire.decode(body, wire.TO_CONTROL)
        except wire.ProtocolError as exc:
            self._send_client(client, wire.encode(wire.ControlResult(False, error=str(exc))))
            return
        if request.command == "status":
            self._send_client(client, wire.encode(self.status()))
            return
        refused = refuse_change(client.peer, self.cfg.control_group)
        if refused:
            log.warning("multiplexor: reload refused: %s", refused)
            answer = wire.ControlResult(False, error=f"reload refused: {refused}")
            self._send_client(client, wire.encode(answer))
            return
        self._reload(client)

    def _reload(self, waiter: Any) -> None:
        """Re-read the config, then start the new generation with it (``waiter``: defangctl,
        or None for SIGHUP)."""
        reconfig, warnings = None, []
        if self.reread is not None:
            try:
                reconfig = reconfigure(self.cfg, self.reread())
            except (ConfigError, OSError) as exc:  # OSError: a file the daemons' user cannot read
                why = f"the config does not load, nothing changed: {exc}"
                log.error("reload refused: %s", why)
                if waiter is not None:
                    self._send_client(waiter, wire.encode(wire.ControlResult(False, error=why)))
                return
            warnings = timeout_warnings(reconfig.cfg)
            for line in warnings:
                log.warning("reload: %s", line)
        self._feed(ev.ReloadRequested(waiter, reconfig, tuple(warnings)))

    def status(self) -> wire.Status:
        pool, cfg = self.pool, self.cfg
        return wire.Status(
            pid=os.getpid(), uptime=round(time.time() - self.started, 1), generation=pool.gen,
            filter=str(cfg.filter), hooks=pool.hello().hooks,
            workers=pool.worker_status(time.monotonic(), procinfo.rss),
            queue={"depth": len(pool.queue), "size": cfg.queue_size},
            pool={"min_workers": cfg.min_workers, "max_workers": cfg.max_workers, "min_spare": cfg.min_spare},
            spawn_failures=pool.spawn_failures, last_load_error=pool.last_load_error or None,
            **pool.stats.snapshot())  # fmt: skip
