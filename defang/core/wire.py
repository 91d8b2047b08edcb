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

Encoding: one JSON object per message, ``{"v": VERSION, "op": ..., fields...}``, UTF-8
(lone surrogates kept: header bytes that are not UTF-8 travel as surrogate escapes).
JSON rather than pickle: the schema is explicit, a worker cannot smuggle arbitrary
objects to the daemons, and a frame is readable in a packet dump.  On stream sockets the
object goes inside a frame (``defang.core.framing``); the zygote's SEQPACKET socket keeps
message boundaries itself and carries the bare object.  A message of another version,
an unknown op, a missing field or a field of the wrong type is a ``ProtocolError``
naming it, never an exception of another kind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from defang.core.framing import ProtocolError, frame
from defang.core.verdicts import ACTIONS as VERDICT_ACTIONS
from defang.core.verdicts import Verdict, for_reply

__all__ = ["ProtocolError", "VERSION"]  # and the message classes below

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

#: A worker that rebuilds a message's body writes it beside the spool file, with this
#: suffix, and names it in a ``replace_body`` action; the front end streams it to the
#: MTA and removes it.
NEW_BODY_SUFFIX = ".new"

#: How a worker process ends, so that the multiplexor's log tells recycling from crashing.
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

# Made once: ``json.dumps`` with arguments builds a new encoder on every call, which
# costs as much as encoding a small request.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_decode_json = json.JSONDecoder().decode
_MISSING: Any = object()


# --- field checks: what a decoder accepts ----------------------------------------------


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = obj.get(key, default)
    if value is _MISSING:
        raise ProtocolError(f"{obj.get('op')}: field {key!r} is missing")
    if value is not default and not isinstance(value, kind):
        raise ProtocolError(f"{obj.get('op')}: field {key!r} is a {type(value).__name__}")
    return value


def _strs(obj: Mapping[str, Any], key: str) -> list[str]:
    value = obj.get(key)
    if value is None:  # absent or null: none
        return []
    if not isinstance(value, list):
        raise ProtocolError(f"{obj.get('op')}: field {key!r} is a {type(value).__name__}")
    if not all(type(v) is str for v in value):
        raise ProtocolError(f"{obj.get('op')}: field {key!r} is not a list of strings")
    return value


def _text_map(obj: Mapping[str, Any], key: str) -> dict[str, str]:
    value = _field(obj, key, dict, {})
    if not all(type(v) is str for v in value.values()):
        raise ProtocolError(f"{obj.get('op')}: field {key!r} is not a table of strings")
    return value


# --- the decision requests (front end -> multiplexor -> worker) -------------------------


@dataclass(frozen=True, slots=True)
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

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "ip": self.ip, "hostname": self.hostname, "port": self.port,
                "helo": self.helo, "macros": self.macros, "notes": self.notes}  # fmt: skip

    @classmethod
    def from_wire(cls, obj: Any) -> ConnInfo:
        if not isinstance(obj, dict):
            raise ProtocolError("conn is not an object")
        port = _field(obj, "port", (int, str), 0)
        if isinstance(port, str):
            port = int(port) if port.isdigit() else 0
        return cls(id=_field(obj, "id", (str, int), ""), ip=_field(obj, "ip", str, ""),
                   hostname=_field(obj, "hostname", str, ""), port=port, helo=_field(obj, "helo", str, ""),
                   macros=_text_map(obj, "macros"), notes=_field(obj, "notes", dict, {}))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Hello:
    """Which filter generation runs and which hooks it defines (answered by the multiplexor)."""

    OP: ClassVar[str] = "hello"

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Hello:
        return cls()


@dataclass(frozen=True, slots=True)
class Connect:
    """SMTP connect: for ``filter_relay``."""

    OP: ClassVar[str] = "connect"
    conn: ConnInfo

    esmtp_args: ClassVar[list[str]] = []
    rcpt_args: ClassVar[list[str]] = []
    queue_id: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        return {"conn": self.conn.to_wire()}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Connect:
        return cls(ConnInfo.from_wire(obj.get("conn")))


@dataclass(frozen=True, slots=True)
class Helo(Connect):
    """HELO/EHLO (the name is in ``conn.helo``): for ``filter_helo``."""

    OP: ClassVar[str] = "helo"


@dataclass(frozen=True, slots=True)
class Mail:
    """MAIL FROM: for ``filter_sender``; ``args`` are its ESMTP arguments."""

    OP: ClassVar[str] = "mail"
    conn: ConnInfo
    sender: str
    args: list[str] = field(default_factory=list)

    rcpt_args: ClassVar[list[str]] = []
    queue_id: ClassVar[str] = ""

    @property
    def esmtp_args(self) -> list[str]:
        return self.args

    def to_wire(self) -> dict[str, Any]:
        return {"conn": self.conn.to_wire(), "sender": self.sender, "args": self.args}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Mail:
        return cls(ConnInfo.from_wire(obj.get("conn")), _field(obj, "sender", str), _strs(obj, "args"))


@dataclass(frozen=True, slots=True)
class Rcpt:
    """RCPT TO: for ``filter_recipient``; ``args`` are this recipient's ESMTP arguments."""

    OP: ClassVar[str] = "rcpt"
    conn: ConnInfo
    sender: str
    recipient: str
    sender_args: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

    queue_id: ClassVar[str] = ""

    @property
    def esmtp_args(self) -> list[str]:
        return self.sender_args

    @property
    def rcpt_args(self) -> list[str]:
        return self.args

    def to_wire(self) -> dict[str, Any]:
        return {"conn": self.conn.to_wire(), "sender": self.sender, "sender_args": self.sender_args,
                "recipient": self.recipient, "args": self.args}  # fmt: skip

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Rcpt:
        return cls(ConnInfo.from_wire(obj.get("conn")), _field(obj, "sender", str, ""),
                   _field(obj, "recipient", str), _strs(obj, "sender_args"), _strs(obj, "args"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """End of message: for the message hooks.  ``spool`` is the path of the spooled
    message (header section, empty line, body; CRLF line ends)."""

    OP: ClassVar[str] = "eom"
    conn: ConnInfo
    sender: str
    recipients: list[str]
    spool: str
    queue_id: str = ""
    size: int = 0
    sender_args: list[str] = field(default_factory=list)

    rcpt_args: ClassVar[list[str]] = []

    @property
    def esmtp_args(self) -> list[str]:
        return self.sender_args

    def to_wire(self) -> dict[str, Any]:
        return {"conn": self.conn.to_wire(), "sender": self.sender, "sender_args": self.sender_args,
                "recipients": self.recipients, "queue_id": self.queue_id, "spool": self.spool,
                "size": self.size}  # fmt: skip

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> EndOfMessage:
        spool = _field(obj, "spool", str)
        if not spool:
            raise ProtocolError("eom: field 'spool' is empty")
        return cls(ConnInfo.from_wire(obj.get("conn")), _field(obj, "sender", str, ""),
                   _strs(obj, "recipients"), spool, _field(obj, "queue_id", str, ""),
                   _field(obj, "size", int, 0), _strs(obj, "sender_args"))  # fmt: skip


DecisionRequest = Connect | Helo | Mail | Rcpt | EndOfMessage


# --- replies ---------------------------------------------------------------------------


def verdict_to_wire(v: Verdict) -> dict[str, Any]:
    return {"action": v.action, "code": v.code, "dsn": v.dsn, "text": v.text}


def _verdict_from_wire(obj: Any) -> Verdict:
    if not isinstance(obj, dict) or obj.get("action") not in VERDICT_ACTIONS:
        raise ProtocolError(f"reply: verdict {str(obj)[:80]!r} is not a verdict")
    for key in ("code", "dsn", "text"):
        if not isinstance(obj.get(key), str | None):
            raise ProtocolError(f"reply: verdict {key} is a {type(obj[key]).__name__}")
    return Verdict(obj["action"], obj.get("code"), obj.get("dsn"), obj.get("text"))


def _check_actions(actions: Any) -> list[list[Any]]:
    if not isinstance(actions, list):
        raise ProtocolError("reply: actions is not a list")
    for action in actions:
        if not isinstance(action, list) or not action or ACTIONS.get(action[0]) != len(action) - 1:
            raise ProtocolError(f"reply: malformed action {str(action)[:80]!r}")
        if not all(type(a) in (str, int) or a is None for a in action):
            raise ProtocolError(f"reply: action {action[0]} has an argument that is not text")
    return actions


@dataclass(slots=True)
class Reply:
    """The answer to a decision request.

    ``notes`` is the filter's ``conn.notes`` after the hook (None: keep what was sent).
    ``error`` says why a daemon answered instead of the filter, or what went wrong in
    the filter.  ``gen`` is the filter generation that decided (0 when no worker did);
    ``rss`` the worker's resident size after it, when the multiplexor asked for it.
    """

    OP: ClassVar[str] = "reply"
    verdict: Verdict
    actions: list[list[Any]] = field(default_factory=list)
    notes: dict[str, Any] | None = None
    error: str | None = None
    gen: int = 0
    rss: int = 0

    def to_wire(self) -> dict[str, Any]:
        obj = {"verdict": verdict_to_wire(self.verdict), "actions": self.actions, "notes": self.notes,
               "gen": self.gen}  # fmt: skip
        if self.error is not None:
            obj["error"] = self.error
        if self.rss:
            obj["rss"] = self.rss
        return obj

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Reply:
        return cls(_verdict_from_wire(obj.get("verdict")), _check_actions(obj.get("actions", [])),
                   _field(obj, "notes", dict, None), _field(obj, "error", str, None),
                   _field(obj, "gen", int, 0), _field(obj, "rss", int, 0))  # fmt: skip


@dataclass(frozen=True, slots=True)
class HelloReply:
    OP: ClassVar[str] = "hello"
    gen: int
    hooks: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {"gen": self.gen, "hooks": self.hooks}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> HelloReply:
        return cls(_field(obj, "gen", int), _strs(obj, "hooks"))


# --- worker -> multiplexor ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The worker ran ``filter_initialize`` and takes requests; ``rss`` after booting."""

    OP: ClassVar[str] = "ready"
    pid: int
    gen: int
    rss: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"pid": self.pid, "gen": self.gen, "rss": self.rss}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> WorkerReady:
        return cls(_field(obj, "pid", int), _field(obj, "gen", int, 0), _field(obj, "rss", int, 0))


@dataclass(frozen=True, slots=True)
class WorkerBootFailed:
    OP: ClassVar[str] = "boot_failed"
    pid: int
    error: str

    def to_wire(self) -> dict[str, Any]:
        return {"pid": self.pid, "error": self.error}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> WorkerBootFailed:
        return cls(_field(obj, "pid", int), _field(obj, "error", str, ""))


# --- multiplexor <-> zygote ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    """Fork worker ``wid``; its end of a socketpair travels with the packet."""

    OP: ClassVar[str] = "spawn"
    wid: int

    def to_wire(self) -> dict[str, Any]:
        return {"wid": self.wid}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Spawn:
        return cls(_field(obj, "wid", int))


@dataclass(frozen=True, slots=True)
class ZygoteReady:
    """filter.py imported; these are its hooks."""

    OP: ClassVar[str] = "ready"
    pid: int
    hooks: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {"pid": self.pid, "hooks": self.hooks}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> ZygoteReady:
        return cls(_field(obj, "pid", int), _strs(obj, "hooks"))


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """filter.py did not import; ``error`` is the ``file:line: Type: message`` line."""

    OP: ClassVar[str] = "load_failed"
    error: str

    def to_wire(self) -> dict[str, Any]:
        return {"error": self.error}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> LoadFailed:
        return cls(_field(obj, "error", str, ""))


@dataclass(frozen=True, slots=True)
class Spawned:
    OP: ClassVar[str] = "spawned"
    wid: int
    pid: int

    def to_wire(self) -> dict[str, Any]:
        return {"wid": self.wid, "pid": self.pid}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Spawned:
        return cls(_field(obj, "wid", int), _field(obj, "pid", int))


@dataclass(frozen=True, slots=True)
class Exited:
    """A worker the zygote forked has exited; ``status`` as ``waitpid`` gave it."""

    OP: ClassVar[str] = "exited"
    pid: int
    status: int

    def to_wire(self) -> dict[str, Any]:
        return {"pid": self.pid, "status": self.status}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Exited:
        return cls(_field(obj, "pid", int), _field(obj, "status", int))


# --- defangctl <-> multiplexor ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlRequest:
    OP: ClassVar[str] = "control"
    command: str  # "status" or "reload"

    COMMANDS: ClassVar[frozenset[str]] = frozenset({"status", "reload"})

    def to_wire(self) -> dict[str, Any]:
        return {"command": self.command}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> ControlRequest:
        command = _field(obj, "command", str)
        if command not in cls.COMMANDS:
            raise ProtocolError(f"control: unknown command {command!r}")
        return cls(command)


@dataclass(frozen=True, slots=True)
class ControlResult:
    """The answer to a reload (or to a control request that could not be read)."""

    OP: ClassVar[str] = "result"
    ok: bool
    error: str | None = None
    gen: int | None = None
    hooks: list[str] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "gen": self.gen, "hooks": self.hooks}

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> ControlResult:
        return cls(_field(obj, "ok", bool), _field(obj, "error", str, None), _field(obj, "gen", int, None),
                   _field(obj, "hooks", list, None))  # fmt: skip


@dataclass(frozen=True, slots=True)
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

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "gen": self.gen, "state": self.state,
                "served": self.served, "rss": self.rss, "queue_id": self.queue_id, "op": self.op,
                "busy_for": self.busy_for}  # fmt: skip

    @classmethod
    def from_wire(cls, obj: Any) -> WorkerStatus:
        if not isinstance(obj, dict):
            raise ProtocolError("status: a worker is not an object")
        return cls(_field(obj, "id", int), _field(obj, "pid", int), _field(obj, "gen", int),
                   _field(obj, "state", str), _field(obj, "served", int), _field(obj, "rss", int, None),
                   _field(obj, "queue_id", str, None), _field(obj, "op", str, None),
                   _field(obj, "busy_for", (int, float), None))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Status:
    """``defangctl status``: the pool, the queue, and the multiplexor's counters.

    ``stats`` holds the counters as ``defang.multiplexor.stats.Stats.snapshot`` makes
    them (verdicts, requests, events, messages_per_second, latency_ms, histogram).
    """

    OP: ClassVar[str] = "status"
    pid: int
    uptime: float
    generation: int
    filter: str
    hooks: list[str]
    workers: list[WorkerStatus]
    queue_depth: int
    queue_size: int
    pool: dict[str, int]
    spawn_failures: int
    last_load_error: str | None
    stats: dict[str, Any]

    ok: ClassVar[bool] = True
    STATS: ClassVar[tuple[str, ...]] = ("verdicts", "requests", "events", "messages_per_second",
                                        "latency_ms", "histogram")

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "pid": self.pid, "uptime": self.uptime, "generation": self.generation,
                "filter": self.filter, "hooks": self.hooks, "workers": [w.to_wire() for w in self.workers],
                "queue": {"depth": self.queue_depth, "size": self.queue_size}, "pool": self.pool,
                "spawn_failures": self.spawn_failures, "last_load_error": self.last_load_error,
                **self.stats}  # fmt: skip

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Status:
        queue = _field(obj, "queue", dict)
        return cls(_field(obj, "pid", int), _field(obj, "uptime", (int, float)),
                   _field(obj, "generation", int), _field(obj, "filter", str), _strs(obj, "hooks"),
                   [WorkerStatus.from_wire(w) for w in _field(obj, "workers", list)],
                   _field(queue, "depth", int), _field(queue, "size", int), _field(obj, "pool", dict),
                   _field(obj, "spawn_failures", int), _field(obj, "last_load_error", str, None),
                   {key: _field(obj, key, dict) for key in cls.STATS})  # fmt: skip


# --- encoding and decoding -------------------------------------------------------------------

Message = (Hello | Connect | Helo | Mail | Rcpt | EndOfMessage | Reply | HelloReply | WorkerReady
           | WorkerBootFailed | Spawn | ZygoteReady | LoadFailed | Spawned | Exited | ControlRequest
           | ControlResult | Status)  # fmt: skip


def _by_op(*classes: type) -> dict[str, Any]:
    return {cls.OP: cls for cls in classes}


#: what each side may receive, by op
REQUESTS = _by_op(Hello, Connect, Helo, Mail, Rcpt, EndOfMessage)
DECISION_OPS = frozenset(op for op in REQUESTS if op != Hello.OP)
FROM_WORKER = _by_op(WorkerReady, WorkerBootFailed, Reply)
TO_FRONT_END = _by_op(Reply, HelloReply)
TO_ZYGOTE = _by_op(Spawn)
FROM_ZYGOTE = _by_op(ZygoteReady, LoadFailed, Spawned, Exited)
TO_CONTROL = _by_op(ControlRequest)
FROM_CONTROL = _by_op(ControlResult, Status)


def encode_body(msg: Message) -> bytes:
    """The JSON body of ``msg`` (a packet on the zygote's socket, a frame's body elsewhere)."""
    obj = msg.to_wire()
    obj["v"] = VERSION
    obj["op"] = msg.OP
    return _encode_json(obj).encode("utf-8", "surrogatepass")


def encode(msg: Message) -> bytes:
    """One frame holding ``msg``."""
    return frame(encode_body(msg))


def decode_object(body: bytes) -> dict[str, Any]:
    """The JSON object of a body, its version checked; ``ProtocolError`` if it is none."""
    try:
        # UTF-8, as encode writes it (json.loads would first guess among UTF-8/16/32)
        obj = _decode_json(body.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r} (want {VERSION})")
    return obj


def decode(body: bytes, accepted: Mapping[str, Any]) -> Any:
    """The message in ``body``, one of ``accepted`` (a table such as ``REQUESTS``)."""
    obj = decode_object(body)
    cls = accepted.get(obj.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unexpected op {obj.get('op')!r}")
    try:
        return cls.from_wire(obj)
    except (TypeError, ValueError, AttributeError) as exc:  # a field of an unforeseen shape
        raise ProtocolError(f"{obj.get('op')}: {exc}") from None


def error_reply(code: str, dsn: str, text: str, error: str) -> Reply:
    """A reply made by a daemon (not a worker) when no worker could decide."""
    return Reply(for_reply(code, dsn, text), error=error)
