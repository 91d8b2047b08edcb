"""The sans-IO wire format: framing, limits, garbage."""

import struct

import pytest

from defang import protocol


def test_round_trip_one_frame_at_a_time():
    dec = protocol.FrameDecoder()
    obj = {"v": 1, "op": "eom", "queue_id": "4Xyz", "recipients": ["a@b.example"], "n": "ü"}
    assert [protocol.decode_body(b) for b in dec.feed(protocol.encode(obj))] == [obj]
    assert dec.pending == 0


def test_frames_split_and_joined_arbitrarily():
    objs = [{"v": 1, "op": "hello", "i": i, "pad": "x" * i} for i in range(50)]
    stream = b"".join(protocol.encode(o) for o in objs)
    dec = protocol.FrameDecoder()
    got = []
    for i in range(0, len(stream), 7):  # 7-byte pieces cut through headers and bodies
        got += [protocol.decode_body(b) for b in dec.feed(stream[i : i + 7])]
    assert got == objs


def test_oversized_length_is_refused_before_buffering():
    dec = protocol.FrameDecoder(max_frame_size=1024)
    with pytest.raises(protocol.ProtocolError, match="exceeds max_frame_size 1024"):
        dec.feed(struct.pack(">I", 1025) + b"{")


def test_garbage_length_prefix_is_a_protocol_error():
    dec = protocol.FrameDecoder(max_frame_size=1 << 20)
    with pytest.raises(protocol.ProtocolError):
        dec.feed(b"GET / HTTP/1.1\r\n\r\n")  # "GET " read as a length of ~1.2 GB


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b"\xff\xfe", b"42"])
def test_body_must_be_a_json_object(body):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_body(body)


def test_request_version_and_op_are_checked():
    assert protocol.check_request({"v": 1, "op": "eom"}) == "eom"
    with pytest.raises(protocol.ProtocolError, match="version"):
        protocol.check_request({"v": 2, "op": "eom"})
    with pytest.raises(protocol.ProtocolError, match="unknown op"):
        protocol.check_request({"v": 1, "op": "format_disk"})


def test_surrogate_escaped_text_survives_the_wire():
    # 8-bit header bytes reach the front end as surrogate escapes; they must not crash encode
    text = b"caf\xe9".decode("utf-8", "surrogateescape")
    body = protocol.encode({"v": 1, "op": "mail", "sender": text})[4:]
    assert protocol.decode_body(body)["sender"] == text


def test_error_reply_shape():
    r = protocol.error_reply("451", "4.3.2", "defang busy, try again later", "busy")
    assert r["verdict"] == {"action": "tempfail", "code": "451", "dsn": "4.3.2",
                            "text": "defang busy, try again later"}
    assert r["error"] == "busy" and r["actions"] == []
