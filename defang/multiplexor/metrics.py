"""Prometheus metrics (``[metrics] listen``), served by the multiplexor's own loop.

Aggregated in the multiplexor, not with the client's multiprocess mode: every decision
already passes through here and ``Stats`` counts it (a few list operations per message,
no file written, no lock).  The multiprocess mode would have each worker write its
counters to a memory-mapped file per process on every update and a scrape read and merge
one file per worker ever started (retired workers' files included).  Here a scrape
renders what ``Stats`` and the pool hold: its cost grows with the number of series (the
tags are capped at ``stats.MAX_TAGS``), never with the mail.

Served from the selector loop, never by a thread: the multiplexor forks the zygotes, and
a process that forks must not run threads (ARCHITECTURE.md).  The socket is non-blocking;
a request is read up to ``MAX_REQUEST`` bytes, the page written as the client takes it,
and at most ``MAX_CLIENTS`` scrapers are held at once (the oldest is dropped), so a
scraper that stalls costs a socket, never the loop's time.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from defang.core.verdicts import ACTIONS
from defang.multiplexor.stats import BUCKETS, Histogram

log = logging.getLogger("defang.multiplexor")

MAX_REQUEST = 8192  # bytes of request line and headers
MAX_CLIENTS = 16
STATES = ("booting", "idle", "busy", "stopping")


# the closed label sets (Stats counts them by these names): on the page from the start
VERDICTS = tuple(sorted(ACTIONS - {"continue"}))  # "continue" at end of message is counted as accept
RECYCLE_REASONS = ("max_requests", "max_rss", "idle_timeout", "busy_timeout", "lost", "reload", "stop")
RELOAD_OUTCOMES = ("ok", "failed")


class Collector:
    """The metric families, read from the pool and its ``Stats`` at scrape time."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def describe(self) -> list[Metric]:
        return []  # no describe-time collection: families are built at scrape time only

    def collect(self) -> Iterator[Metric]:
        pool, stats = self.pool, self.pool.stats
        yield _counter("defang_messages", "Messages decided at end of message, by verdict.", "verdict",
                       stats.verdicts, VERDICTS)  # fmt: skip
        yield _counter("defang_tags", "Messages by what the filter named as having fired (msg.tag).", "tag",
                       stats.tags)  # fmt: skip
        yield _counter("defang_actions", "Actions the filter asked for, by name.", "action", stats.actions)
        yield _counter("defang_requests", "Decision requests answered by a worker, by stage.", "stage",
                       stats.requests)  # fmt: skip
        yield _counter("defang_events", "Answers the daemons gave instead of the filter, and worker "
                       "exits, by kind (filter error in ..., busy, worker_lost, busy_timeout, ...).", "event",
                       stats.events)  # fmt: skip
        filter_errors = sum(n for k, n in stats.events.items() if k.startswith("filter error"))
        yield CounterMetricFamily("defang_filter_errors", "Decisions where filter.py raised or returned "
                                  "something that is not a verdict.", value=filter_errors)  # fmt: skip
        yield _counter("defang_would", "Refusals monitor mode noted and did not carry out.", "kind",
                       stats.would)  # fmt: skip
        checks = CounterMetricFamily("defang_scanner_results", "Scanner outcomes (spam, ham, virus, "
                                     "suspicious, clean, error, skipped).",
                                     labels=["scanner", "outcome"])  # fmt: skip
        for (name, outcome), n in stats.checks.items():
            checks.add_metric([name, outcome], n)
        yield checks
        yield _counter("defang_worker_recycles", "Workers let go, by reason.", "reason", stats.recycles,
                       RECYCLE_REASONS)  # fmt: skip
        yield _counter("defang_reloads", "Reloads, by outcome.", "outcome", stats.reloads, RELOAD_OUTCOMES)
        for name, text, table in (
            ("defang_decision_seconds", "From a request's arrival at the multiplexor to the reply, by "
             "stage (eom: the message's time in the daemons after the MTA sent it).", stats.decision),
            ("defang_queue_wait_seconds", "Time a request waited for a free worker, by stage.", stats.waited),
            ("defang_filter_seconds", "Time in the filter, as the worker measured it, by stage.",
             stats.filtering),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, text, labels=["stage"])
            for stage, histo in table.items():
                family.add_metric([stage], _buckets(histo), histo.sum)
            yield family
        states = GaugeMetricFamily("defang_workers", "Workers by state.", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for w in pool.workers.values():
            counts[w.state] = counts.get(w.state, 0) + 1
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        for name, text, value in (
            ("defang_queue_depth", "Requests waiting for a free worker.", len(pool.queue)),
            ("defang_queue_size", "[multiplexor] queue_size.", pool.cfg.queue_size),
            ("defang_max_workers", "[multiplexor] max_workers.", pool.cfg.max_workers),
            ("defang_generation", "The filter generation serving.", pool.gen),
        ):
            yield GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, label: str, counts: dict[str, int],
             known: tuple[str, ...] = ()) -> CounterMetricFamily:  # fmt: skip
    """A labelled counter; the ``known`` values are on the page at 0 before they are counted.

    A series that first appears at 1 loses that 1 to rate() and increase(), which need two
    samples: the first reload or recycle of a run would never show on a graph.
    """
    family = CounterMetricFamily(name, text, labels=[label])
    for key, n in {**dict.fromkeys(known, 0), **counts}.items():
        family.add_metric([key], n)
    return family


def _buckets(histo: Histogram) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip(BUCKETS, histo.counts, strict=False):
        total += n
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + histo.counts[-1]))
    return out


class _Scraper:
    __slots__ = ("sock", "inbox", "outbox", "since")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.inbox, self.outbox, self.since = sock, b"", b"", time.monotonic()


class MetricsServer:
    """The HTTP endpoint on ``address`` (host, port: ``convert.loopback_address`` of
    ``[metrics] listen``), in the loop's selector."""

    def __init__(self, pool: Any, sel: selectors.BaseSelector, address: tuple[str, int]) -> None:
        self.sel = sel
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(pool))  # type: ignore[arg-type]
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind(address)
            self.lsock.listen(64)
        except OSError:
            self.lsock.close()
            raise
        self.lsock.setblocking(False)
        self.clients: dict[socket.socket, _Scraper] = {}
        sel.register(self.lsock, selectors.EVENT_READ, self._on_accept)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        self._unregister(self.lsock)
        self.lsock.close()

    def render(self) -> bytes:
        """The exposition text of every metric (what a scrape gets)."""
        return generate_latest(self.registry)

    def _on_accept(self, key: Any, mask: int) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("metrics: cannot accept: %s", exc)
                return
            if len(self.clients) >= MAX_CLIENTS:
                self._drop(min(self.clients.values(), key=lambda c: c.since))
            sock.setblocking(False)
            client = _Scraper(sock)
            self.clients[sock] = client
            self.sel.register(sock, selectors.EVENT_READ, lambda k, m, c=client: self._on_client(c, m))

    def _on_client(self, client: _Scraper, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not client.outbox:
                data = client.sock.recv(4096)
                if not data:
                    self._drop(client)
                    return
                client.inbox += data
                if b"\r\n\r\n" not in client.inbox and b"\n\n" not in client.inbox:
                    if len(client.inbox) > MAX_REQUEST:
                        self._answer(client, 431, b"request header too large\n")
                    return
                self._respond(client)
            if client.outbox:
                sent = client.sock.send(client.outbox)
                client.outbox = client.outbox[sent:]
                if not client.outbox:
                    self._drop(client)
                elif self.sel.get_key(client.sock).events != selectors.EVENT_WRITE:
                    self.sel.modify(client.sock, selectors.EVENT_WRITE, self.sel.get_key(client.sock).data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)

    def _respond(self, client: _Scraper) -> None:
        line = client.inbox.split(b"\n", 1)[0].strip().split(b" ")
        if len(line) != 3 or not line[2].startswith(b"HTTP/"):
            self._answer(client, 400, b"bad request\n")
        elif line[0] not in (b"GET", b"HEAD"):
            self._answer(client, 405, b"only GET\n")
        elif line[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            self._answer(client, 404, b"the metrics are at /metrics\n")
        else:
            body = self.render()
            self._answer(client, 200, b"" if line[0] == b"HEAD" else body, CONTENT_TYPE_LATEST, len(body))

    def _answer(self, client: _Scraper, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                length: int | None = None) -> None:  # fmt: skip
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]  # fmt: skip
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
        client.outbox = head.encode() + body

    def _drop(self, client: _Scraper) -> None:
        self.clients.pop(client.sock, None)
        self._unregister(client.sock)
        client.sock.close()

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
