"""The request loop of one worker process.

A worker is forked by the zygote, already holding the imported filter.  It serves one
request at a time on its socket to the multiplexor and never threads.  Retirement is
announced in-band: the reply to the last request says ``"retiring": true`` and the
worker exits right after sending it, so no answer is ever lost between a reply and an
exit (billiard's worst bugs came from exits racing the last result).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time

from defang import malloc, protocol
from defang.proctitle import set_title

log = logging.getLogger("defang.worker")

# Exit codes, so the multiplexor's log tells recycling from crashing.
EXIT_RETIRED = 0
EXIT_BOOT_FAILED = 3
EXIT_CRASHED = 4
EXIT_PROTOCOL = 5

EXIT_MEANING = {
    EXIT_RETIRED: "retired",
    EXIT_BOOT_FAILED: "failed to boot (filter_initialize raised)",
    EXIT_CRASHED: "crashed",
    EXIT_PROTOCOL: "protocol error",
}

_PAGE = os.sysconf("SC_PAGE_SIZE")
#: after a message this big, the heap's free pages go back to the system (off the
#: reply's path: ~0.3 ms after 7 MB, and 2 MB less private memory per worker)
GIVE_BACK_AFTER_BYTES = 1024 * 1024


def current_rss() -> int:
    """Current (not peak) resident set size in bytes, from /proc/self/statm (~7 us)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def serve(
    sock: socket.socket,
    runner,
    *,
    worker_id: int,
    generation: int,
    max_requests: int,
    max_requests_jitter: int,
    max_rss: int,
    max_frame_size: int,
) -> int:
    """Boot, then serve requests until told to stop or retired; return the exit code."""
    pid = os.getpid()
    set_title(f"defang-worker: booting (gen {generation})")
    try:
        runner.initialize()
    except Exception:
        log.exception("worker %d (pid %d): filter_initialize failed", worker_id, pid)
        _send(sock, {"op": "boot_failed", "pid": pid, "error": "filter_initialize raised"})
        return EXIT_BOOT_FAILED
    limit = 0
    if max_requests:
        limit = max_requests + (random.randint(0, max_requests_jitter) if max_requests_jitter else 0)
    baseline = current_rss()
    if max_rss and baseline >= max_rss:
        log.warning(
            "worker %d (pid %d): RSS after boot is %d KiB, at or above max_rss %d KiB: "
            "it will retire after every message; raise max_rss",
            worker_id, pid, baseline // 1024, max_rss // 1024,
        )  # fmt: skip
    _send(sock, {"op": "ready", "pid": pid, "gen": generation, "rss": baseline})
    idle_title = f"defang-worker: idle (%d/{limit or '-'})"
    served = 0
    set_title(idle_title % served)
    decoder = protocol.FrameDecoder(max_frame_size)
    received = memoryview(bytearray(protocol.RECV_SIZE))  # reused: see RECV_SIZE
    while True:
        try:
            n = sock.recv_into(received)
        except InterruptedError:
            continue
        if not n:
            runner.cleanup()
            return EXIT_RETIRED
        try:
            bodies = decoder.feed(received[:n])
        except protocol.ProtocolError as exc:
            log.error("worker %d (pid %d): bad frame from multiplexor: %s", worker_id, pid, exc)
            return EXIT_PROTOCOL
        for body in bodies:
            request = protocol.decode_body(body)
            if request.get("op") == "stop":
                runner.cleanup()
                return EXIT_RETIRED
            # The start time, not a running age: updating a title while the filter runs
            # would need a timer signal (SIGALRM) that admin code may want for itself.
            qid = request.get("queue_id") or request.get("op")
            set_title(f"defang-worker: {qid} since {time.strftime('%H:%M:%S')}")
            reply = runner.handle(request)
            served += 1
            why = ""
            if limit and served >= limit:
                why = f"max_requests {limit}"
            elif max_rss and (rss := current_rss()) > max_rss:
                why = f"RSS {rss // 1024} KiB over max_rss {max_rss // 1024} KiB"
            reply["retiring"] = bool(why)
            reply["gen"] = generation
            _send(sock, reply)
            if why:
                # The multiplexor logs the exit ("exited 0 (retired)"); only we know why.
                log.info("worker %d (pid %d) retiring after %d requests: %s", worker_id, pid,
                         served, why)  # fmt: skip
                runner.cleanup()
                return EXIT_RETIRED
            if request.get("size", 0) >= GIVE_BACK_AFTER_BYTES:
                malloc.give_back_free_memory()
            set_title(idle_title % served)


def _send(sock: socket.socket, obj: dict) -> None:
    sock.sendall(protocol.encode(obj))
