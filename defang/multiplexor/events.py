"""What happens to the pool (events) and what the pool wants done (commands).

The multiplexor's loop (``defang.multiplexor.daemon``) turns what it reads, and the
clock, into events for the pool (``defang.multiplexor.pool``), and carries out the
commands the pool answers with.  Both are plain records: no sockets, no processes.
Workers, zygotes and generations are named by number (``wid``, ``gen``), processes by
pid; ``client`` is the loop's own handle for whoever waits for an answer, which the pool
never looks into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from defang.core.config import Config, ReplySpec
from defang.core.reconfig import Reconfig
from defang.core.wire import ControlResult

#: a worker's states, as ``defangctl status`` shows them: spawn asked for, ready for a
#: job, on a job, told to go
BOOTING, IDLE, BUSY, STOPPING = "booting", "idle", "busy", "stopping"


@dataclass(eq=False, slots=True)
class Job:
    """A decision request from the front end, from arrival to answer.

    The loop sets ``client`` to None when the front end's connection goes away: the
    answer, if any, then goes nowhere (and a queued job is skipped).
    """

    client: Any
    body: bytes  # the request's frame body, forwarded to a worker as it came
    op: str
    queue_id: str
    conn_id: str
    enqueued: float
    started: float = 0.0


# --- events ---------------------------------------------------------------------------


@dataclass(slots=True)
class RequestReceived:
    job: Job


@dataclass(slots=True)
class ZygoteLoaded:
    gen: int
    hooks: list[str]


@dataclass(slots=True)
class ZygoteLoadFailed:
    gen: int
    error: str


@dataclass(slots=True)
class ZygoteLost:
    """The zygote's socket closed without being asked to; ``status``: its exit, if known."""

    gen: int
    status: int | None = None


@dataclass(slots=True)
class WorkerSpawned:
    gen: int
    wid: int
    pid: int


@dataclass(slots=True)
class SpawnFailed:
    """The zygote did not take the spawn request for ``wid`` (its socket broke)."""

    wid: int
    why: str


@dataclass(slots=True)
class WorkerExited:
    pid: int
    status: int  # as waitpid gives it


@dataclass(slots=True)
class WorkerReady:
    wid: int
    pid: int
    rss: int


@dataclass(slots=True)
class WorkerBootFailed:
    wid: int
    pid: int
    error: str


@dataclass(slots=True)
class WorkerReplied:
    """A worker's reply: ``body`` goes to the client as it is; the rest is what the pool
    reads of it."""

    wid: int
    body: bytes
    action: str
    error: str | None = None
    rss: int = 0
    would: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    checks: list[str] = field(default_factory=list)
    actions: list[list[Any]] = field(default_factory=list)


@dataclass(slots=True)
class WorkerLost:
    """The worker's socket closed, broke, or carried garbage (then ``kill``: it is KILLed)."""

    wid: int
    why: str
    kill: bool = False


@dataclass(slots=True)
class ReloadRequested:
    waiter: Any = None  # a control client waiting for the reload's outcome, or None (SIGHUP)
    # the config as re-read (the loop reads the file); None: the running one, unchanged
    reconfig: Reconfig | None = None
    warnings: tuple[str, ...] = ()  # about the re-read config (timeouts that do not fit)


@dataclass(slots=True)
class StopRequested:
    fast: bool


@dataclass(slots=True)
class Tick:
    """Time passed: queue and busy deadlines, kills past their grace, the pool's size."""


Event = (RequestReceived | ZygoteLoaded | ZygoteLoadFailed | ZygoteLost | WorkerSpawned
         | SpawnFailed | WorkerExited | WorkerReady | WorkerBootFailed | WorkerReplied | WorkerLost
         | ReloadRequested | StopRequested | Tick)  # fmt: skip


# --- commands ---------------------------------------------------------------------------


@dataclass(slots=True)
class StartZygote:
    """Fork a zygote for generation ``gen``, with the config it runs; its report comes back
    as ZygoteLoaded/-LoadFailed."""

    gen: int
    cfg: Config | None = field(default=None, compare=False)


@dataclass(slots=True)
class CloseZygote:
    """Close the zygote's socket: it exits once its workers have (it reaps them)."""

    gen: int


@dataclass(slots=True)
class Spawn:
    """Ask zygote ``gen`` for worker ``wid``, handing it one end of a new socketpair."""

    gen: int
    wid: int


@dataclass(slots=True)
class Send:
    """Send the job's request to worker ``wid``."""

    wid: int
    job: Job


@dataclass(slots=True)
class CloseWorker:
    """Close the worker's socket: an idle worker exits on EOF (after filter_cleanup)."""

    wid: int


@dataclass(slots=True)
class Signal:
    """Send ``signal`` to the worker's process group."""

    pid: int
    signal: int


@dataclass(slots=True)
class Answer:
    """Send the client a worker's reply (``body``), or ``spec`` with ``error`` if none."""

    job: Job
    body: bytes | None = None
    spec: ReplySpec | None = None
    error: str = ""


@dataclass(slots=True)
class AnswerControl:
    waiter: Any
    result: ControlResult


@dataclass(slots=True)
class ConfigApplied:
    """A reload took over: the pool runs with ``cfg`` from now on (the loop sets the log level)."""

    cfg: Config


@dataclass(slots=True)
class CloseListeners:
    """Stop accepting connections (a graceful stop has begun)."""


@dataclass(slots=True)
class Stopped:
    """Everything is answered and told to go: the loop may wait for its zygotes and exit."""

    zygotes: list[int] = field(default_factory=list)


Command = (StartZygote | CloseZygote | Spawn | Send | CloseWorker | Signal | Answer | AnswerControl
           | ConfigApplied | CloseListeners | Stopped)  # fmt: skip
