"""Recipient verification through real Postfix and defang (filters/examples/verify_recipients.py).

The relay (a private Postfix with defang as its milter) forwards to the next hop, a
second private Postfix that knows its users (``relay_recipient_maps``) and delivers to a
sink; defang's ``[verify]`` asks that next hop at RCPT time.  An unknown user is refused
with 550 5.1.1 at RCPT, before DATA; a known one is delivered through both; a next hop that
is down gives the configured 451 4.4.3.
"""

from __future__ import annotations

import time

import pytest
from daemon import REPO
from mta import Stack, needs_postfix, wait_for
from nexthop import NextHop, closed_port

pytestmark = [pytest.mark.integration, needs_postfix]

FILTER = REPO / "filters" / "examples" / "verify_recipients.py"


def msg(tag: str) -> bytes:
    return (f"From: a@example.com\r\nTo: x@example.org\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}.{time.monotonic_ns()}@example.com>\r\n\r\nhello\r\n").encode()  # fmt: skip


@pytest.fixture(scope="module")
def relay():
    with NextHop() as hop:
        stack = Stack(FILTER, settings={"verify": {"host": "127.0.0.1", "port": hop.port, "timeout": 10}})
        stack.postfix.relay_port = hop.port  # the relay's mail goes to the next hop, as in production
        with stack:
            yield stack, hop


def test_unknown_user_gets_550_at_rcpt_before_data(relay):
    stack, hop = relay
    r = stack.send(msg("unknown-only"), rcpts=("nobody@example.org",))
    code, text = r.rcpts["nobody@example.org"]
    assert (code, text.split()[0]) == (550, "5.1.1") and "User unknown" in text
    assert r.data is None  # no recipient left: DATA never sent


def test_known_user_delivered_unknown_refused_in_one_transaction(relay):
    stack, hop = relay
    data = msg("known-and-unknown")
    r = stack.send(data, rcpts=("bob@example.org", "ghost@example.org", "carol@example.org"))
    assert r.rcpts["ghost@example.org"][0] == 550 and r.accepted
    assert r.accepted_rcpts == ["bob@example.org", "carol@example.org"]
    subject = b"Subject: known-and-unknown"
    got = wait_for("delivery via the next hop", lambda: [m for m in hop.sink.messages() if subject in m.raw])
    assert sorted(got[0].rcpts) == ["bob@example.org", "carol@example.org"]
    # asked again (from the cache): the same answers
    again = stack.send(msg("again"), rcpts=("bob@example.org", "ghost@example.org"))
    assert (again.rcpts["ghost@example.org"][0], again.accepted) == (550, True)
    stack.defang.wait_log("verify <ghost@example.org>: unknown (cached: 550 5.1.1")


def test_a_huge_address_is_refused_and_never_probed(relay):
    stack, hop = relay
    huge = "q" * 400 + "@example.org"
    r = stack.send(msg("huge"), rcpts=(huge, "bob@example.org"))
    code, text = r.rcpts[huge]
    assert (code, text.split()[0]) == (553, "5.1.3") and r.accepted
    assert "q" * 400 not in hop.postfix.log_text()


def test_next_hop_down_gives_the_configured_4xx():
    with Stack(FILTER, settings={"verify": {"host": "127.0.0.1", "port": closed_port()}}) as stack:
        r = stack.send(msg("down"), rcpts=("bob@example.org",))
        code, text = r.rcpts["bob@example.org"]
        assert (code, text.split()[0]) == (451, "4.4.3") and r.data is None
        # another domain is not asked: it passes
        assert stack.send(msg("other"), rcpts=("x@else.example",)).accepted
