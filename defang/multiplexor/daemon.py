"""The multiplexor daemon: the I/O around the pool.  It never touches message content
and never runs admin code.

One process, one selector loop, read top to bottom in ``run()``::

    wait for I/O (or the pool's next deadline)  ->  read sockets, turn what came into
    events for the pool  ->  a Tick  ->  carry out the pool's commands

Every decision (which worker, when to spawn, retire, kill, reload, stop) is the pool's
(``defang.multiplexor.pool``); this module owns the sockets and the processes and does
what the commands say.  Signal handlers do nothing; ``signal.set_wakeup_fd`` writes the
signal numbers into a pipe the loop reads, so signals are a queue handled in the loop
(gunicorn's shape).

Who talks to it:
- the milter front end, on ``multiplexor.sock``: one request at a time per connection
  (the front end keeps a pool of connections);
- defangctl, on ``control.sock``: status, reload;
- a zygote per filter generation (SOCK_SEQPACKET), which forks the workers; each worker
  has its own stream socketpair to this loop.  The zygote is forked from here (this
  process has no threads) by calling the entry point the command line handed over
  (``zygote_main``): this module imports no worker code, yet when ``defang run`` imported
  it before forking, the zygote and its workers share those pages.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defang.core import child, logsetup, wire
from defang.core.config import Config
from defang.core.configcheck import timeout_warnings
from defang.core.convert import loopback_address
from defang.core.framing import frame
from defang.core.privileges import give_socket, peer_credentials
from defang.core.proctitle import set_title
from defang.multiplexor import events as ev
from defang.multiplexor.channel import Channel, Closed
from defang.multiplexor.control import ControlCommands
from defang.multiplexor.pool import STOP_GRACE, Pool

log = logging.getLogger("defang.multiplexor")

BOOT_TIMEOUT = 30.0
#: the zygote's entry point, run in the forked child: (its config, its socket's fd, generation)
ZygoteMain = Callable[[Config, int, int], int]
#: the config file read again as at the start (the command line's overrides on top)
Reread = Callable[[], Config]


@dataclass(eq=False)
class Client:
    chan: Channel
    control: bool = False
    job: ev.Job | None = None
    peer: tuple[int, int, int] | None = None  # control clients: (pid, uid, gid)


@dataclass(eq=False)
class ZygoteLink:
    gen: int
    proc: child.Child
    sock: socket.socket


class Multiplexor(ControlCommands):
    def __init__(self, cfg: Config, zygote_main: ZygoteMain, *, ready_fd: int | None = None,
                 reread: Reread | None = None) -> None:  # fmt: skip
        self.reread = reread  # None: a reload loads the filter again, with the config as it was
        self.zygote_main = zygote_main
        self.ready_fd = ready_fd
        self.pool = Pool(cfg)
        self.sel = selectors.DefaultSelector()
        self.workers: dict[int, Channel] = {}
        self.zygotes: dict[int, ZygoteLink] = {}
        self.closed_zygotes: list[child.Child] = []  # told to leave, not yet reaped
        self.listeners: list[socket.socket] = []
        self.started = time.time()
        self.metrics: Any = None  # the MetricsServer, with [metrics] listen
        self._stopped: ev.Stopped | None = None

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

        if not self._boot_first_zygote():
            return 2
        self._listen(self.cfg.multiplexor_socket, self._on_accept_client)  # the front end: us
        self._listen(self.cfg.control_socket, self._on_accept_control)
        give_socket(self.cfg.control_socket, self.cfg.control_socket_mode, self.cfg.control_group)
        self._serve_metrics()
        self._announce_ready("ready")
        log.info("multiplexor ready: %d to %d workers (%d spare), queue %d, socket %s",
                 self.cfg.min_workers, self.cfg.max_workers, self.cfg.min_spare, self.cfg.queue_size,
                 self.cfg.multiplexor_socket)  # fmt: skip
        for line in timeout_warnings(self.cfg):
            log.warning("%s", line)

        while self._stopped is None:
            timeout = max(self.pool.next_deadline(time.monotonic()) - time.monotonic(), 0.0)
            for key, mask in self.sel.select(timeout):
                key.data(key, mask)
            self._feed(ev.Tick())
        self._wait_for_zygotes()
        log.info("multiplexor stopped")
        return 0

    def _serve_metrics(self) -> None:
        """``[metrics] listen``: the Prometheus endpoint, in this loop (its code loaded only
        then); one that cannot listen is an error line, and mail flows on without it."""
        if not self.cfg.metrics_listen:
            return
        from defang.multiplexor.metrics import MetricsServer

        try:
            self.metrics = MetricsServer(self.pool, self.sel, loopback_address(self.cfg.metrics_listen))
        except OSError as exc:
            log.error("metrics: cannot listen on %s: %s; serving mail without metrics",
                      self.cfg.metrics_listen, exc.strerror or exc)  # fmt: skip
            return
        log.info("metrics on http://%s/metrics", self.cfg.metrics_listen)

    def _feed(self, event: ev.Event) -> None:
        """Give the pool an event and carry out what it answers (which may feed more)."""
        for command in self.pool.handle(event, time.monotonic()):
            _COMMANDS[type(command)](self, command)

    # ---------------------------------------------------------------- signals
    def _on_signal_pipe(self, key: Any, mask: int) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGINT, signal.SIGQUIT):
                log.info("multiplexor: fast stop (%s)", signal.Signals(signum).name)
                self._feed(ev.StopRequested(fast=True))
            elif signum == signal.SIGTERM:
                self._feed(ev.StopRequested(fast=False))
            elif signum == signal.SIGHUP:
                log.info("multiplexor: SIGHUP: reloading the config and the filter")
                self._reload(None)
            elif signum == signal.SIGCHLD:
                self._reap_zygotes()

    # ---------------------------------------------------------------- listening
    def _listen(self, path: Path, handler: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # 0600: the control socket is opened up by give_socket
        try:
            lsock.bind(str(path))
        finally:
            os.umask(old)
        lsock.listen(512)
        lsock.setblocking(False)
        self.sel.register(lsock, selectors.EVENT_READ, handler)
        self.listeners.append(lsock)

    def _on_accept_client(self, key: Any, mask: int) -> None:
        self._accept(key.fileobj, control=False)

    def _on_accept_control(self, key: Any, mask: int) -> None:
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
            peer = peer_credentials(sock) if control else None
            client = Client(Channel(sock, self.cfg.max_frame_size), control=control, peer=peer)
            self.sel.register(sock, selectors.EVENT_READ, self._client_handler(client))

    # ---------------------------------------------------------------- clients
    def _client_handler(self, client: Client) -> Callable[[Any, int], None]:
        def handle(key: Any, mask: int) -> None:
            try:
                if mask & selectors.EVENT_WRITE:
                    client.chan.flush()
                    self._update_interest(client.chan)
                if mask & selectors.EVENT_READ:
                    for body in client.chan.read():
                        self._on_request(client, body)
            except Closed:
                self._drop_client(client)
            except wire.ProtocolError as exc:
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
        if client.job is not None:
            raise wire.ProtocolError("a second request before the reply to the first")
        if client.control:
            self._on_control(client, body)
            return
        request = wire.decode(body, wire.ROUTED_REQUESTS)
        if isinstance(request, wire.Hello):
            self._send_client(client, wire.encode(self.pool.hello()))
            return
        job = ev.Job(client, body, request.op, request.queue_id, str(request.conn.id), time.monotonic())
        client.job = job
        self._feed(ev.RequestReceived(job))

    def _send_client(self, client: Client, frame: bytes) -> None:
        try:
            client.chan.send(frame)
        except Closed:
            self._drop_client(client)
            return
        if client.chan.wants_write:
            self._update_interest(client.chan)

    def _update_interest(self, chan: Channel) -> None:
        key = self.sel.get_key(chan.sock)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if chan.wants_write else 0)
        if key.events != events:
            self.sel.modify(chan.sock, events, key.data)

    # ---------------------------------------------------------------- workers
    def _worker_handler(self, wid: int, chan: Channel) -> Callable[[Any, int], None]:
        def handle(key: Any, mask: int) -> None:
            try:
                if mask & selectors.EVENT_WRITE:
                    chan.flush()
                    self._update_interest(chan)
                if mask & selectors.EVENT_READ:
                    for body in chan.read():
                        if self.workers.get(wid) is not chan:
                            return  # the pool let it go while this batch was read
                        self._on_worker_message(wid, body)
            except Closed:
                self._feed(ev.WorkerLost(wid, "it closed its socket"))
            except wire.ProtocolError as exc:
                self._feed(ev.WorkerLost(wid, f"it sent garbage: {exc}", kill=True))

        return handle

    def _on_worker_message(self, wid: int, body: bytes) -> None:
        msg = wire.decode(body, wire.ROUTED_FROM_WORKER)
        if isinstance(msg, wire.RoutedReply):
            self._feed(ev.WorkerReplied(wid, body, msg.verdict.action, msg.error, msg.rss, msg.would,
                                        msg.tags, msg.elapsed, msg.checks, msg.actions))  # fmt: skip
        elif isinstance(msg, wire.WorkerReady):
            self._feed(ev.WorkerReady(wid, msg.pid, msg.rss))
        else:
            self._feed(ev.WorkerBootFailed(wid, msg.pid, msg.error))

    # ---------------------------------------------------------------- zygotes
    def _fork_zygote(self, gen: int, cfg: Config) -> ZygoteLink:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        main, fd = self.zygote_main, theirs.fileno()
        try:
            proc = child.fork(lambda: main(cfg, fd, gen), keep_fds=[fd])
        finally:
            theirs.close()
        link = ZygoteLink(gen, proc, mine)
        self.zygotes[gen] = link
        return link

    def _boot_first_zygote(self) -> bool:
        """Start the first generation and wait for it: nothing can be served before."""
        (start,) = self.pool.start()
        link = self._fork_zygote(start.gen, start.cfg)
        link.sock.settimeout(BOOT_TIMEOUT)
        try:
            msg = wire.decode(link.sock.recv(65536), wire.FROM_ZYGOTE)
        except (OSError, wire.ProtocolError):
            msg = None
        if not isinstance(msg, wire.ZygoteReady):
            error = "zygote exited before loading the filter"
            if isinstance(msg, wire.LoadFailed):
                error = msg.error
            log.error("cannot load the filter: %s", error)
            self._announce_ready(f"error: {error}")
            link.proc.kill()
            link.proc.wait()
            return False
        self._watch_zygote(link)
        self._feed(ev.ZygoteLoaded(link.gen, msg.hooks))
        return True

    def _watch_zygote(self, link: ZygoteLink) -> None:
        link.sock.setblocking(False)
        self.sel.register(link.sock, selectors.EVENT_READ, self._zygote_handler(link))

    def _zygote_handler(self, link: ZygoteLink) -> Callable[[Any, int], None]:
        def handle(key: Any, mask: int) -> None:
            while self.zygotes.get(link.gen) is link:
                try:
                    data = link.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:
                    self._close_link(link)
                    self._feed(ev.ZygoteLost(link.gen, link.proc.poll()))
                    return
                try:
                    msg = wire.decode(data, wire.FROM_ZYGOTE)
                except wire.ProtocolError as exc:
                    log.error("multiplexor: garbage from the zygote of gen %d: %s", link.gen, exc)
                    continue
                self._on_zygote_message(link.gen, msg)

        return handle

    def _on_zygote_message(self, gen: int, msg: Any) -> None:
        if isinstance(msg, wire.ZygoteReady):
            self._feed(ev.ZygoteLoaded(gen, msg.hooks))
        elif isinstance(msg, wire.LoadFailed):
            self._feed(ev.ZygoteLoadFailed(gen, msg.error))
        elif isinstance(msg, wire.Spawned):
            self._feed(ev.WorkerSpawned(gen, msg.wid, msg.pid))
        else:
            self._feed(ev.WorkerExited(msg.pid, msg.status))

    def _close_link(self, link: ZygoteLink) -> None:
        self.zygotes.pop(link.gen, None)
        self._unregister(link.sock)
        link.sock.close()  # EOF: it exits (once its workers have)
        self.closed_zygotes.append(link.proc)  # reaped on SIGCHLD

    def _reap_zygotes(self) -> None:
        for link in self.zygotes.values():
            link.proc.poll()
        self.closed_zygotes = [p for p in self.closed_zygotes if p.poll() is None]

    def _wait_for_zygotes(self) -> None:
        for proc in self.closed_zygotes:
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.warning("zygote (pid %d) still running %.0fs after the stop: KILL", proc.pid, STOP_GRACE)
                proc.kill()
                proc.wait()
        for path in (self.cfg.multiplexor_socket, self.cfg.control_socket):
            path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- commands
    def _do_start_zygote(self, c: ev.StartZygote) -> None:
        try:
            link = self._fork_zygote(c.gen, c.cfg)
        except OSError as exc:
            self._feed(ev.ZygoteLoadFailed(c.gen, f"cannot start a zygote: {exc}"))
            return
        self._watch_zygote(link)

    def _do_close_zygote(self, c: ev.CloseZygote) -> None:
        link = self.zygotes.get(c.gen)
        if link is not None:
            self._close_link(link)

    def _do_spawn(self, c: ev.Spawn) -> None:
        link = self.zygotes.get(c.gen)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if link is None:
                raise OSError(f"no zygote of gen {c.gen}")
            socket.send_fds(link.sock, [wire.encode_body(wire.Spawn(c.wid))], [theirs.fileno()])
        except OSError as exc:
            mine.close()
            self._feed(ev.SpawnFailed(c.wid, str(exc)))
            return
        finally:
            theirs.close()
        chan = Channel(mine, self.cfg.max_frame_size)
        self.workers[c.wid] = chan
        self.sel.register(mine, selectors.EVENT_READ, self._worker_handler(c.wid, chan))

    def _do_send(self, c: ev.Send) -> None:
        chan = self.workers.get(c.wid)
        try:
            if chan is None:
                raise Closed("no such worker")
            chan.send(frame(c.job.body))
        except Closed:
            self._feed(ev.WorkerLost(c.wid, "its socket broke when a request was sent"))
            return
        if chan.wants_write:
            self._update_interest(chan)

    def _do_close_worker(self, c: ev.CloseWorker) -> None:
        chan = self.workers.pop(c.wid, None)
        if chan is not None:
            self._unregister(chan.sock)
            chan.close()

    def _do_signal(self, c: ev.Signal) -> None:
        try:
            os.killpg(c.pid, c.signal)  # workers lead their own process group
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                os.kill(c.pid, c.signal)
            except ProcessLookupError:
                pass

    def _do_answer(self, c: ev.Answer) -> None:
        client = c.job.client
        if client is None:
            return
        client.job = None
        if c.body is not None:
            data = frame(c.body)
        else:
            spec = c.spec
            data = wire.encode(wire.error_reply(spec.code, spec.dsn, spec.text, c.error))  # type: ignore[union-attr]
        self._send_client(client, data)

    def _do_answer_control(self, c: ev.AnswerControl) -> None:
        self._send_client(c.waiter, wire.encode(c.result))

    def _do_config_applied(self, c: ev.ConfigApplied) -> None:
        logsetup.set_level(c.cfg.log_level)

    def _do_close_listeners(self, c: ev.CloseListeners) -> None:
        for lsock in self.listeners:
            self._unregister(lsock)
            lsock.close()
        self.listeners.clear()

    def _do_stopped(self, c: ev.Stopped) -> None:
        self._stopped = c

    # ---------------------------------------------------------------- helpers
    def _unregister(self, fileobj: Any) -> None:
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


_COMMANDS: dict[type, Callable[[Multiplexor, Any], None]] = {
    ev.StartZygote: Multiplexor._do_start_zygote,
    ev.CloseZygote: Multiplexor._do_close_zygote,
    ev.Spawn: Multiplexor._do_spawn,
    ev.Send: Multiplexor._do_send,
    ev.CloseWorker: Multiplexor._do_close_worker,
    ev.Signal: Multiplexor._do_signal,
    ev.Answer: Multiplexor._do_answer,
    ev.AnswerControl: Multiplexor._do_answer_control,
    ev.ConfigApplied: Multiplexor._do_config_applied,
    ev.CloseListeners: Multiplexor._do_close_listeners,
    ev.Stopped: Multiplexor._do_stopped,
}
