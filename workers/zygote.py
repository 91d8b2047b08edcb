"""The zygote: imports filter.py once and forks workers on request.

Why a separate process: admin code must never run inside the multiplexor (a bad
filter.py must not take the pool down), yet workers should be forked from a parent that
already imported the filter and the heavy modules, so they share those pages and start
in milliseconds.  A reload starts a new zygote; the old one leaves with its workers.
The multiplexor forks the zygote (``main`` runs in the child), so the interpreter and
the modules both have imported are pages shared by every defang process: measured with
the benchmark's header filter at 140 KB, summed PSS 90 -> 82 MB against a zygote
started as a new interpreter.

The channel to the multiplexor is a SOCK_SEQPACKET socketpair: one message per packet
(``defang.core.wire``: ``Spawn`` in, ``ZygoteReady``, ``LoadFailed``, ``Spawned``,
``Exited`` out), so there is no framing to get wrong, and a spawn request carries the
worker's end of a fresh socketpair as SCM_RIGHTS ancillary data.  EOF means: exit --
after the workers it forked have exited (``EXIT_GRACE``, then KILL): a worker must
never outlive defang, nor be left to a PID 1 that may not reap it.

``main`` is the zygote's entry point; the command-line wiring hands it to the
multiplexor, which forks and calls it (the multiplexor imports no worker code).
"""

from __future__ import annotations

import email.generator  # noqa: F401  (imported so workers share the pages)
import email.parser  # noqa: F401
import email.policy  # noqa: F401
import gc
import logging
import os
import random
import select
import signal
import socket
import sys
import time

from defang.core import config as configmod
from defang.core import exits, logsetup, malloc, wire
from defang.core.proctitle import set_title
from defang.workers import process
from defang.workers.loader import FilterLoadError, load_filter
from defang.workers.runner import FilterRunner
from defang.workers.warmup import warm_up

log = logging.getLogger("defang.zygote")

PACKET = 65536
# On EOF: how long the workers get to finish before they are KILLed.  Below the
# multiplexor's STOP_GRACE, which is how long it waits for a zygote at shutdown.
EXIT_GRACE = 3.0


def send(sock: socket.socket, msg: wire.Message) -> None:
    sock.send(wire.encode_body(msg))


def receive(sock: socket.socket) -> tuple[wire.Spawn | None, list[int]]:
    """One spawn request and its fd; (None, []) at EOF; ``ProtocolError`` for anything else.

    A reset is an EOF too: when the multiplexor closes its end while one of our
    reports is still unread, the kernel reports ECONNRESET instead of a clean EOF.
    """
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, PACKET, 4)
    except ConnectionResetError:
        return None, []
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        msg = wire.decode(data, wire.TO_ZYGOTE)
        if len(fds) != 1:
            raise wire.ProtocolError(f"spawn with {len(fds)} descriptors")
    except wire.ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    return msg, fds


def main(cfg: configmod.Config, fd: int, generation: int) -> int:
    """Run in the child the multiplexor forked: ``cfg`` is the config of this generation
    (a reload's, as re-read), ``fd`` our end of the channel."""
    logsetup.set_level(cfg.log_level)  # the destination: the multiplexor's, inherited
    # Ctrl-C in a terminal reaches the whole process group; the multiplexor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_title(f"defang-zygote (gen {generation})")
    chan = socket.socket(fileno=fd)
    try:
        loaded = load_filter(str(cfg.filter))
    except FilterLoadError as exc:
        send(chan, wire.LoadFailed(str(exc)))
        return 2
    for line in loaded.warnings:
        log.warning("%s", line)
    runner = FilterRunner.from_config(loaded, cfg)
    try:
        runner.prepare()
    except FilterLoadError as exc:
        send(chan, wire.LoadFailed(str(exc)))
        return 2
    warm_up()
    # Everything imported so far is shared with the workers copy-on-write.  A garbage
    # collection in a worker would write to every one of those objects (GC headers) and
    # unshare the pages; freezing moves them out of the collector's reach.
    gc.collect()
    gc.freeze()
    malloc.fix_mmap_threshold()
    send(chan, wire.ZygoteReady(os.getpid(), sorted(runner.hooks)))
    return _loop(chan, runner, cfg, generation)


def _loop(chan: socket.socket, runner: FilterRunner, cfg, generation: int) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([chan, wake_r], [], [], 5.0)
        if wake_r in ready:
            signals = os.read(wake_r, 512)
            if signal.SIGTERM in signals:
                _end_children(children)
                return 0
        _reap(chan, children)
        if chan not in ready:
            continue
        try:
            msg, fds = receive(chan)
        except wire.ProtocolError as exc:
            log.error("zygote: unexpected message from the multiplexor: %s", exc)
            continue
        if msg is None:
            # The multiplexor is done with us (or gone).  Idle workers see EOF on their
            # own sockets and leave; at shutdown it has TERMed the busy ones.
            _end_children(children)
            return 0
        wid = msg.wid
        pid = os.fork()
        if pid == 0:
            os._exit(_child(fds[0], chan, (wake_r, wake_w), runner, cfg, wid, generation))
        children.add(pid)
        os.close(fds[0])
        try:
            send(chan, wire.Spawned(wid, pid))
        except OSError:
            _end_children(children)
            return 0


def _reap(chan: socket.socket | None, children: set[int]) -> None:
    """Reap every exited worker and tell the multiplexor (when there is one to tell)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        if chan is None:
            continue
        try:
            send(chan, wire.Exited(pid, status))
        except OSError:
            chan = None  # the multiplexor is gone; keep reaping all the same


def _end_children(children: set[int]) -> None:
    """Wait up to EXIT_GRACE for our workers to exit, KILL the rest, reap them all."""
    deadline = time.monotonic() + EXIT_GRACE
    while children and time.monotonic() < deadline:
        _reap(None, children)
        time.sleep(0.02)
    for pid in list(children):
        log.warning("zygote: worker pid %d still running %.0fs after the end: KILL", pid, EXIT_GRACE)
        for kill in (os.killpg, os.kill):  # each worker leads its own process group
            try:
                kill(pid, signal.SIGKILL)
                break
            except (ProcessLookupError, PermissionError):
                continue
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        children.discard(pid)


def _child(fd: int, chan: socket.socket, pipe: tuple[int, int], runner, cfg, wid, gen) -> int:
    """In the forked worker: drop the zygote's state, then serve."""
    code = exits.CRASHED
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        chan.close()
        for p in pipe:
            os.close(p)
        os.setpgid(0, 0)  # its own group: a hard kill takes the filter's children too
        random.seed()  # not the zygote's sequence: each worker draws its own
        sock = socket.socket(fileno=fd)
        code = process.serve(sock, runner, worker_id=wid, generation=gen, report_rss=cfg.max_rss > 0,
                             max_frame_size=cfg.max_frame_size)  # fmt: skip
    except BaseException:
        log.exception("worker %d (pid %d) crashed", wid, os.getpid())
    finally:
        logging.shutdown()
        sys.stdout.flush()
    return code

