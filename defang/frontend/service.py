"""What every SMTP session of the front end shares: the config, the multiplexor client, the
hooks of the running filter, the spool, and the count of transactions in progress.

Sessions run on libmilter's threads, so everything here that changes is locked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from defang.core import hooks, logsetup, wire
from defang.core.config import Config, ConfigError
from defang.core.reconfig import reconfigure
from defang.frontend.mxclient import MultiplexorClient, MultiplexorError
from defang.frontend.spool import SpoolDir

log = logging.getLogger("defang.milter")

HOOKS_MAX_AGE = 5.0  # seconds before the hook list is asked for again


class HookCache:
    """Which hooks the running filter defines, refreshed from the multiplexor.

    Asked again when a reply comes from a newer filter generation (a reload) or when
    the answer is older than HOOKS_MAX_AGE.  Unknown (multiplexor down): every hook is
    assumed, so every stage asks for a decision and gets a tempfail, never an accept.
    ``on_new_generation`` is called when the generation changes after the first (a
    reload, or a restarted multiplexor): the config was re-read.
    """

    ALL = frozenset(hooks.NAMES)

    def __init__(self, client: MultiplexorClient,
                 on_new_generation: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.client = client
        self.on_new_generation = on_new_generation
        self.gen = -1
        self.hooks: frozenset[str] = self.ALL
        self.fetched = 0.0
        self.lock = threading.Lock()
        self.logged: tuple[int, int, int] | None = None

    def current(self) -> frozenset[str]:
        if time.monotonic() - self.fetched > HOOKS_MAX_AGE:
            self.refresh()
        return self.hooks

    def seen_gen(self, gen: int) -> None:
        if gen > self.gen:
            self.refresh()

    def refresh(self) -> None:
        with self.lock:
            try:
                reply = self.client.hello()
            except MultiplexorError as exc:
                if self.gen != -1 or self.fetched == 0.0:
                    log.error("multiplexor unreachable (%s): every message gets a tempfail", exc)
                self.gen, self.hooks = -1, self.ALL
                self.fetched = time.monotonic()
                return
            gen, names = reply.gen, frozenset(reply.hooks)
            changed = gen != self.gen
            if changed:
                log.info("filter generation %s: hooks %s", gen, ", ".join(sorted(names)) or "none")
            first = self.fetched == 0.0
            self.gen, self.hooks, self.fetched = gen, names, time.monotonic()
            if changed and not first and self.on_new_generation is not None:
                self.on_new_generation(gen)


class FrontEnd:
    """Shared by all sessions: config, the multiplexor client, the hooks, the spool."""

    def __init__(self, cfg: Config, client: MultiplexorClient,
                 reread: Callable[[], Config] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.client = client
        self.reread = reread
        self.hooks = HookCache(client, self.reconfigure if reread is not None else None)
        self.spool = SpoolDir(cfg.spool_dir)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self.pid = os.getpid()
        # Over TCP the DATA stage is answered (see Session.data), never skipped.
        self.inet = cfg.milter_socket.startswith(("inet:", "inet6:"))

    def next_id(self) -> str:
        with self._seq_lock:
            self._seq += 1
            return f"{self.pid:x}.{self._seq}"

    def reconfigure(self, gen: int) -> None:
        """A new filter generation: the multiplexor re-read the config; read it too and take
        the options the front end uses (message limits, replies, macros, the request
        timeout, the log level).  Those fixed at the start (the milter socket, the spool)
        stay; the multiplexor's answer to the reload names them."""
        try:
            fresh = self.reread()  # type: ignore[misc]
        except (ConfigError, OSError) as exc:
            log.error("milter: generation %d: the config does not load, keeping the running one: %s", gen,
                      exc)  # fmt: skip
            return
        r = reconfigure(self.cfg, fresh)
        self.cfg = r.cfg  # one assignment: each callback reads fe.cfg once per use
        self.client.set_timeout(r.cfg.effective_request_timeout())
        logsetup.set_level(r.cfg.log_level)
        log.info("milter: generation %d: config re-read, %d option(s) changed", gen, len(r.changed))

    def decide(self, request: wire.DecisionRequest, what: str) -> wire.Reply:
        """One decision from the multiplexor, or the internal-error reply and a log line."""
        try:
            reply = self.client.decide(request)
        except MultiplexorError as exc:
            spec = self.cfg.on_internal_error
            log.error("%s: no decision from the multiplexor (%s): answering %s %s", what, exc, spec.code,
                      spec.dsn)  # fmt: skip
            return wire.error_reply(spec.code, spec.dsn, spec.text, "multiplexor")
        self.hooks.seen_gen(reply.gen)
        return reply

    def drain(self, timeout: float) -> int:
        """After libmilter stopped listening: wait for the messages still in progress.

        libmilter's ``smfi_main`` returns at most 5 s after SIGTERM (its listener polls
        for the stop flag every 5 s) without waiting for its connection threads, and the
        process would then exit under them: a message whose decision took longer got
        "451 4.7.1" from Postfix instead of its verdict.  The connection threads keep
        working after ``main()`` returns (each has its own thread state; only new
        connections would need pymilter's interpreter pointer, and there are none: the
        listening socket is closed), so we just wait, at most ``timeout`` seconds.
        Returns how many were still in progress when we gave up.
        """
        if self.spool.transactions:
            log.info("milter: %d message(s) in progress: waiting for them (at most %.0fs)",
                     self.spool.transactions, timeout)  # fmt: skip
        deadline = time.monotonic() + timeout
        while self.spool.transactions > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        left = max(self.spool.transactions, 0)
        if left:
            log.warning("milter: %d message(s) still in progress after %.0fs: stopping anyway "
                        "(the MTA answers them with its milter_default_action)", left, timeout)  # fmt: skip
        return left
