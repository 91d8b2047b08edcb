"""Every message defang's processes send each other, typed, with its encoding.

Sans-IO: classes and pure encode/decode functions; the I/O loops read and write bytes.
One module for all four channels, so that a message has one definition and one codec:

=====================  ==============================================================
channel                messages
=====================  ==============================================================
front end ->           ``Hello``; the decision requests ``Connect``, ``Helo``, ``Mail``,
multiplexor -> worker  ``Rcpt``, ``EndOfMessage`` (the multiplexor forwards a decision
                       request's bytes to a worker unchanged)
worker -> multiplexor  ``WorkerReady``, ``WorkerBootFailed``, ``Reply`` (forwarded to
-> front end           the front end unchanged); the multiplexor answers ``Hello`` with
                       ``HelloReply`` and makes a ``Reply`` of its own when no worker
                       could decide (``Reply.error`` says why)
multiplexor <-> zygote ``Spawn`` (+ the worker's socket, SCM_RIGHTS); ``ZygoteReady``,
                       ``LoadFailed``, ``Spawned``, ``Exited``
defangctl <->          ``ControlRequest``; ``Status`` or ``ControlResult``
multiplexor
=====================  ==============================================================

A message is a dataclass whose fields are its wire form: one JSON object,
``{"v": VERSION, "op": ..., fields...}``, UTF-8 with lone surrogates kept (header bytes
that are not UTF-8 travel as surrogate escapes), coded by the fields' annotations
(``defang.core.codec``): a new field is one line in its class.  JSON, not pickle: an
explicit schema, nothing a worker could smuggle to the daemons, readable in a packet
dump.  Stream sockets carry it in a frame (``defang.core.framing``), the zygote's
SEQPACKET socket bare.  Another version, an unknown op, a missing field or a field of the
wrong type is a ``ProtocolError`` naming it, never an exception of another kind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from defang.core import codec
from defang.core.framing import ProtocolError, frame
from defang.core.verdicts import ACTIONS as VERDICT_ACTIONS
from defang.core.verdicts import Verdict, for_reply

VERSION = 2

#: message actions a Reply may carry: name -> number of arguments after the name.  The
#: front end applies them in order at end of message.
ACTIONS: dict[str, int] = {
    "add_header": 2,  # name, value
    "insert_header": 3,  # index (0 = top), name, value
    "change_header": 3,  # name, value, index (1-based among headers of that name)
    "delete_header": 2,  # name, index (1-based)
    "add_recipient": 2,  # address, esmtp args (str or None)
    "delete_recipient": 1,  # address
    "change_sender": 2,  # address, esmtp args (str or None)
    "hold": 1,  # reason (MTA hold queue)
    "replace_body": 1,  # path of a file holding the new body
}

#: The header the front end adds for each refusal monitor mode noted (``Reply.would``).
WOULD_HEADER = "X-Defang-Would"

#: A worker that rebuilds a message's body writes it beside the spool file, with this suffix,
#: and names it in a ``replace_body`` action; the front end streams it to the MTA and removes it.
NEW_BODY_SUFFIX = ".new"


# --- the messages: shared pieces --------------------------------------------------------


@dataclass(slots=True)
class ConnInfo:
    """One SMTP connection as the front end knows it, sent with every decision request.

    ``notes`` is the filter's ``conn.notes``: it comes back in each ``Reply`` and goes
    out again with the next request, since the next decision may go to another worker.
    """

    id: str | int = ""
    ip: str = ""
    hostname: str = ""
    port: int = 0
    helo: str = ""
    macros: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class WorkerStatus:
    id: int
    pid: int
    gen: int
    state: str
    served: int
    rss: int | None = None
    queue_id: str | None = None
    op: str | None = None
    busy_for: float | None = None


# --- front end -> multiplexor -> worker -----------------------------------------------------


@dataclass(slots=True)
class Hello:
    """Which filter generation runs and which hooks it defines (answered by the multiplexor)."""

    OP: ClassVar[str] = "hello"


@dataclass(slots=True)
class Connect:
    """SMTP connect: for ``filter_relay``.  (Every decision request has ``conn``,
    ``queue_id``, ``esmtp_args`` (MAIL FROM's) and ``rcpt_args``.)"""

    OP: ClassVar[str] = "connect"
    conn: ConnInfo
    queue_id: ClassVar[str] = ""
    esmtp_args: ClassVar[list[str]] = []
    rcpt_args: ClassVar[list[str]] = []


@dataclass(slots=True)
class Helo(Connect):
    """HELO/EHLO (the name is in ``conn.helo``): for ``filter_helo``."""

    OP: ClassVar[str] = "helo"


@dataclass(slots=True)
class Mail:
    """MAIL FROM: for ``filter_sender``; ``args`` are its ESMTP arguments."""

    OP: ClassVar[str] = "mail"
    conn: ConnInfo
    sender: str
    args: list[str] = field(default_factory=list)
    queue_id: ClassVar[str] = ""
    rcpt_args: ClassVar[list[str]] = []

    @property
    def esmtp_args(self) -> list[str]:
        return self.args


@dataclass(slots=True)
class Rcpt:
    """RCPT TO: for ``filter_recipient``; ``args`` are this recipient's ESMTP arguments."""

    OP: ClassVar[str] = "rcpt"
    conn: ConnInfo
    recipient: str
    sender: str = ""
    sender_args: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    queue_id: ClassVar[str] = ""

    @property
    def esmtp_args(self) -> list[str]:
        return self.sender_args

    @property
    def rcpt_args(self) -> list[str]:
        return self.args


@dataclass(slots=True)
class EndOfMessage:
    """End of message: for the message hooks.  ``spool`` is the path of the spooled
    message (header section, empty line, body; CRLF line ends).  ``recipient_args``: each
    recipient's RCPT TO arguments joined by spaces (an esmtp-value has none: RFC 5321)."""

    OP: ClassVar[str] = "eom"
    conn: ConnInfo
    spool: str
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    queue_id: str = ""
    size: int = 0
    sender_args: list[str] = field(default_factory=list)
    policy: str | None = None  # the recipients' policy group (defang.core.transaction)
    recipient_args: list[str] = field(default_factory=list)
    rcpt_args: ClassVar[list[str]] = []

    def __post_init__(self) -> None:
        if not self.spool:
            raise ValueError("the spool path is empty")

    @property
    def esmtp_args(self) -> list[str]:
        return self.sender_args


DecisionRequest = Connect | Helo | Mail | Rcpt | EndOfMessage


@dataclass(slots=True)
class Tick:
    """The multiplexor's periodic job for one worker: ``filter_tick(n)`` (multiplexor/ticks.py)."""

    OP: ClassVar[str] = "tick"
    n: int
    queue_id: ClassVar[str] = ""


# --- what the multiplexor reads of what it forwards (bytes unchanged; both ends read every
# field): only what it routes, logs and counts by.  Decoding all of an end-of-message
# request and its reply there cost it a third more CPU per message.


@dataclass(slots=True)
class ConnId:
    id: str | int = ""


@dataclass(slots=True)
class Routed:
    """A decision request as the multiplexor reads it."""

    op: str
    conn: ConnId
    queue_id: str = ""


@dataclass(slots=True)
class VerdictAction:
    action: str


@dataclass(slots=True)
class RoutedReply:
    """A worker's reply as the multiplexor reads it."""

    OP: ClassVar[str] = "reply"
    verdict: VerdictAction
    error: str | None = None
    rss: int = 0
    would: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    checks: list[str] = field(default_factory=list)
    actions: list[list[Any]] = field(default_factory=list)


# --- replies ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    """The answer to a decision request.

    ``notes`` is the filter's ``conn.notes`` after the hook (None: keep what was sent).
    ``error`` says why a daemon answered instead of the filter, or what went wrong in
    the filter.  ``gen`` is the filter generation that decided (0 when no worker did);
    ``rss`` the worker's resident size after it, when the multiplexor asked for it.
    ``would``: the refusals monitor mode noted instead of carrying them out (the front
    end stamps them on the message, ``WOULD_HEADER``); ``tags``: what the filter named
    as having fired; ``policy``: filter_recipient's ``conn.policy()``; ``pid``, ``elapsed``:
    the worker and its seconds in the filter; ``checks``: the scanners' outcomes
    (``"spamassassin:spam 7.1/5.0"``, ``scanning.outcome``).
    """

    OP: ClassVar[str] = "reply"
    SPARSE: ClassVar[tuple[str, ...]] = ("error", "rss", "would", "tags", "policy", "pid", "elapsed",
                                         "checks")  # left out unset
    verdict: Verdict
    actions: list[list[Any]] = field(default_factory=list)
    notes: dict[str, Any] | None = None
    error: str | None = None
    gen: int = 0
    rss: int = 0
    would: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    policy: str | None = None
    pid: int = 0
    elapsed: float = 0.0
    checks: list[str] = field(default_factory=list)


@dataclass(slots=True)
class HelloReply:
    OP: ClassVar[str] = "hello"
    gen: int
    hooks: list[str]


# --- worker -> multiplexor ---------------------------------------------------------------------


@dataclass(slots=True)
class WorkerReady:
    """The worker ran ``filter_initialize`` and takes requests; ``rss`` after booting."""

    OP: ClassVar[str] = "ready"
    pid: int
    gen: int
    rss: int = 0


@dataclass(slots=True)
class WorkerBootFailed:
    OP: ClassVar[str] = "boot_failed"
    pid: int
    error: str


# --- multiplexor <-> zygote --------------------------------------------------------------------


@dataclass(slots=True)
class Spawn:
    """Fork worker ``wid``; its end of a socketpair travels with the packet."""

    OP: ClassVar[str] = "spawn"
    wid: int


@dataclass(slots=True)
class ZygoteReady:
    """filter.py imported; these are its hooks."""

    OP: ClassVar[str] = "ready"
    pid: int
    hooks: list[str]


@dataclass(slots=True)
class LoadFailed:
    """filter.py did not import; ``error`` is the ``file:line: Type: message`` line."""

    OP: ClassVar[str] = "load_failed"
    error: str


@dataclass(slots=True)
class Spawned:
    OP: ClassVar[str] = "spawned"
    wid: int
    pid: int


@dataclass(slots=True)
class Exited:
    """A worker the zygote forked has exited; ``status`` as ``waitpid`` gave it."""

    OP: ClassVar[str] = "exited"
    pid: int
    status: int


# --- defangctl <-> multiplexor -------------------------------------------------------------------


@dataclass(slots=True)
class ControlRequest:
    OP: ClassVar[str] = "control"
    COMMANDS: ClassVar[frozenset[str]] = frozenset({"status", "reload"})
    command: str

    def __post_init__(self) -> None:
        if self.command not in self.COMMANDS:
            raise ValueError(f"unknown command {self.command!r}")


@dataclass(slots=True)
class ControlResult:
    """The answer to a reload (or to a control request that could not be read)."""

    OP: ClassVar[str] = "result"
    ok: bool
    error: str | None = None
    gen: int | None = None
    hooks: list[str] | None = None
    config: dict[str, Any] | None = None  # a reload's lines: changed, restart, warnings (reconfig.py)


@dataclass(slots=True)
class Status:
    """``defangctl status``: the pool, the queue, and the multiplexor's counters
    (``defang.multiplexor.stats.Stats.snapshot`` makes those from ``verdicts`` on)."""

    OP: ClassVar[str] = "status"
    pid: int
    uptime: float
    generation: int
    filter: str
    hooks: list[str]
    workers: list[WorkerStatus]
    queue: dict[str, int]  # depth, size
    pool: dict[str, int]  # min_workers, max_workers, min_spare
    spawn_failures: int
    last_load_error: str | None
    verdicts: dict[str, Any]
    requests: dict[str, Any]
    events: dict[str, Any]
    messages_per_second: dict[str, Any]
    latency_ms: dict[str, Any]
    histogram: dict[str, Any]
    would: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the last few, newest last (defangctl top)
    ok: bool = True


# --- the codec ------------------------------------------------------------------------------------


#: the verdicts without a reply, made once: most replies carry one of them
_PLAIN = {action: Verdict(action) for action in VERDICT_ACTIONS}


def _verdict(value: Any) -> Verdict:
    if type(value) is not dict or value.get("action") not in VERDICT_ACTIONS:
        raise TypeError(f"{str(value)[:80]!r} is not a verdict")
    code, dsn, text = value.get("code"), value.get("dsn"), value.get("text")
    if code is None and dsn is None and text is None:
        return _PLAIN[value["action"]]
    for key, v in (("code", code), ("dsn", dsn), ("text", text)):
        if v is not None and type(v) is not str:
            raise TypeError(f"has a {key} that is a {type(v).__name__}")
    return Verdict(value["action"], code, dsn, text)


def verdict_to_wire(v: Verdict) -> dict[str, Any]:
    return {"action": v.action, "code": v.code, "dsn": v.dsn, "text": v.text}


def _actions(value: Any) -> list[list[Any]]:
    if type(value) is not list:
        raise TypeError("is not a list")
    for action in value:
        if type(action) is not list or not action or ACTIONS.get(action[0]) != len(action) - 1:
            raise TypeError(f"holds a malformed action {str(action)[:80]!r}")
        for a in action:
            if a is not None and type(a) is not str and type(a) is not int:
                raise TypeError(f"holds a {action[0]} action with an argument that is not text")
    return value


def _port(value: Any) -> int:
    if type(value) is str:
        return int(value) if value.isdigit() else 0
    return codec.kind(int)(value)


_CODEC = codec.FieldCodec(
    records=(ConnInfo, WorkerStatus, ConnId, VerdictAction),
    types={"Verdict": (_verdict, verdict_to_wire), "list[list[Any]]": (_actions, None)},
    special={(ConnInfo, "port"): _port},
)


Message = Any  # any of the message classes above (each has an OP)


def _by_op(*classes: type) -> dict[str, Any]:
    return {cls.OP: cls for cls in classes}


#: what each side may receive, by op
REQUESTS = _by_op(Hello, Connect, Helo, Mail, Rcpt, EndOfMessage, Tick)
DECISION_OPS = frozenset(op for op in REQUESTS if op not in (Hello.OP, Tick.OP))  # what the front end asks
FROM_WORKER = _by_op(WorkerReady, WorkerBootFailed, Reply)
TO_FRONT_END = _by_op(Reply, HelloReply)
TO_ZYGOTE = _by_op(Spawn)
FROM_ZYGOTE = _by_op(ZygoteReady, LoadFailed, Spawned, Exited)
TO_CONTROL = _by_op(ControlRequest)
FROM_CONTROL = _by_op(ControlResult, Status)
ROUTED_REQUESTS = {**{op: Routed for op in DECISION_OPS}, Hello.OP: Hello}
ROUTED_FROM_WORKER = _by_op(WorkerReady, WorkerBootFailed, RoutedReply)
# made at import (8 ms), not on first use: after a fork, each process would make its own
_CODEC.prepare(cls for table in (REQUESTS, FROM_WORKER, TO_FRONT_END, TO_ZYGOTE, FROM_ZYGOTE, TO_CONTROL,
                                 FROM_CONTROL, ROUTED_REQUESTS, ROUTED_FROM_WORKER) for cls in table.values())

# Made once: ``json.dumps`` with arguments makes an encoder per call (as dear as the call).
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_decode_json = json.JSONDecoder().decode


def to_wire(msg: Message) -> dict[str, Any]:
    """The JSON object of ``msg``, with its version and op."""
    obj = _CODEC.to_fields(msg)
    obj["v"] = VERSION
    obj["op"] = msg.OP
    return obj


def encode_body(msg: Message) -> bytes:
    """The JSON body of ``msg`` (a packet on the zygote's socket, a frame's body elsewhere)."""
    return _encode_json(to_wire(msg)).encode("utf-8", "surrogatepass")


def encode(msg: Message) -> bytes:
    """One frame holding ``msg``."""
    return frame(encode_body(msg))


def decode(body: bytes, accepted: Mapping[str, Any]) -> Any:
    """The message in ``body``, one of ``accepted`` (a table such as ``REQUESTS``)."""
    try:
        # UTF-8, as encode writes it (json.loads would first guess among UTF-8/16/32)
        obj = _decode_json(body.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if type(obj) is not dict:
        raise ProtocolError("not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r} (want {VERSION})")
    op = obj.get("op")
    cls = accepted.get(op) if type(op) is str else None
    if cls is None:
        raise ProtocolError(f"unexpected op {op!r}")
    try:
        return _CODEC.from_fields(cls, obj)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{op}: {exc}") from None


def error_reply(code: str, dsn: str, text: str, error: str) -> Reply:
    """A reply made by a daemon (not a worker) when no worker could decide."""
    return Reply(for_reply(code, dsn, text), error=error)
