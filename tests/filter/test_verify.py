"""defang.verify in process: recipients probed at a real next hop (a private Postfix that
knows its users, Postfix's smtp-sink with its fault options) and at servers that are down,
hung, trickling or talking garbage; answers kept in a real SQLite state with a clock the
test turns.  Every failure is the configured verdict, never a hang or an exception."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from mta import needs_postfix, wait_for
from nexthop import NextHop, Scripted, Silent, SinkServer, closed_port
from paths import REPO

from defang.testbed.redisd import RedisServer, redis_available
from defang.workers.api import services, verify
from defang.workers.api.conn import Connection
from defang.workers.checks.smtpverify import VerifySettings
from defang.workers.stores import state as stores
from defang.workers.stores.state import StateSettings

pytestmark = needs_postfix  # root and Postfix's programs (smtp-sink, postfix)


@pytest.fixture(scope="module")
def next_hop():
    with NextHop() as hop:
        yield hop


@pytest.fixture
def clock():
    """The state's clock, turned by the test (``clock.now += 61``)."""
    return SimpleNamespace(now=1_800_000_000.0)


def configure(tmp_path, clock, state_path=None, **verify_settings) -> None:
    settings = StateSettings(path=state_path or tmp_path / "state.sqlite3", timeout=1.0)
    services.CURRENT = services.ServiceSettings(state=settings, verify=VerifySettings(**verify_settings))
    stores.CURRENT.configure(settings, clock=lambda: clock.now)


@pytest.fixture(autouse=True)
def restore():
    saved = services.CURRENT
    yield
    stores.CURRENT.close()
    stores.CURRENT.clock = time.time
    services.CURRENT = saved


def conn() -> Connection:
    return Connection(ip="203.0.113.5", macros={"i": "Q1"})


def rcpt_lines(hop: NextHop, address: str) -> list[str]:
    """The next hop's log lines of a refused RCPT for ``address``."""
    return [line for line in hop.postfix.log_text().splitlines()
            if "reject: RCPT" in line and f"<{address}>" in line]  # fmt: skip


def test_known_user_exists_unknown_user_is_550_and_answers_are_kept(next_hop, tmp_path, clock):
    configure(tmp_path, clock, host="127.0.0.1", port=next_hop.port, timeout=10)
    known = verify.recipient(conn(), "<bob@example.org>")
    assert (known.status, known.code, known.verdict, known.cached) == ("exists", 250, None, False)
    unknown = verify.recipient(conn(), "<nobody@example.org>")
    assert (unknown.status, unknown.code, unknown.cached) == ("unknown", 550, False)
    assert "User unknown in relay recipient table" in unknown.text  # the next hop's own words
    v = unknown.verdict
    assert (v.action, v.code, v.dsn) == ("reject", "550", "5.1.1")
    assert v.text == "Recipient address rejected: User unknown"
    wait_for("the next hop's log of the refused RCPT", lambda: rcpt_lines(next_hop, "nobody@example.org"))
    # asked again: both from the state, the next hop is not asked
    again = [verify.recipient(conn(), a) for a in ("bob@example.org", "nobody@example.org")]
    assert [(r.status, r.cached) for r in again] == [("exists", True), ("unknown", True)]
    assert again[1].verdict.code == "550" and again[1].code == 550
    assert len(rcpt_lines(next_hop, "nobody@example.org")) == 1


def test_answers_expire_after_their_ttls(next_hop, tmp_path, clock):
    configure(tmp_path, clock, host="127.0.0.1", port=next_hop.port, positive_ttl=600, negative_ttl=60)
    assert not verify.recipient(conn(), "carol@example.org").cached
    assert not verify.recipient(conn(), "ghost@example.org").cached
    clock.now += 61  # past negative_ttl, within positive_ttl
    assert verify.recipient(conn(), "carol@example.org").cached
    ghost = verify.recipient(conn(), "ghost@example.org")
    assert (ghost.status, ghost.cached) == ("unknown", False)
    clock.now += 600
    assert not verify.recipient(conn(), "carol@example.org").cached


def test_answers_are_shared_through_redis_with_their_ttl(next_hop, clock):
    """A fleet on one Redis: an answer one worker (or relay) got is another's, and Redis
    itself forgets it after its TTL."""
    if redis_available():
        pytest.skip(redis_available())
    import redis

    with RedisServer() as server:
        settings = StateSettings(backend="redis", redis_url=server.url, timeout=1.0)
        services.CURRENT = services.ServiceSettings(state=settings, verify=VerifySettings(
            host="127.0.0.1", port=next_hop.port, negative_ttl=120))  # fmt: skip
        stores.CURRENT.configure(settings)
        assert not verify.recipient(conn(), "walter@example.org").cached
        stores.CURRENT.close()  # the next call is another connection, as another worker's
        assert verify.recipient(conn(), "walter@example.org").cached
        client = redis.Redis.from_url(server.url)
        [key] = client.keys("defang:verify:*")
        assert 0 < client.pttl(key) <= 120_000


def test_ttl_zero_keeps_nothing(next_hop, tmp_path, clock):
    configure(tmp_path, clock, host="127.0.0.1", port=next_hop.port, positive_ttl=0, negative_ttl=0)
    for _ in range(2):
        assert not verify.recipient(conn(), "dave@example.org").cached
        assert not verify.recipient(conn(), "nope@example.org").cached


def test_a_state_that_cannot_be_reached_costs_a_probe_not_a_refusal(next_hop, tmp_path, clock):
    configure(tmp_path, clock, state_path=tmp_path / "missing" / "state.sqlite3", host="127.0.0.1",
              port=next_hop.port)  # fmt: skip
    assert verify.recipient(conn(), "erin@example.org").verdict is None
    assert verify.recipient(conn(), "zed@example.org").verdict.code == "550"


def test_non_ascii_address_is_probed_with_smtputf8(next_hop, tmp_path, clock):
    configure(tmp_path, clock, host="127.0.0.1", port=next_hop.port)
    r = verify.recipient(conn(), "jürgen@example.org")
    assert (r.status, r.code) == ("unknown", 550)  # asked (not a syntax refusal), and not a user
    wait_for("the next hop's log of jürgen", lambda: rcpt_lines(next_hop, "jürgen@example.org"))


def test_non_ascii_address_to_a_server_without_smtputf8_is_not_sent(tmp_path, clock):
    with Scripted(b"220 recorder\r\n") as recorder:
        configure(tmp_path, clock, host="127.0.0.1", port=recorder.port)
        r = verify.recipient(conn(), "jürgen@example.org")
        assert (r.status, r.why) == ("unverified", "non-ASCII address and the server does not offer SMTPUTF8")
        assert not any(line.startswith(b"RCPT") for line in recorder.lines)


# --- a next hop that does not answer: [verify] on_error, never a hang -------------------------

def unverified(tmp_path, clock, port, **kw) -> verify.Result:
    configure(tmp_path, clock, host="127.0.0.1", port=port, timeout=1.0, **kw)
    r = verify.recipient(conn(), "bob@example.org")
    assert r.status == "unverified" and not r.cached, r
    v = r.verdict
    assert (v.action, v.code, v.dsn) == ("tempfail", "451", "4.4.3")
    assert verify.recipient(conn(), "bob@example.org", on_error="accept").verdict is None
    assert not verify.recipient(conn(), "bob@example.org").cached  # never kept
    return r


def test_server_down(tmp_path, clock):
    assert "ConnectionRefusedError" in unverified(tmp_path, clock, closed_port()).why


def test_server_hung(tmp_path, clock):
    with Silent() as hung:
        assert "timed out" in unverified(tmp_path, clock, hung.port).why


def test_server_trickling_one_byte_at_a_time_is_cut_at_the_timeout(tmp_path, clock):
    # each byte comes well within the timeout: only a deadline for the whole probe stops it
    with Scripted(b"220 " + b"x" * 2000 + b"\r\n", drip=0.05) as slow:
        assert "timed out" in unverified(tmp_path, clock, slow.port).why


@pytest.mark.parametrize("greeting, reply", [
    (b"hello there, I am not SMTP\r\n", b"250 ok\r\n"),
    (b"220 ok\r\n", b"what?\r\n"),
    (b"220 " + b"x" * 10000 + b"\r\n", b"250 ok\r\n"),  # a line longer than smtplib takes
    (b"220 ok\r\n", b"250-ok\r\n" * 3),  # a reply that never ends: the timeout
    (b"\xff\xfe\x00garbage\r\n", b"250 ok\r\n"),
], ids=["not-smtp", "garbage-reply", "huge-line", "endless-reply", "binary"])  # fmt: skip
def test_server_answering_garbage(tmp_path, clock, greeting, reply):
    with Scripted(greeting, reply) as server:
        unverified(tmp_path, clock, server.port)


@pytest.mark.parametrize("options, why", [(("-r", "RCPT"), "RCPT TO: 450"), (("-Q", "RCPT"), "RCPT TO: 421"),
                                          (("-q", "RCPT"), "SMTPServerDisconnected"),
                                          (("-r", "MAIL"), "MAIL FROM: 450")])  # fmt: skip
def test_smtp_sink_refusing_softly_or_hanging_up(tmp_path, clock, options, why):
    with SinkServer(*options) as sink:
        assert why in unverified(tmp_path, clock, sink.port).why


def test_smtp_sink_that_takes_everyone(tmp_path, clock):
    with SinkServer() as sink:
        configure(tmp_path, clock, host="127.0.0.1", port=sink.port, timeout=5)
        assert verify.recipient(conn(), "anyone@example.com").exists


def test_no_host_configured_is_unverified(tmp_path, clock):
    configure(tmp_path, clock)
    r = verify.recipient(conn(), "bob@example.org")
    assert (r.status, r.why, r.verdict.code) == ("unverified", "no [verify] host configured", "451")


# --- a sender's attacks: nothing but one RCPT line reaches the probe's wire --------------------

ATTACKS = [
    "bob@example.org>\r\nRCPT TO:<evil@example.org",
    "bob@example.org\r\nDATA\r\nSubject: injected\r\n.\r\nQUIT",
    "bob@example.org\nRCPT TO:<evil@example.org>",
    "bob@example.org\rRSET",
    "bob\x00@example.org",
    "<bob@example.org> NOTIFY=NEVER",
    "x" * 300 + "@example.org",
    "a" * 100_000,
    "<>",
    "",
]


@pytest.mark.parametrize("address", ATTACKS, ids=range(len(ATTACKS)))
def test_injection_never_reaches_the_wire(tmp_path, clock, address):
    with Scripted(b"220 recorder\r\n") as recorder:
        configure(tmp_path, clock, host="127.0.0.1", port=recorder.port)
        r = verify.recipient(conn(), address)
        assert (r.status, r.invalid) == ("unknown", True)
        v = r.verdict
        assert (v.action, v.code, v.dsn, v.text) == ("reject", "553", "5.1.3", "Bad recipient address syntax")
        assert recorder.lines == []  # not even a connection's EHLO: nothing was sent


def test_injection_against_the_real_next_hop(next_hop, tmp_path, clock):
    configure(tmp_path, clock, host="127.0.0.1", port=next_hop.port)
    assert verify.recipient(conn(), "bob@example.org>\r\nRCPT TO:<mallory@example.org").verdict.code == "553"
    assert verify.recipient(conn(), "trent@example.org").verdict.code == "550"  # asked after the attack
    wait_for("the next hop's log of trent", lambda: rcpt_lines(next_hop, "trent@example.org"))
    assert "mallory" not in next_hop.postfix.log_text()


def test_one_line_per_probe_on_the_wire(tmp_path, clock):
    """What the probe sends, exactly: EHLO, MAIL FROM, one RCPT TO, QUIT; a quoted local
    part with a space goes as it is, in one line."""
    with Scripted(b"220 recorder\r\n") as recorder:
        configure(tmp_path, clock, host="127.0.0.1", port=recorder.port, helo="relay.example.net",
                  sender="verify@example.net")  # fmt: skip
        assert verify.recipient(conn(), '<"john doe"@example.org>').exists
        wait_for("QUIT", lambda: recorder.lines[-1:] == [b"QUIT\r\n"])
    assert recorder.lines == [b"ehlo relay.example.net\r\n", b"MAIL FROM:<verify@example.net>\r\n",
                              b'RCPT TO:<"john doe"@example.org>\r\n', b"QUIT\r\n"]  # fmt: skip




# --- the example filter, by ``defang test`` ------------------------------------------------------

def test_example_filter_by_defang_test(next_hop, tmp_path):
    config = tmp_path / "verify.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path / "run"}"\nuser = "root"\n'
                      f'[verify]\nhost = "127.0.0.1"\nport = {next_hop.port}\n')  # fmt: skip
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
    rcpts = ("bob@example.org", "mallory@example.org", "someone@else.example")
    argv = [sys.executable, "-m", "defang", "test", str(eml), "--json", "--config", str(config), "--filter",
            str(REPO / "filters/examples/verify_recipients.py"), *(a for r in rcpts for a in ("--rcpt", r))]
    r = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO).stdout)
    answers = {rcpt: (o["action"], o["code"], o["dsn"]) for rcpt, o in r["rcpt"].items()}
    assert answers["mallory@example.org"] == ("reject", "550", "5.1.1")
    # bob exists; another domain is not ours to ask
    assert r["recipients"] == ["bob@example.org", "someone@else.example"]
