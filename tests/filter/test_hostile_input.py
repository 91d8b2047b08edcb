"""Property tests (hypothesis) for every decoder that reads bytes from outside.

The promise each one keeps: whatever arrives, only the documented error type comes out
(``ProtocolError`` for the wire, none at all for the MIME walk: a message always gets a
verdict), and nothing is held beyond the frame limit.  ``scripts/test`` runs the
``defang`` profile (a fixed number of examples, derandomized: the same every run);
``scripts/test -k hostile --hypothesis-profile=deep`` runs many more.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.core import wire
from defang.core.framing import FrameDecoder, ProtocolError, frame
from defang.workers.mime.text import decode_words, raw_param

settings.register_profile("defang", max_examples=150, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("deep", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.load_profile("defang")

TABLES = {name: getattr(wire, name) for name in ("REQUESTS", "FROM_WORKER", "TO_FRONT_END", "TO_ZYGOTE",
                                                 "FROM_ZYGOTE", "TO_CONTROL", "FROM_CONTROL",
                                                 "ROUTED_REQUESTS", "ROUTED_FROM_WORKER")}  # fmt: skip
OPS = sorted({op for table in TABLES.values() for op in table})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def near_messages(draw) -> bytes:
    """JSON objects that look like our messages: the right version and a real op, then
    fields of every shape, some named as real fields are."""
    names = st.sampled_from(["conn", "queue_id", "sender", "recipients", "verdict", "actions", "path", "size",
                             "gen", "command", "ok", "error", "headers", "macros", "hooks", "id", "pid"])
    obj = draw(st.dictionaries(names | st.text(max_size=8), json_values, max_size=8))
    obj["v"] = draw(st.sampled_from([wire.VERSION, wire.VERSION, 0, "1", None]))
    obj["op"] = draw(st.sampled_from(OPS) | st.text(max_size=8))
    return json.dumps(obj).encode()


@given(body=st.binary(max_size=300) | near_messages(), table=st.sampled_from(sorted(TABLES)))
def test_every_wire_decoder_raises_only_protocol_error(body, table):
    try:
        msg = wire.decode(body, TABLES[table])
    except ProtocolError:
        return
    assert type(msg).OP in TABLES[table] or isinstance(msg, tuple(TABLES[table].values()))


@given(chunks=st.lists(st.binary(max_size=64), max_size=20), limit=st.integers(1, 64))
def test_the_frame_decoder_holds_no_more_than_one_frame(chunks, limit):
    dec = FrameDecoder(limit)
    for chunk in chunks:
        try:
            bodies = dec.feed(chunk)
        except ProtocolError as exc:
            assert "exceeds max_frame_size" in str(exc)
            return
        assert all(len(b) <= limit for b in bodies)
        assert len(dec._buf) < 4 + limit  # what is left: one frame, not yet complete


@given(bodies=st.lists(st.binary(max_size=40), max_size=5), cuts=st.lists(st.integers(0, 200), max_size=5))
def test_frames_cut_anywhere_come_out_whole(bodies, cuts):
    stream = b"".join(frame(b) for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec, out = FrameDecoder(64), []
    for a, b in zip(points, points[1:], strict=False):
        out += dec.feed(stream[a:b])
    assert out == bodies


encoded_word = st.builds(
    lambda cs, enc, text: f"=?{cs}?{enc}?{text}?=",
    st.sampled_from(["utf-8", "iso-8859-1", "euc-kr", "x-unknown", "", "utf-7", "gb2312"]),
    st.sampled_from(["B", "Q", "b", "q", "X", ""]),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=_?-%", max_size=30),
)
header_text = st.lists(encoded_word | st.text(max_size=20), max_size=5).map(" ".join)


@given(text=header_text)
def test_rfc2047_words_always_decode_to_text(text):
    assert isinstance(decode_words(text), str)


rfc2231 = st.lists(st.builds(
    lambda n, star, v: f"; filename{n}{star}={v}",
    st.sampled_from(["", "*0", "*1", "*2", "*x", "*99999999999"]),
    st.sampled_from(["", "*"]),
    st.sampled_from(["utf-8''%e2%82%ac.exe", "''x", "\"a b.exe\"", "%ff%fe", "iso-8859-1'en'%E9t%E9.zip",
                     "=?utf-8?B?ZXZpbC5leGU=?=", "\"unterminated", "''"]) | st.text(max_size=12),
), max_size=6).map(lambda ps: "attachment" + "".join(ps))


@given(value=rfc2231)
def test_rfc2231_parameters_always_give_text_or_none(value):
    got = raw_param(value, "filename")
    assert got is None or isinstance(got, str)


# --- the MIME walk and the rewriter: a whole message through the default filter ---------
boundaries = st.text(alphabet=string.ascii_letters + string.digits + "'()+_,-./:=? ", min_size=0, max_size=20)
ctes = st.sampled_from(["base64", "quoted-printable", "7bit", "8bit", "binary", "x-uuencode", "bogus", ""])
ctypes_ = st.sampled_from(["text/plain", "text/html", "application/octet-stream", "application/zip",
                           "message/rfc822", "application/ms-tnef", "image/gif", "message/partial",
                           "x/y", ""])
bodies = st.binary(max_size=200) | st.sampled_from([b"begin 644 evil.exe\r\nM3$%,\r\n`\r\nend\r\n",
                                                   b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAA=\r\n",
                                                   b"=3D=\r\n=ZZ=0", b"PK\x03\x04garbage"])  # fmt: skip


def _leaf(draw) -> bytes:
    ct = draw(ctypes_)
    name = draw(st.sampled_from(["", '; name="a.exe"', "; name*=utf-8''%e2%82%ac.scr",
                                 '; name="=?utf-8?Q?x?="', '; name="' + "A" * 300 + '.pif"']))  # fmt: skip
    head = f"Content-Type: {ct}{name}\r\nContent-Transfer-Encoding: {draw(ctes)}\r\n"
    if draw(st.booleans()):
        head += f"Content-Disposition: {draw(rfc2231)}\r\n"
    return head.encode() + b"\r\n" + draw(bodies)


@st.composite
def entity(draw, depth: int = 0) -> bytes:
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return _leaf(draw)
    b = draw(boundaries)
    kids = draw(st.lists(st.deferred(lambda: entity(depth + 1)), max_size=3))
    sub = draw(st.sampled_from(["mixed", "alternative", "related", "signed", "digest"]))
    out = f'Content-Type: multipart/{sub}; boundary="{b}"\r\n\r\npreamble\r\n'.encode()
    for k in kids:
        out += f"--{b}\r\n".encode() + k + b"\r\n"
    if draw(st.booleans()):  # sometimes no closing delimiter
        out += f"--{b}--\r\n".encode()
    return out


@st.composite
def messages(draw) -> bytes:
    head = b"From: =?utf-8?B?" + draw(st.sampled_from([b"w6k=", b"!!", b""])) + b"?= <a@example.org>\r\n"
    head += b"Subject: " + draw(header_text).encode("utf-8", "replace") + b"\r\nMIME-Version: 1.0\r\n"
    if draw(st.booleans()):
        head += draw(st.binary(max_size=60)).replace(b"\r\n\r\n", b"") + b"\r\n"
    return head + draw(entity())


@pytest.fixture(scope="module")
def trial():
    cfg = configmod.load(None)
    t = Trial(cfg)
    yield t
    t.close()


@settings(max_examples=60)
@given(raw=messages())
def test_any_message_gets_a_verdict_from_the_default_filter(trial, raw):
    r = trial.run(raw, Envelope(sender="a@example.org"))
    assert r.error is None, r.error
    assert r.outcome["action"] in ("continue", "accept", "reject", "tempfail", "discard")
    if r.outcome["action"] in ("reject", "tempfail"):
        assert r.outcome["code"][0] in "45"
