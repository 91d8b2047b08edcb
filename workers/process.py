"""The request loop of one worker process.

A worker is forked by the zygote, already holding the imported filter.  It serves one
request at a time on its socket to the multiplexor and never threads (the scanner checks
of a message overlap in one selector loop, ``defang.workers.checks.exchange``); the
notices a message asked for are sent after its reply.  It does not
decide when to retire: the multiplexor's pool does (``max_requests``, ``max_rss``,
idle time, a reload), between requests, by closing the socket; the worker then runs
``filter_cleanup`` and exits.  So no answer is ever lost between a reply and an exit
(billiard's worst bugs came from exits racing the last result).  When the pool watches
memory (``max_rss``), every reply carries the worker's current RSS.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from defang.core import exits, malloc, procinfo, wire
from defang.core.framing import RECV_SIZE, FrameDecoder, ProtocolError
from defang.core.proctitle import set_title
from defang.workers.runner import FilterRunner

log = logging.getLogger("defang.worker")

#: after a message this big, the heap's free pages go back to the system (off the
#: reply's path: ~0.3 ms after 7 MB, and 2 MB less private memory per worker)
GIVE_BACK_AFTER_BYTES = 1024 * 1024


def serve(sock: socket.socket, runner: FilterRunner, *, worker_id: int, generation: int, report_rss: bool,
          max_frame_size: int) -> int:  # fmt: skip
    """Boot, then serve requests until the multiplexor closes the socket; return the exit code."""
    pid = os.getpid()
    set_title(f"defang-worker: booting (gen {generation})")
    try:
        runner.initialize()
    except Exception:
        log.exception("worker %d (pid %d): filter_initialize failed", worker_id, pid)
        sock.sendall(wire.encode(wire.WorkerBootFailed(pid, "filter_initialize raised")))
        return exits.BOOT_FAILED
    try:
        sock.sendall(wire.encode(wire.WorkerReady(pid, generation, procinfo.rss() or 0)))
    except (BrokenPipeError, ConnectionResetError):  # the multiplexor stopped while we booted
        runner.cleanup()
        return exits.RETIRED
    idle_title = "defang-worker: idle (%d served)"
    served = 0
    set_title(idle_title % served)
    decoder = FrameDecoder(max_frame_size)
    received = memoryview(bytearray(RECV_SIZE))  # reused: see RECV_SIZE
    while True:
        try:
            n = sock.recv_into(received)
        except InterruptedError:
            continue
        if not n:  # the multiplexor is done with us
            runner.cleanup()
            return exits.RETIRED
        try:
            bodies = decoder.feed(received[:n])
        except ProtocolError as exc:
            log.error("worker %d (pid %d): bad frame from multiplexor: %s", worker_id, pid, exc)
            return exits.PROTOCOL
        for body in bodies:
            request = runner.read(body)
            if isinstance(request, wire.Reply):  # not a request: the reply says so
                reply, size = request, 0
            else:
                # The start time, not a running age: updating a title while the filter
                # runs would need a timer signal (SIGALRM) that admin code may want.
                what = request.queue_id or request.OP
                set_title(f"defang-worker: {what} since {time.strftime('%H:%M:%S')}")
                began = time.monotonic()
                reply = runner.handle(request)
                reply.elapsed = round(time.monotonic() - began, 6)
                size = request.size if isinstance(request, wire.EndOfMessage) else 0
            reply.gen, reply.pid = generation, pid
            if report_rss:
                reply.rss = procinfo.rss() or 0
            sock.sendall(wire.encode(reply))
            if runner.outbox:  # after the reply: the SMTP client does not wait for them
                set_title(f"defang-worker: {request.queue_id or '-'} sending notices")
                runner.send_notices()
            served += 1
            if size >= GIVE_BACK_AFTER_BYTES:
                malloc.give_back_free_memory()
            set_title(idle_title % served)
