"""The sans-IO wire: framing and limits, every message of the four channels round trip,
and garbage answered with ProtocolError (never another exception)."""

import json
import struct

import pytest

from defang.core import wire
from defang.core.framing import FrameDecoder, ProtocolError, frame
from defang.core.verdicts import Verdict, reject

CONN = wire.ConnInfo("1f.3", "192.0.2.7", "mx.example.net", 40001, "mx.example.net",
                     {"i": "4Xyz", "{auth_authen}": "alice"}, {"seen": [1, "ü"]})  # fmt: skip

#: one of every message, each as its channel's table would accept it
MESSAGES = [
    (wire.REQUESTS, wire.Hello()),
    (wire.REQUESTS, wire.Connect(CONN)),
    (wire.REQUESTS, wire.Helo(CONN)),
    (wire.REQUESTS, wire.Mail(CONN, "a@example.org", ["SIZE=100", "BODY=8BITMIME"])),
    (wire.REQUESTS, wire.Rcpt(CONN, "b@example.org", "a@example.org", ["SIZE=100"], ["NOTIFY=NEVER"])),
    (wire.REQUESTS, wire.EndOfMessage(CONN, "/run/defang/spool/1.eml", "", ["b@example.org", "c@example.org"],
                                      "4Xyz", 2048, ["BODY=8BITMIME"])),  # fmt: skip
    (wire.TO_FRONT_END, wire.Reply(reject("No", "554", "5.7.1"), [["add_header", "X-A", "1"],
                                   ["change_sender", "x@example.org", None], ["delete_header", "X-B", 2]],
                                   {"k": "v"}, None, 3, 0)),  # fmt: skip
    (wire.TO_FRONT_END, wire.Reply(Verdict("continue"), [], None, "busy", 0, 0)),
    (wire.TO_FRONT_END, wire.Reply(Verdict("continue"), [], None, None, 2, 0, tags=["t"], pid=77,
                                   elapsed=0.25, checks=["clamav:clean clean"])),  # fmt: skip
    (wire.REQUESTS, wire.Tick(3)),
    (wire.TO_FRONT_END, wire.HelloReply(2, ["filter_end", "filter_sender"])),
    (wire.FROM_WORKER, wire.WorkerReady(4242, 2, 9_000_000)),
    (wire.FROM_WORKER, wire.WorkerBootFailed(4242, "filter_initialize raised")),
    (wire.FROM_WORKER, wire.Reply(Verdict("accept"), [], {}, None, 2, 12_000_000)),
    (wire.TO_ZYGOTE, wire.Spawn(17)),
    (wire.FROM_ZYGOTE, wire.ZygoteReady(4000, ["filter_end"])),
    (wire.FROM_ZYGOTE, wire.LoadFailed("/etc/defang/filter.py:3: SyntaxError: invalid syntax")),
    (wire.FROM_ZYGOTE, wire.Spawned(17, 4243)),
    (wire.FROM_ZYGOTE, wire.Exited(4243, 9)),
    (wire.TO_CONTROL, wire.ControlRequest("status")),
    (wire.TO_CONTROL, wire.ControlRequest("reload")),
    (wire.FROM_CONTROL, wire.ControlResult(True, gen=3, hooks=["filter_end"])),
    (wire.FROM_CONTROL, wire.ControlResult(False, error="x.py:1: SyntaxError")),
    (wire.FROM_CONTROL, wire.Status(
        7, 12.5, 2, "/etc/defang/filter.py", ["filter_end"],
        [wire.WorkerStatus(1, 4242, 2, "busy", 10, 9_000_000, "4Xyz", "eom", 0.25),
         wire.WorkerStatus(2, 0, 2, "booting", 0)],
        {"depth": 0, "size": 200}, {"min_workers": 2, "max_workers": 10, "min_spare": 1}, 0, None,
        verdicts={"accept": 3}, requests={"eom": 3}, events={}, messages_per_second={"1m": 0.05},
        latency_ms={"p50": 1.0}, histogram={"bounds_ms": [1.0], "counts": [3, 0]})),
]


@pytest.mark.parametrize(("table", "msg"), MESSAGES, ids=lambda m: getattr(type(m), "OP", ""))
def test_every_message_round_trips(table, msg):
    body = wire.encode_body(msg)
    assert wire.decode(body, table) == msg
    assert FrameDecoder().feed(wire.encode(msg)) == [body]


def test_every_channel_table_is_covered():
    covered = {(id(table), type(msg)) for table, msg in MESSAGES}
    tables = (wire.REQUESTS, wire.TO_FRONT_END, wire.FROM_WORKER, wire.TO_ZYGOTE, wire.FROM_ZYGOTE,
              wire.TO_CONTROL, wire.FROM_CONTROL)  # fmt: skip
    assert {(id(t), cls) for t in tables for cls in t.values()} == covered


@pytest.mark.parametrize(("table", "msg"), [m for m in MESSAGES if m[0] in (wire.REQUESTS, wire.FROM_WORKER)
                                            and not isinstance(m[1], wire.Tick)],
                         ids=lambda m: getattr(type(m), "OP", ""))  # fmt: skip
def test_what_the_multiplexor_reads_of_what_it_forwards(table, msg):
    body = wire.encode_body(msg)
    routed = wire.decode(body, wire.ROUTED_FROM_WORKER if table is wire.FROM_WORKER else wire.ROUTED_REQUESTS)
    if isinstance(msg, wire.Reply):
        assert (routed.verdict.action, routed.error, routed.rss) == (msg.verdict.action, msg.error, msg.rss)
    elif isinstance(msg, wire.DecisionRequest):
        assert (routed.op, routed.queue_id, routed.conn.id) == (msg.OP, msg.queue_id, msg.conn.id)
    else:
        assert routed == msg


def test_a_tick_is_the_multiplexors_own_the_front_end_cannot_send_one():
    with pytest.raises(wire.ProtocolError, match="unexpected op 'tick'"):
        wire.decode(wire.encode_body(wire.Tick(1)), wire.ROUTED_REQUESTS)


def test_the_multiplexor_refuses_what_is_no_request_at_all():
    for bad in (b"[]", _body(op="eom"), _body(op="eom", conn={"id": []}), _body(op="reply", verdict={})):
        with pytest.raises(ProtocolError):
            wire.decode(bad, wire.ROUTED_REQUESTS)


def test_decision_ops_are_the_hook_table_s():
    from defang.core import hooks

    assert {h.request.OP for h in hooks.HOOKS if h.stage} == wire.DECISION_OPS
    assert {h.request.OP for h in hooks.HOOKS if h.request and not h.stage} == {wire.Tick.OP}


# --- framing ----------------------------------------------------------------------------


def test_frames_split_and_joined_arbitrarily():
    msgs = [wire.Mail(CONN, f"{i}@example.org", ["X" * i]) for i in range(50)]
    stream = b"".join(wire.encode(m) for m in msgs)
    dec = FrameDecoder()
    got = []
    for i in range(0, len(stream), 7):  # 7-byte pieces cut through headers and bodies
        got += [wire.decode(b, wire.REQUESTS) for b in dec.feed(stream[i : i + 7])]
    assert got == msgs and dec.pending == 0


def test_oversized_length_is_refused_before_buffering():
    dec = FrameDecoder(max_frame_size=1024)
    with pytest.raises(ProtocolError, match="exceeds max_frame_size 1024"):
        dec.feed(struct.pack(">I", 1025) + b"{")


def test_garbage_length_prefix_is_a_protocol_error():
    dec = FrameDecoder(max_frame_size=1 << 20)
    with pytest.raises(ProtocolError):
        dec.feed(b"GET / HTTP/1.1\r\n\r\n")  # "GET " read as a length of ~1.2 GB


# --- bad input ---------------------------------------------------------------------------


def _body(**obj):
    return json.dumps({"v": wire.VERSION, **obj}).encode()


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b"\xff\xfe", b"42", b"", b"{" * 100_000])
def test_body_must_be_a_json_object(body):
    with pytest.raises(ProtocolError):
        wire.decode(body, wire.REQUESTS)


def test_version_and_op_are_checked():
    with pytest.raises(ProtocolError, match="version"):
        wire.decode(json.dumps({"v": 1, "op": "hello"}).encode(), wire.REQUESTS)
    with pytest.raises(ProtocolError, match="unexpected op 'format_disk'"):
        wire.decode(_body(op="format_disk"), wire.REQUESTS)
    with pytest.raises(ProtocolError, match="unexpected op 'reply'"):  # the right message, the wrong channel
        wire.decode(wire.encode_body(wire.Reply(Verdict("accept"))), wire.REQUESTS)


CONN_OBJ = wire.to_wire(wire.Connect(CONN))["conn"]


@pytest.mark.parametrize(("table", "obj", "why"), [
    (wire.REQUESTS, {"op": "eom", "conn": CONN_OBJ, "sender": ""}, "field 'spool' is missing"),
    (wire.REQUESTS, {"op": "eom", "conn": CONN_OBJ, "spool": ""}, "spool path is empty"),
    (wire.REQUESTS, {"op": "eom", "conn": CONN_OBJ, "spool": "/x", "size": "big"}, "'size' is a str"),
    (wire.REQUESTS, {"op": "rcpt", "conn": CONN_OBJ, "sender": "a@b"}, "field 'recipient' is missing"),
    (wire.REQUESTS, {"op": "mail", "conn": CONN_OBJ, "sender": 7}, "'sender' is a int"),
    (wire.REQUESTS, {"op": "mail", "conn": CONN_OBJ, "sender": "a", "args": ["x", 1]}, "list of strings"),
    (wire.REQUESTS, {"op": "connect", "conn": "x"}, "field 'conn' is not an object"),
    (wire.REQUESTS, {"op": "connect", "conn": dict(CONN_OBJ, macros={"i": 1})}, "not a table of strings"),
    (wire.REQUESTS, {"op": "connect", "conn": dict(CONN_OBJ, notes=[1])}, "'notes' is a list"),
    (wire.TO_FRONT_END, {"op": "reply", "verdict": {"action": "explode"}}, "is not a verdict"),
    (wire.TO_FRONT_END, {"op": "reply", "verdict": {"action": "reject", "code": 550}}, "code that is a int"),
    (wire.TO_FRONT_END, {"op": "reply", "verdict": {"action": "accept"}, "actions": [["add_header", "X"]]},
     "malformed action"),
    (wire.TO_FRONT_END, {"op": "reply", "verdict": {"action": "accept"}, "actions": [["rm_rf", "/"]]},
     "malformed action"),
    (wire.TO_FRONT_END, {"op": "reply", "verdict": {"action": "accept"}, "actions": [["hold", {"x": 1}]]},
     "not text"),
    (wire.TO_FRONT_END, {"op": "reply", "verdict": {"action": "accept"}, "actions": "all"}, "not a list"),
    (wire.FROM_WORKER, {"op": "ready"}, "field 'pid' is missing"),
    (wire.TO_ZYGOTE, {"op": "spawn", "wid": "7"}, "'wid' is a str"),
    (wire.FROM_ZYGOTE, {"op": "exited", "pid": 1}, "field 'status' is missing"),
    (wire.TO_CONTROL, {"op": "control", "command": "format_disk"}, "unknown command"),
    (wire.FROM_CONTROL, {"op": "status", "pid": 1}, "is missing"),
])  # fmt: skip
def test_bad_fields_are_protocol_errors_that_say_which(table, obj, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode(_body(**obj), table)


def test_surrogate_escaped_text_survives_the_wire():
    # 8-bit header bytes reach the front end as surrogate escapes; they must not crash encode
    text = b"caf\xe9".decode("utf-8", "surrogateescape")
    msg = wire.Mail(CONN, text)
    assert wire.decode(wire.encode_body(msg), wire.REQUESTS).sender == text


def test_error_reply_shape():
    r = wire.error_reply("451", "4.3.2", "defang busy, try again later", "busy")
    assert wire.verdict_to_wire(r.verdict) == {"action": "tempfail", "code": "451", "dsn": "4.3.2",
                                               "text": "defang busy, try again later"}  # fmt: skip
    assert r.error == "busy" and r.actions == [] and r.notes is None
    assert wire.error_reply("554", "5.6.0", "no", "limit").verdict.action == "reject"


def test_a_frame_is_its_length_and_body():
    assert frame(b"{}") == b"\x00\x00\x00\x02{}"
