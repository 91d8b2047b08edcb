"""The multiplexor: owns the worker pool and moves small requests and replies.

It never touches message content and never runs admin code.  One process, one
selector loop, read top to bottom in ``run()``:

    wait for I/O (or the next deadline)  ->  handle readable/writable sockets
    ->  handle queued signals  ->  expire queue entries and hung workers
    ->  top up the pool

Signal handlers do nothing; ``signal.set_wakeup_fd`` writes the signal numbers into a
pipe the loop reads, so signals are a queue handled in the loop (gunicorn's shape).

Who talks to it:
- the milter front end, on ``multiplexor.sock``: one request at a time per
  connection (the front end keeps a pool of connections);
- defangctl, on ``control.sock``: status, workers, reload;
- a zygote per filter generation (SOCK_SEQPACKET, see workers/zygote.py), which forks
  the workers; each worker has its own stream socketpair to this loop.  The zygote is
  forked from here (this process has no threads) and only then imports filter.py: it
  and its workers share this process's pages of the interpreter, the stdlib and the
  walk's modules, imported below for that reason.

Rules it keeps: dispatch only to idle workers; a bounded queue with a timeout; a
request whose worker died or hung is answered with a tempfail and never run twice; a
reload loads the new filter in a new zygote first and swaps only when it loaded.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workers.zygote
from defang import child, protocol
from defang.channel import Channel, Closed
from defang.config import Config
from defang.proctitle import set_title
from defang.stats import Stats
from workers.process import EXIT_MEANING

log = logging.getLogger("defang.multiplexor")

BOOT_TIMEOUT = 30.0
STOP_GRACE = 5.0


@dataclass(eq=False)
class Job:
    client: Client | None
    body: bytes
    op: str
    queue_id: str
    conn_id: str
    enqueued: float
    started: float = 0.0


@dataclass(eq=False)
class Client:
    chan: Channel
    job: Job | None = None
    control: bool = False


@dataclass(eq=False)
class Worker:
    wid: int
    gen: int
    chan: Channel
    pid: int = 0
    state: str = "booting"  # booting, idle, busy, retiring, stopping
    job: Job | None = None
    served: int = 0
    spawned: float = field(default_factory=time.monotonic)
    idle_since: float = 0.0
    rss: int = 0


@dataclass(eq=False)
class Zygote:
    gen: int
    proc: child.Child
    sock: socket.socket
    hooks: list[str] | None = None
    waiters: list[Client] = field(default_factory=list)  # control clients awaiting reload
    abandoned: bool = False  # a reload that failed: closes once its workers have exited


class Multiplexor:
    def __init__(self, cfg: Config, *, ready_fd: int | None = None) -> None:
        self.cfg = cfg
        self.ready_fd = ready_fd
        self.sel = selectors.DefaultSelector()
        self.workers: dict[int, Worker] = {}
        self.idle: list[Worker] = []
        self.queue: deque[Job] = deque()
        self.dying: dict[int, tuple[float, int]] = {}  # pid -> (kill deadline, wid)
        # pid -> (worker id, generation) of every worker forked and not yet reported
        # exited: a zygote stays until its last worker has *exited* (it reaps them and
        # reports each exit)
        self.children: dict[int, tuple[int, int]] = {}
        self.closed_zygotes: list[child.Child] = []  # told to leave, not yet reaped
        self.zygotes: dict[int, Zygote] = {}
        self.gen = 0  # the generation new workers come from
        self.next_wid = 1
        self.stopping = 0.0  # graceful-stop deadline, 0 = running
        self.spawn_failures = 0
        self.next_spawn = 0.0
        self.last_load_error = ""
        self.stats = Stats()
        self.started = time.time()
        self.listeners: list[socket.socket] = []

    # ---------------------------------------------------------------- main loop
    def run(self) -> int:
        set_title("defang-multiplexor")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, self._on_signal_pipe)
        self._wake_r = wake_r
        # The zygotes are forked from here: what is imported so far stays shared with them
        # (no collection, here or there, writes to it).  ``defang run`` froze its own
        # imports already; ``defang multiplexor`` on its own has not.
        gc.freeze()

        if not self._start_zygote(first=True):
            return 2
        self._listen(self.cfg.multiplexor_socket, self._on_accept_client, 0o660)
        self._listen(self.cfg.control_socket, self._on_accept_control, 0o660)
        self._announce_ready("ready")
        log.info(
            "multiplexor ready: %d to %d workers (%d spare), queue %d, socket %s",
            self.cfg.min_workers, self.cfg.max_workers, self.cfg.min_spare, self.cfg.queue_size,
            self.cfg.multiplexor_socket,
        )  # fmt: skip

        while True:
            timeout = self._next_timeout()
            for key, mask in self.sel.select(timeout):
                key.data(key, mask)
            now = time.monotonic()
            if self.stopping:
                if not self._in_flight() or now >= self.stopping:
                    break
            self._expire_queue(now)
            self._enforce_deadlines(now)
            if not self.stopping:
                self._maintain_pool(now)
        self._shutdown()
        return 0

    def _next_timeout(self) -> float:
        """Sleep until the next deadline: the oldest queued request or a busy worker's."""
        now = time.monotonic()
        deadline = now + 1.0
        if self.queue:
            deadline = min(deadline, self.queue[0].enqueued + self.cfg.queue_timeout)
        for w in self.workers.values():
            if w.job is not None:
                deadline = min(deadline, w.job.started + self.cfg.busy_timeout)
        return max(deadline - now, 0.0)

    # ---------------------------------------------------------------- signals
    def _on_signal_pipe(self, key, mask) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGINT, signal.SIGQUIT):
                log.info("multiplexor: fast stop (%s)", signal.Signals(signum).name)
                self.stopping = time.monotonic()
            elif signum == signal.SIGTERM and not self.stopping:
                self._begin_graceful_stop()
            elif signum == signal.SIGHUP:
                log.info("multiplexor: SIGHUP: reloading the filter")
                self.reload(None)
            elif signum == signal.SIGCHLD:
                self._check_zygotes()

    def _begin_graceful_stop(self) -> None:
        deadline = self.cfg.busy_timeout + self.cfg.busy_grace
        log.info("multiplexor: stopping: finishing %d requests (at most %.0fs)",
                 self._in_flight(), deadline)  # fmt: skip
        self.stopping = time.monotonic() + deadline
        for lsock in self.listeners:
            self._unregister(lsock)
            lsock.close()
        self.listeners.clear()

    def _in_flight(self) -> int:
        return len(self.queue) + sum(1 for w in self.workers.values() if w.state == "busy")

    # ---------------------------------------------------------------- listening
    def _listen(self, path: Path, handler, mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~mode)
        try:
            lsock.bind(str(path))
        finally:
            os.umask(old)
        lsock.listen(512)
        lsock.setblocking(False)
        self.sel.register(lsock, selectors.EVENT_READ, handler)
        self.listeners.append(lsock)

    def _on_accept_client(self, key, mask) -> None:
        self._accept(key.fileobj, control=False)

    def _on_accept_control(self, key, mask) -> None:
        self._accept(key.fileobj, control=True)

    def _accept(self, lsock: socket.socket, control: bool) -> None:
        while True:
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("multiplexor: cannot accept: %s", exc)
                return
            client = Client(Channel(sock, self.cfg.max_frame_size), control=control)
            self.sel.register(sock, selectors.EVENT_READ, self._client_handler(client))

    # ---------------------------------------------------------------- clients
    def _client_handler(self, client: Client):
        def handle(key, mask) -> None:
            try:
                if mask & selectors.EVENT_WRITE:
                    client.chan.flush()
                    self._update_interest(client.chan, handle)
                if mask & selectors.EVENT_READ:
                    for body in client.chan.read():
                        self._on_request(client, body)
            except Closed:
                self._drop_client(client)
            except protocol.ProtocolError as exc:
                log.error("multiplexor: protocol error from %s client: %s; closing it",
                          "control" if client.control else "milter", exc)  # fmt: skip
                self._drop_client(client)

        return handle

    def _drop_client(self, client: Client) -> None:
        if client.job is not None:
            client.job.client = None  # its answer, if any, goes nowhere
            client.job = None
        self._unregister(client.chan.sock)
        client.chan.close()

    def _on_request(self, client: Client, body: bytes) -> None:
        req = protocol.decode_body(body)
        op = req.get("op") if client.control else protocol.check_request(req)
        if client.job is not None:
            raise protocol.ProtocolError("a second request before the reply to the first")
        if client.control:
            self._on_control(client, req)
            return
        if op == "hello":
            self._reply(client, self._hello())
            return
        job = Job(client, body, op, req.get("queue_id") or "", (req.get("conn") or {}).get("id", ""),
                  time.monotonic())  # fmt: skip
        client.job = job
        self._submit(job)

    def _hello(self) -> dict[str, Any]:
        z = self.zygotes.get(self.gen)
        return {"gen": self.gen, "hooks": z.hooks if z and z.hooks is not None else []}

    def _reply(self, client: Client, obj: dict[str, Any]) -> None:
        self._send_client(client, protocol.encode(obj))

    def _send_client(self, client: Client, frame: bytes) -> None:
        try:
            client.chan.send(frame)
        except Closed:
            self._drop_client(client)
            return
        if client.chan.wants_write:
            key = self.sel.get_key(client.chan.sock)
            self.sel.modify(client.chan.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                            key.data)  # fmt: skip

    def _update_interest(self, chan: Channel, handler) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if chan.wants_write else 0)
        self.sel.modify(chan.sock, events, handler)

    def _answer(self, job: Job, frame: bytes) -> None:
        client = job.client
        if client is None:
            return
        client.job = None
        self._send_client(client, frame)

    def _answer_error(self, job: Job, spec, error: str) -> None:
        self.stats.count(error)
        self._answer(job, protocol.encode(protocol.error_reply(spec.code, spec.dsn, spec.text, error)))

    # ---------------------------------------------------------------- dispatch
    def _submit(self, job: Job) -> None:
        if self.idle:
            self._assign(self.idle.pop(), job)
        elif len(self.queue) < self.cfg.queue_size:
            self.queue.append(job)
        else:
            log.warning("multiplexor: queue full (%d): busy tempfail for %s %s",
                        len(self.queue), job.op, job.queue_id or job.conn_id)  # fmt: skip
            self._answer_error(job, self.cfg.on_busy, "busy")

    def _assign(self, worker: Worker, job: Job) -> None:
        job.started = time.monotonic()
        worker.state = "busy"
        worker.job = job
        try:
            worker.chan.send(protocol.encode_raw(job.body))
        except Closed:
            self._worker_lost(worker, "its socket broke when a request was sent")
            return
        if worker.chan.wants_write:
            self._update_interest(worker.chan, self.sel.get_key(worker.chan.sock).data)

    def _worker_free(self, worker: Worker) -> None:
        """The worker can take work: give it the oldest queued job or make it idle."""
        while self.queue:
            job = self.queue.popleft()
            if job.client is not None:
                self._assign(worker, job)
                return
        if worker.gen != self.gen or self.stopping:
            self._stop_worker(worker)
            return
        worker.state = "idle"
        worker.idle_since = time.monotonic()
        self.idle.append(worker)

    def _expire_queue(self, now: float) -> None:
        limit = self.cfg.queue_timeout
        while self.queue and now - self.queue[0].enqueued >= limit:
            job = self.queue.popleft()
            if job.client is None:
                continue
            log.warning("multiplexor: no free worker within queue_timeout %.0fs: busy tempfail "
                        "for %s %s", limit, job.op, job.queue_id or job.conn_id)  # fmt: skip
            self._answer_error(job, self.cfg.on_busy, "busy")

    # ---------------------------------------------------------------- workers
    def _worker_handler(self, worker: Worker):
        def handle(key, mask) -> None:
            try:
                if mask & selectors.EVENT_WRITE:
                    worker.chan.flush()
                    self._update_interest(worker.chan, handle)
                if mask & selectors.EVENT_READ:
                    for body in worker.chan.read():
                        self._on_worker_message(worker, body)
            except Closed:
                self._worker_lost(worker, "it closed its socket")
            except protocol.ProtocolError as exc:
                self._worker_lost(worker, f"it sent garbage: {exc}")
                self._kill(worker.pid, signal.SIGKILL)

        return handle

    def _on_worker_message(self, worker: Worker, body: bytes) -> None:
        msg = protocol.decode_body(body)
        if worker.state == "busy" and worker.job is not None:
            job = worker.job
            worker.job = None
            worker.served += 1
            latency = time.monotonic() - job.started
            verdict = (msg.get("verdict") or {}).get("action", "?")
            self.stats.record(job.op, verdict, latency, msg.get("error"))
            self._answer(job, protocol.encode_raw(body))
            if msg.get("retiring"):
                worker.state = "retiring"
                if worker.pid:  # it exits by itself; a filter_cleanup that hangs gets KILLed
                    self.dying[worker.pid] = (time.monotonic() + STOP_GRACE, worker.wid)
                self._forget(worker)
            else:
                self._worker_free(worker)
            return
        op = msg.get("op")
        if worker.state == "booting" and op == "ready":
            worker.pid = int(msg.get("pid", 0))
            worker.rss = int(msg.get("rss", 0))
            self.children[worker.pid] = (worker.wid, worker.gen)
            self.spawn_failures = 0
            if worker.gen > self.gen:
                self._promote(worker.gen)
            log.debug("worker %d (pid %d, gen %d) ready, RSS %d KiB", worker.wid, worker.pid,
                      worker.gen, worker.rss // 1024)  # fmt: skip
            self._worker_free(worker)
            self._reload_progress()
        elif op == "boot_failed":
            worker.pid = int(msg.get("pid", worker.pid))
            self.children[worker.pid] = (worker.wid, worker.gen)
            if worker.gen > self.gen:
                self._forget(worker)
                self._abandon_reload(worker.gen, f"a worker of the new filter failed to boot: "
                                     f"{msg.get('error')} (see the traceback above)")  # fmt: skip
                return
            self._spawn_failed(f"worker {worker.wid} failed to boot: {msg.get('error')}")
            self._forget(worker)
        else:
            self._worker_lost(worker, f"it sent an unexpected message {op!r} while {worker.state}")

    def _worker_lost(self, worker: Worker, why: str) -> None:
        """The worker's socket is gone: whatever it held gets a tempfail, never a rerun."""
        if worker.wid not in self.workers:
            return
        job = worker.job
        if job is not None:
            held = time.monotonic() - job.started
            log.error("worker %d (pid %d) lost while handling %s %s (conn %s) after %.1fs: %s; "
                      "answering tempfail", worker.wid, worker.pid, job.op, job.queue_id or "-",
                      job.conn_id, held, why)  # fmt: skip
            worker.job = None
            self._answer_error(job, self.cfg.on_internal_error, "worker_lost")
        elif worker.state == "booting" and worker.gen > self.gen:
            self._forget(worker)
            self._abandon_reload(worker.gen, f"a worker of the new filter died while booting ({why})")
            return
        elif worker.state == "booting":
            self._spawn_failed(f"worker {worker.wid} died while booting ({why})")
        elif worker.state not in ("retiring", "stopping"):
            log.warning("worker %d (pid %d) lost while %s: %s", worker.wid, worker.pid,
                        worker.state, why)  # fmt: skip
        self._forget(worker)

    def _forget(self, worker: Worker) -> None:
        self.workers.pop(worker.wid, None)
        if worker in self.idle:
            self.idle.remove(worker)
        try:
            self._unregister(worker.chan.sock)
        finally:
            worker.chan.close()
        self._retire_zygotes()

    def _stop_worker(self, worker: Worker) -> None:
        """Ask an idle worker to leave: closing its socket is the request (it exits on EOF)."""
        worker.state = "stopping"
        if worker.pid:
            self.dying[worker.pid] = (time.monotonic() + STOP_GRACE, worker.wid)
        self._forget(worker)

    def _enforce_deadlines(self, now: float) -> None:
        busy_timeout = self.cfg.busy_timeout
        for worker in list(self.workers.values()):
            job = worker.job
            if worker.state == "busy" and job is not None and now - job.started > busy_timeout:
                log.error("worker %d (pid %d) busy %.1fs on %s %s (conn %s), past busy_timeout "
                          "%.0fs: answering tempfail, sending TERM", worker.wid, worker.pid,
                          now - job.started, job.op, job.queue_id or "-", job.conn_id,
                          busy_timeout)  # fmt: skip
                worker.job = None
                self._answer_error(job, self.cfg.on_internal_error, "busy_timeout")
                self._kill(worker.pid, signal.SIGTERM)
                self.dying[worker.pid] = (now + self.cfg.busy_grace, worker.wid)
                worker.state = "stopping"
                self._forget(worker)
            elif worker.state == "booting" and now - worker.spawned > BOOT_TIMEOUT:
                self._spawn_failed(f"worker {worker.wid} not ready after {BOOT_TIMEOUT:.0f}s")
                if worker.pid:
                    self._kill(worker.pid, signal.SIGKILL)
                self._forget(worker)
        for pid, (deadline, wid) in list(self.dying.items()):
            if now >= deadline:
                log.error("worker %d (pid %d) still alive after its grace period: KILL", wid, pid)
                self._kill(pid, signal.SIGKILL)
                del self.dying[pid]

    def _kill(self, pid: int, sig: int) -> None:
        if not pid:
            return
        try:
            os.killpg(pid, sig)  # workers lead their own process group
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _maintain_pool(self, now: float) -> None:
        """Spawn what the load and the minimums call for; retire what idles too long.

        Counted over the current generation: booting workers count as spare (they will
        be idle in a moment), queued requests call for one worker each.
        """
        z = self.zygotes.get(self.gen)
        if z is None or z.hooks is None:
            return
        cfg = self.cfg
        live = booting = idle = 0
        for w in self.workers.values():
            if w.gen == self.gen and w.state in ("booting", "idle", "busy"):
                live += 1
                booting += w.state == "booting"
                idle += w.state == "idle"
        wanted = max(cfg.min_workers - live, cfg.min_spare - idle - booting,
                     len(self.queue) - booting)  # fmt: skip
        wanted = min(wanted, cfg.max_workers - live)
        if wanted > 0 and now >= self.next_spawn:
            for _ in range(wanted):
                self._spawn(z)
            return
        if cfg.idle_timeout and live > cfg.min_workers and idle > cfg.min_spare:
            # the longest-idle worker sits at the bottom of the idle stack
            w = self.idle[0] if self.idle else None
            if w is not None and w.gen == self.gen and now - w.idle_since > cfg.idle_timeout:
                log.info("worker %d (pid %d) idle for %.0fs: retiring it (%d live, min %d)",
                         w.wid, w.pid, now - w.idle_since, live, cfg.min_workers)  # fmt: skip
                self.idle.pop(0)
                self._stop_worker(w)

    def _spawn(self, z: Zygote) -> None:
        wid = self.next_wid
        self.next_wid += 1
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _zsend(z.sock, {"op": "spawn", "wid": wid}, [theirs.fileno()])
        except OSError as exc:
            mine.close()
            theirs.close()
            self._spawn_failed(f"zygote (gen {z.gen}) did not take a spawn request: {exc}")
            return
        finally:
            theirs.close()
        worker = Worker(wid, z.gen, Channel(mine, self.cfg.max_frame_size))
        self.workers[wid] = worker
        self.sel.register(mine, selectors.EVENT_READ, self._worker_handler(worker))

    def _spawn_failed(self, why: str) -> None:
        """Back off exponentially so a filter that crashes at start cannot make us spin."""
        self.spawn_failures += 1
        delay = min(0.1 * 2 ** min(self.spawn_failures, 10), 30.0)
        self.next_spawn = time.monotonic() + delay
        log.error("%s; %d failures in a row, next spawn in %.1fs", why, self.spawn_failures, delay)

    # ---------------------------------------------------------------- zygotes
    def _start_zygote(self, first: bool = False) -> bool:
        gen = max(self.zygotes, default=self.gen) + 1
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = ["--fd", str(theirs.fileno()), "--generation", str(gen), "--filter", str(self.cfg.filter)]
        if self.cfg.source:
            argv += ["--config", str(self.cfg.source)]
        argv += ["--runtime-dir", str(self.cfg.runtime_dir)]
        proc = child.fork(lambda: workers.zygote.main(argv), keep_fds=[theirs.fileno()])
        theirs.close()
        z = Zygote(gen, proc, mine)
        if first:
            # Block until the filter loaded: nothing can be served before that.
            msg = _zrecv_blocking(mine, BOOT_TIMEOUT)
            if not msg or msg.get("op") != "ready":
                error = (msg or {}).get("error") or "zygote exited before loading the filter"
                log.error("cannot load the filter: %s", error)
                self._announce_ready(f"error: {error}")
                proc.kill()
                proc.wait()
                return False
            z.hooks = msg["hooks"]
            self.gen = gen
            log.info("filter %s loaded (gen %d), hooks: %s", self.cfg.filter, gen,
                     ", ".join(z.hooks) or "none")  # fmt: skip
        mine.setblocking(False)
        self.zygotes[gen] = z
        self.sel.register(mine, selectors.EVENT_READ, self._zygote_handler(z))
        return True

    def _zygote_handler(self, z: Zygote):
        def handle(key, mask) -> None:
            while True:
                try:
                    data = z.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:
                    self._zygote_gone(z)
                    return
                self._on_zygote_message(z, json.loads(data))

        return handle

    def _on_zygote_message(self, z: Zygote, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "ready":
            # The new filter imported.  It takes over only once one of its workers has
            # booted (filter_initialize ran): until then the old pool serves as before.
            z.hooks = msg["hooks"]
            log.info("reload: filter %s loaded (gen %d), hooks: %s; starting its workers",
                     self.cfg.filter, z.gen, ", ".join(z.hooks) or "none")  # fmt: skip
            for _ in range(max(1, min(self.cfg.min_workers, self.cfg.max_workers))):
                self._spawn(z)
        elif op == "load_failed":
            self.last_load_error = msg.get("error", "")
            log.error("reload failed, the running filter stays in place: %s", self.last_load_error)
            for c in z.waiters:
                self._reply(c, {"ok": False, "error": self.last_load_error})
            z.waiters.clear()
            self._close_zygote(z)
        elif op == "spawned":
            wid, pid = int(msg["wid"]), int(msg["pid"])
            self.children[pid] = (wid, z.gen)
            w = self.workers.get(wid)
            if w is not None:
                w.pid = pid
        elif op == "exited":
            self._on_exit(int(msg["pid"]), int(msg["status"]))

    def _on_exit(self, pid: int, status: int) -> None:
        wid, gen = self.children.pop(pid, (0, 0))
        self.dying.pop(pid, None)
        if os.WIFSIGNALED(status):
            how = f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
            self.stats.count("worker_killed")
        else:
            code = os.WEXITSTATUS(status)
            how = f"exited {code} ({EXIT_MEANING.get(code, 'unexpected exit code')})"
            self.stats.count("worker_retired" if code == 0 else "worker_crashed")
        level = logging.INFO if how.startswith("exited 0") else logging.WARNING
        log.log(level, "worker %d (pid %d) %s", wid, pid, how)
        if gen:
            self._retire_zygotes()

    def _zygote_gone(self, z: Zygote) -> None:
        self._unregister(z.sock)
        z.sock.close()
        self.zygotes.pop(z.gen, None)
        self.closed_zygotes.append(z.proc)
        for pid in [p for p, (_, g) in self.children.items() if g == z.gen]:
            del self.children[pid]  # nobody left to report those exits
        if z.gen == self.gen and not self.stopping:
            log.error("zygote of gen %d exited unexpectedly (%s); starting a new one",
                      z.gen, z.proc.poll())  # fmt: skip
            self._spawn_failed("zygote lost")
            self._start_zygote()

    def _close_zygote(self, z: Zygote) -> None:
        self.zygotes.pop(z.gen, None)
        self._unregister(z.sock)
        z.sock.close()  # EOF: it exits
        self.closed_zygotes.append(z.proc)  # reaped in _check_zygotes (SIGCHLD)

    def _retire_zygotes(self) -> None:
        """An old (or abandoned) generation's zygote leaves once its last worker has exited.

        Not merely once we stopped talking to the workers: the zygote is their parent; it
        reaps them and reports each exit ("exited 0 (retired)", the counters).  Closed any
        earlier, it would exit first, the exits would go unreported and the workers would
        be orphans (zombies where PID 1 does not reap).
        """
        for gen, z in list(self.zygotes.items()):
            done = z.abandoned or (gen < self.gen and z.hooks is not None)
            if (done and not any(w.gen == gen for w in self.workers.values())
                    and all(g != gen for _, g in self.children.values())):  # fmt: skip
                self._close_zygote(z)

    def _check_zygotes(self) -> None:
        for z in list(self.zygotes.values()):
            if z.proc.poll() is not None:
                z.proc.wait()
        self.closed_zygotes = [p for p in self.closed_zygotes if p.poll() is None]

    # ---------------------------------------------------------------- reload
    def reload(self, waiter: Client | None) -> None:
        """Load filter.py afresh in a new zygote; the answer comes when it serves or fails."""
        if not self._start_zygote():
            return
        if waiter is not None:
            self.zygotes[max(self.zygotes)].waiters.append(waiter)

    def _promote(self, gen: int) -> None:
        """A worker of the new generation booted: new workers come from it from now on."""
        old, self.gen = self.gen, gen
        log.info("reload: generation %d serving; generation %d workers retire as they finish",
                 gen, old)  # fmt: skip
        self.next_spawn = 0.0
        for older in [g for g in self.zygotes if old <= g < gen]:
            z = self.zygotes[older]
            for c in z.waiters:  # a reload superseded by a newer one
                self.zygotes[gen].waiters.append(c)
            z.waiters.clear()

    def _abandon_reload(self, gen: int, why: str) -> None:
        z = self.zygotes.get(gen)
        self.last_load_error = why
        log.error("reload abandoned, the running filter stays in place: %s", why)
        if z is not None:
            z.abandoned = True  # closed by _retire_zygotes once its workers have exited
            for c in z.waiters:
                self._reply(c, {"ok": False, "error": why})
            z.waiters.clear()
        for w in [w for w in self.workers.values() if w.gen == gen]:
            self._kill(w.pid, signal.SIGTERM)
            self._forget(w)
        self._retire_zygotes()

    def _reload_progress(self) -> None:
        """Retire old workers once the new generation is in; answer reload waiters."""
        z = self.zygotes.get(self.gen)
        if z is None:
            return
        ready = sum(1 for w in self.workers.values() if w.gen == self.gen and w.state != "booting")
        if ready == 0:
            return
        for w in list(self.workers.values()):
            if w.gen < self.gen and w.state == "idle":
                self.idle.remove(w)
                self._stop_worker(w)
        if z.waiters:
            for c in z.waiters:
                self._reply(c, {"ok": True, "gen": self.gen, "hooks": z.hooks})
            z.waiters.clear()

    # ---------------------------------------------------------------- control
    def _on_control(self, client: Client, req: dict[str, Any]) -> None:
        op = req.get("op")
        if op == "status":
            self._reply(client, self.status())
        elif op == "reload":
            self.reload(client)
        else:
            self._reply(client, {"ok": False, "error": f"unknown control op {op!r}"})

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: w.wid):
            job = w.job
            workers.append({
                "id": w.wid, "pid": w.pid, "gen": w.gen, "state": w.state, "served": w.served,
                "rss": _rss(w.pid),
                "queue_id": job.queue_id if job else None, "op": job.op if job else None,
                "busy_for": round(now - job.started, 3) if job else None,
            })  # fmt: skip
        return {
            "ok": True,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "generation": self.gen,
            "filter": str(self.cfg.filter),
            "hooks": self._hello()["hooks"],
            "workers": workers,
            "queue": {"depth": len(self.queue), "size": self.cfg.queue_size},
            "pool": {"min_workers": self.cfg.min_workers, "max_workers": self.cfg.max_workers,
                     "min_spare": self.cfg.min_spare},
            "spawn_failures": self.spawn_failures,
            "last_load_error": self.last_load_error or None,
            **self.stats.snapshot(),
        }

    # ---------------------------------------------------------------- helpers
    def _unregister(self, fileobj) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _announce_ready(self, text: str) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, text.encode() + b"\n")
            os.close(self.ready_fd)
        except OSError:
            pass
        self.ready_fd = None

    def _shutdown(self) -> None:
        for job in list(self.queue):
            self._answer_error(job, self.cfg.on_internal_error, "shutdown")
        self.queue.clear()
        for w in list(self.workers.values()):
            if w.job is not None:
                self._answer_error(w.job, self.cfg.on_internal_error, "shutdown")
                w.job = None
            self._kill(w.pid, signal.SIGTERM)
            self._forget(w)
        for z in list(self.zygotes.values()):
            self._close_zygote(z)
            try:
                z.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.warning("zygote of gen %d (pid %d) still running %.0fs after the stop: KILL",
                            z.gen, z.proc.pid, STOP_GRACE)  # fmt: skip
                z.proc.kill()
                z.proc.wait()
        for path in (self.cfg.multiplexor_socket, self.cfg.control_socket):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        log.info("multiplexor stopped")


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int | None:
    """A worker's current RSS in bytes (the multiplexor may read it: same user)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _zsend(sock: socket.socket, obj: dict[str, Any], fds: list[int]) -> None:
    socket.send_fds(sock, [json.dumps(obj).encode()], fds)


def _zrecv_blocking(sock: socket.socket, timeout: float) -> dict[str, Any] | None:
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except (TimeoutError, OSError):
        return None
    return json.loads(data) if data else None
