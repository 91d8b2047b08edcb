"""The CPU budget of a request (``[filter] max_cpu_seconds``, workers/budget.py): a hook
that never returns, or one that swallows the stop, ends in ``on_cpu_limit`` with the
filter's actions dropped and one WARNING line with the queue ID; a quarantine entry
asked for before is kept; the worker serves the next request as before.  Through
Postfix: tests/postfix/test_postfix_budget.py."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
from test_mime_rewrite import crlf, inline_filter, run, runner_for
from wiretools import handle

from defang.core import config

TWO_PARTS = crlf("""
    From: Alice <alice@example.com>
    To: bob@example.org
    Subject: two parts
    Content-Type: multipart/mixed; boundary="b"

    --b
    Content-Type: text/plain

    one
    --b
    Content-Type: text/plain

    two
    --b--
    """)
REFUSED = {"action": "reject", "code": "554", "dsn": "5.6.0",
           "text": "Message too costly to check (local limit)"}  # the documented default


def runner(tmp_path: Path, code: str, **filter_options: object):  # noqa: ANN201 (a FilterRunner)
    lines = ["[filter]"] + [f"{k} = {json.dumps(v) if not isinstance(v, dict) else _table(v)}"
                            for k, v in {"max_cpu_seconds": 0.3, **filter_options}.items()]  # fmt: skip
    lines += ["[quarantine]", f'dir = "{tmp_path / "q"}"']
    path = tmp_path / "defang.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = config.load(path, runtime_dir=str(tmp_path / "run"))
    return runner_for(inline_filter(tmp_path, code), config=cfg)


def _table(v: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + " }"


def test_a_hook_that_never_returns_is_stopped_with_the_documented_reply(tmp_path: Path, caplog) -> None:
    r = runner(tmp_path, """
        def filter_part(msg, part):
            msg.add_header("X-Seen", str(part.index))
            if part.index == 2:
                while True:
                    pass
        """)
    with caplog.at_level(logging.WARNING, logger="defang.worker"):
        reply = run(r, TWO_PARTS, tmp_path, queue_id="4QBUDGET")
    assert reply["verdict"] == REFUSED
    assert reply["actions"] == [], "the filter's actions are dropped"
    lines = [rec.getMessage() for rec in caplog.records if "over the CPU budget" in rec.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("4QBUDGET: conn 7: over the CPU budget in filter_part, part 2")
    assert lines[0].endswith("answering 554 5.6.0")
    assert signal.getsignal(signal.SIGPROF) == signal.SIG_DFL, "the timer's handler is put back"
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0), "and the timer disarmed"


def test_a_filter_that_swallows_the_stop_is_stopped_at_the_next_part(tmp_path: Path) -> None:
    r = runner(tmp_path, """
        SEEN = []
        def filter_part(msg, part):
            SEEN.append(part.index)
            try:
                while True:
                    pass
            except BaseException:
                pass
        """)
    reply = run(r, TWO_PARTS, tmp_path)
    assert reply["verdict"] == REFUSED
    assert r.loaded.module.SEEN == [1], "the boundary check stops it before the next part"


def test_the_quarantine_entry_asked_for_first_is_kept(tmp_path: Path) -> None:
    r = runner(tmp_path, """
        def filter_begin(msg):
            msg.quarantine("kept")
        def filter_end(msg):
            while True:
                pass
        """)
    reply = run(r, TWO_PARTS, tmp_path)
    assert reply["verdict"] == REFUSED
    [qid] = r.quarantine_store.ids()
    assert r.quarantine_store.get(qid)["reasons"] == ["kept"]
    assert r.quarantine_store.message_path(qid).read_bytes() == (tmp_path / "spool" / "message").read_bytes()


def test_the_reply_is_configurable_and_the_next_message_passes(tmp_path: Path) -> None:
    r = runner(tmp_path, """
        def filter_end(msg):
            if msg.subject == "two parts":
                while True:
                    pass
            msg.add_header("X-Ok", "1")
        """, on_cpu_limit={"code": "451", "dsn": "4.7.1", "text": "Try later"})
    reply = run(r, TWO_PARTS, tmp_path)
    assert reply["verdict"] == {"action": "tempfail", "code": "451", "dsn": "4.7.1", "text": "Try later"}
    reply = run(r, TWO_PARTS.replace(b"two parts", b"fine"), tmp_path)
    assert reply["verdict"]["action"] == "continue" and ["add_header", "X-Ok", "1"] in reply["actions"]


def test_an_envelope_hook_has_the_budget_too(tmp_path: Path) -> None:
    r = runner(tmp_path, """
        def filter_sender(conn, sender):
            while True:
                pass
        """)
    conn = {"id": 3, "ip": "192.0.2.1", "hostname": "h", "port": 1, "helo": "h", "macros": {}, "notes": {}}
    reply = handle(r, {"op": "mail", "conn": conn, "sender": "a@example.org", "args": []})
    assert reply["verdict"] == REFUSED


def test_no_budget_when_it_is_off(tmp_path: Path) -> None:
    r = runner(tmp_path, """
        import time
        def filter_end(msg):
            end = time.process_time() + 0.5
            while time.process_time() < end:
                pass
        """, max_cpu_seconds=0)
    assert run(r, TWO_PARTS, tmp_path)["verdict"]["action"] == "continue"


def test_a_budget_the_pool_would_cut_short_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "defang.toml"
    path.write_text("[filter]\nmax_cpu_seconds = 60\n")
    with pytest.raises(config.ConfigError, match=r"max_cpu_seconds 60 must be below .* busy_timeout 60"):
        config.load(path)
    path.write_text("[multiplexor]\nbusy_timeout = 4\n")  # the default (10) then fits under it
    assert config.load(path).max_cpu_seconds == 2
