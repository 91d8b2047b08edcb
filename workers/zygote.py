"""The zygote: imports filter.py once and forks workers on request.

Why a separate process: admin code must never run inside the multiplexor (a bad
filter.py must not take the pool down), yet workers should be forked from a parent that
already imported the filter and the heavy modules, so they share those pages and start
in milliseconds.  A reload starts a new zygote; the old one leaves with its workers.

The channel to the multiplexor is a SOCK_SEQPACKET socketpair: one JSON object per
packet, so there is no framing to get wrong, and a spawn request carries the worker's
end of a fresh socketpair as SCM_RIGHTS ancillary data.

zygote -> multiplexor: ``ready`` {hooks, pid} | ``load_failed`` {error} |
``spawned`` {wid, pid} | ``exited`` {pid, status}.
multiplexor -> zygote: ``spawn`` {wid} + one fd.  EOF means: exit.
"""

from __future__ import annotations

import argparse
import email.generator  # noqa: F401  (imported so workers share the pages)
import email.parser  # noqa: F401
import email.policy  # noqa: F401
import gc
import json
import logging
import os
import select
import signal
import socket
import sys

from defang import config as configmod
from defang import logsetup
from defang.proctitle import set_title
from workers import process
from workers.loader import FilterLoadError, load_filter
from workers.runner import FilterRunner

log = logging.getLogger("defang.zygote")

PACKET = 65536


def send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """One packet and its fds; (None, []) at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, PACKET, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="defang-zygote")
    ap.add_argument("--config")
    ap.add_argument("--filter")
    ap.add_argument("--runtime-dir")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--generation", type=int, default=1)
    args = ap.parse_args(argv)
    cfg = configmod.load(args.config, filter_path=args.filter, runtime_dir=args.runtime_dir)
    logsetup.setup(cfg.log_level)
    # Ctrl-C in a terminal reaches the whole process group; the multiplexor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_title(f"defang-zygote (gen {args.generation})")
    chan = socket.socket(fileno=args.fd)
    try:
        loaded = load_filter(str(cfg.filter))
    except FilterLoadError as exc:
        send(chan, {"op": "load_failed", "error": str(exc)})
        return 2
    runner = FilterRunner.from_config(loaded, cfg)
    # Everything imported so far is shared with the workers copy-on-write.  A garbage
    # collection in a worker would write to every one of those objects (GC headers) and
    # unshare the pages; freezing moves them out of the collector's reach.
    gc.collect()
    gc.freeze()
    send(chan, {"op": "ready", "pid": os.getpid(), "hooks": sorted(runner.hooks)})
    return _loop(chan, runner, cfg, args.generation)


def _loop(chan: socket.socket, runner: FilterRunner, cfg, generation: int) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)
    while True:
        ready, _, _ = select.select([chan, wake_r], [], [], 5.0)
        if wake_r in ready:
            signals = os.read(wake_r, 512)
            if signal.SIGTERM in signals:
                return 0
        _reap(chan)
        if chan not in ready:
            continue
        msg, fds = receive(chan)
        if msg is None:
            return 0  # multiplexor gone: workers notice EOF on their own sockets
        if msg.get("op") != "spawn" or len(fds) != 1:
            log.error("zygote: unexpected message %r", msg)
            for fd in fds:
                os.close(fd)
            continue
        wid = int(msg["wid"])
        pid = os.fork()
        if pid == 0:
            os._exit(_child(fds[0], chan, (wake_r, wake_w), runner, cfg, wid, generation))
        os.close(fds[0])
        try:
            send(chan, {"op": "spawned", "wid": wid, "pid": pid})
        except OSError:
            return 0


def _reap(chan: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            send(chan, {"op": "exited", "pid": pid, "status": status})
        except OSError:
            return  # the multiplexor is gone; nobody to tell


def _child(fd: int, chan: socket.socket, pipe: tuple[int, int], runner, cfg, wid, gen) -> int:
    """In the forked worker: drop the zygote's state, then serve."""
    code = process.EXIT_CRASHED
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        chan.close()
        for p in pipe:
            os.close(p)
        os.setpgid(0, 0)  # its own group: a hard kill takes the filter's children too
        import random

        random.seed()
        sock = socket.socket(fileno=fd)
        code = process.serve(
            sock,
            runner,
            worker_id=wid,
            generation=gen,
            max_requests=cfg.max_requests,
            max_requests_jitter=cfg.max_requests_jitter,
            max_rss=cfg.max_rss,
            max_frame_size=cfg.max_frame_size,
        )
    except BaseException:
        log.exception("worker %d (pid %d) crashed", wid, os.getpid())
    finally:
        logging.shutdown()
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
