"""The CPU budget through a real Postfix (issue 25, item 10): a filter that never returns
is stopped by the worker itself, the sender gets the documented permanent reply, the
quarantine entry asked for before is kept, and the next message goes through."""

from __future__ import annotations

import re

import pytest
from daemon import FILTERS
from mta import Stack, delivered, message, needs_postfix, shared_dir

pytestmark = [pytest.mark.integration, needs_postfix]


def test_a_filter_past_its_cpu_budget_gets_554_and_the_worker_serves_on():
    qdir = shared_dir("defang-budget-q-") / "quarantine"  # made by defang, 0700: a 1777 one is refused
    settings = {"filter": {"max_cpu_seconds": 1},
                "multiplexor": {"min_workers": 1, "max_workers": 1, "min_spare": 0},
                "quarantine": {"dir": str(qdir)}}  # fmt: skip
    with Stack(FILTERS / "costly.py", settings=settings) as stack:
        workers = stack.defang.pids("defang-worker")
        data, mid = message("spin", X_Spin="1", X_Quarantine="1")
        r = stack.send(data)
        assert r.data == (554, "5.6.0 Message too costly to check (local limit)"), r
        log = stack.defang.wait_log("over the CPU budget")
        line = re.search(r"(\S+): conn \S+: over the CPU budget in filter_end .*; answering 554 5\.6\.0", log)
        assert line and line.group(1) not in ("-", ""), log[-2000:]  # the queue ID
        entries = [p for p in qdir.rglob("message.eml")]
        assert len(entries) == 1 and mid.encode() in entries[0].read_bytes(), "the entry asked for is kept"
        # the same worker (not killed by busy_timeout) serves the next message
        ok, ok_mid = message("after")
        assert stack.send(ok).data[0] == 250
        got = stack.arrived(ok_mid.encode())
        assert b"X-Budget: passed" in got.raw
        assert stack.defang.pids("defang-worker") == workers
        assert not delivered(stack, mid)


def test_the_reply_is_configurable():
    settings = {"filter": {"max_cpu_seconds": 0.5,
                           "on_cpu_limit": {"code": "451", "dsn": "4.7.1", "text": "Try later"}}}  # fmt: skip
    with Stack(FILTERS / "costly.py", settings=settings) as stack:
        r = stack.send(message("spin", X_Spin="1")[0])
        assert r.data == (451, "4.7.1 Try later"), r
