"""Shared state through real Postfix and defang: greylisting, allow lists, a rate limit;
SQLite under ten workers at once; Redis shared by two relays, and Redis going away.

No test waits for a greylisting delay: ``[greylist] delay = 0`` makes a first attempt
tempfail and any retry pass; ``delay = 3600`` makes every retry of the test too early.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from daemon import REPO
from mta import Stack, needs_postfix

from defang.testbed.redisd import RedisServer, redis_available
from defang.testbed.smtpclient import send_many

pytestmark = [pytest.mark.integration, needs_postfix]

FILTER = REPO / "tests" / "filters" / "state_policy.py"
RCPT = "bob@example.org"


def msg(subject: str) -> bytes:
    return f"From: a@example.org\r\nTo: {RCPT}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def rcpt_code(result) -> int:  # noqa: ANN001
    return result.rcpts[RCPT][0]


def lists_cmd(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    where = ("--config", str(stack.defang.config), "--runtime-dir", str(stack.defang.runtime))
    r = subprocess.run([sys.executable, "-m", "defang", "lists", *args, *where],
                       capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def redis_server():
    if redis_available():
        pytest.skip(redis_available())
    server = RedisServer().start()
    yield server
    server.close()


def test_greylisting_first_attempt_4xx_then_the_retry_is_delivered():
    with Stack(FILTER, settings={"greylist": {"delay": 0}}) as stack:
        first = stack.send(msg("greylisted once"), sender="new@example.org")
        code, text = first.rcpts[RCPT]
        assert (code, text.split()[0]) == (451, "4.7.1") and "Greylisted, try again in " in text
        assert first.data is None and stack.sink.messages() == []
        again = stack.send(msg("greylisted once"), sender="new@example.org")
        assert again.data[0] == 250, again
        assert stack.arrived(b"greylisted once").mail_from == "new@example.org"
        assert stack.defang.status()["tags"].get("greylisted") == 1


def test_a_retry_before_the_delay_is_4xx_and_an_allow_listed_client_is_never_delayed():
    with Stack(FILTER, settings={"greylist": {"delay": 3600}}) as stack:
        assert rcpt_code(stack.send(msg("too early"), sender="early@example.org")) == 451
        assert rcpt_code(stack.send(msg("too early"), sender="early@example.org")) == 451
        lists_cmd(stack, "add", "allow", "127.0.0.0/8")  # no reload: the next message sees it
        r = stack.send(msg("allow listed"), sender="never-seen@example.org")
        assert rcpt_code(r) == 250 and r.data[0] == 250
        stack.arrived(b"allow listed")
        lists_cmd(stack, "remove", "allow", "127.0.0.0/8")
        lists_cmd(stack, "add", "block", "spam.example")
        r = stack.send(msg("blocked"), sender="x@spam.example")
        assert r.rcpts[RCPT][0] == 550 and r.rcpts[RCPT][1].startswith("5.7.1")


def test_sqlite_with_ten_workers_writing_at_once_never_reaches_a_message_as_locked():
    settings = {"multiplexor": {"min_workers": 10, "max_workers": 10}, "greylist": {"delay": 0}}
    with Stack(FILTER, settings=settings) as stack:
        batch = [(f"s{n}@example.org", [RCPT], msg(f"parallel {n}")) for n in range(60)]
        results = send_many("127.0.0.1", stack.postfix.smtp_port, batch, concurrency=10)
        replies = [r.rcpts[RCPT] for r in results]
        assert [c for c, _ in replies] == [451] * 60
        assert all(t.startswith("4.7.1 Greylisted") for _, t in replies), replies  # never 4.3.0
        results = send_many("127.0.0.1", stack.postfix.smtp_port, batch, concurrency=10)
        assert [r.data[0] for r in results] == [250] * 60
        assert "database is locked" not in stack.defang.log()
        assert stack.defang.status()["tags"].get("greylisted") == 60


def redis_settings(server: RedisServer, **state) -> dict:
    return {"state": {"backend": "redis", "redis_url": server.url, "timeout": 1, **state},
            "greylist": {"delay": 0}}


def test_two_relays_share_greylisting_and_rate_limits_through_one_redis(redis_server):
    redis_server.stop()
    redis_server.start()  # empty
    with Stack(FILTER, settings=redis_settings(redis_server)) as one, \
            Stack(FILTER, settings=redis_settings(redis_server)) as two:  # fmt: skip
        assert rcpt_code(one.send(msg("via two relays"), sender="roam@example.org")) == 451
        assert two.send(msg("via two relays"), sender="roam@example.org").data[0] == 250  # retried elsewhere
        two.arrived(b"via two relays")
        counted = [stack.send(msg(f"limited {n}"), sender="ratelimited@example.org")
                   for n, stack in enumerate((one, two, one))]  # fmt: skip
        assert [rcpt_code(r) for r in counted] == [250, 250, 250]
        over = two.send(msg("limited 3"), sender="ratelimited@example.org")
        assert rcpt_code(over) == 451 and "Too many messages" in over.rcpts[RCPT][1]
        assert rcpt_code(one.send(msg("limited 4"), sender="ratelimited@example.org")) == 451
        assert "rate limit sender=ratelimited@example.org: 4 in 3600s > 3: tempfail" in two.defang.log()


def test_redis_gone_tempfails_without_a_stuck_worker_and_recovers(redis_server):
    with Stack(FILTER, settings=redis_settings(redis_server, timeout=0.5)) as stack:
        stack.send(msg("before"), sender="before@example.org")
        assert stack.send(msg("before"), sender="before@example.org").data[0] == 250
        redis_server.stop()
        down = [stack.send(msg(f"while down {n}"), sender=f"down{n}@example.org") for n in range(5)]
        tempfail = (451, "4.3.0 Temporary local problem, please try again later")
        assert [r.rcpts[RCPT] for r in down] == [tempfail] * 5
        status = stack.defang.status()  # no worker hung on Redis, none killed or lost
        assert [w["state"] for w in status["workers"]] == ["idle", "idle"]
        assert not {"worker_lost", "worker_killed", "worker_crashed"} & set(status["events"])
        assert "state unavailable" in stack.defang.log()
        redis_server.start()
        r = stack.send(msg("after"), sender="after@example.org")
        assert rcpt_code(r) == 451 and "Greylisted" in r.rcpts[RCPT][1]  # the state works again
        assert stack.send(msg("after"), sender="after@example.org").data[0] == 250


def test_redis_that_hangs_gets_the_timeout_then_the_configured_accept(redis_server):
    settings = redis_settings(redis_server, timeout=0.5, on_error="accept")
    with Stack(FILTER, settings=settings) as stack:
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            r = stack.send(msg("redis hung"), sender="hung@example.org")
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert r.data[0] == 250  # on_error = "accept": the greylisting is skipped
        stack.arrived(b"redis hung")
        assert "state unavailable" in stack.defang.log()
