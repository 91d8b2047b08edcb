"""filter_tick's rules on the pure pool (defang/multiplexor/ticks.py): when a tick goes,
to whom, when it is skipped, and what a hung one gets.  Through real processes:
tests/postfix/test_postfix_observe.py."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_pool_rules import Harness, answered, of  # noqa: E402

from defang.core import wire  # noqa: E402
from defang.multiplexor import events as ev  # noqa: E402


def ticking(**settings) -> tuple[Harness, int]:
    h = Harness(tick_interval=10.0, tick_timeout=2.0, busy_timeout=60.0, **settings)
    h.pool.generations[1].hooks = ["filter_end", "filter_tick"]  # as its zygote reported
    (wid,) = h.boot(h.tick())
    return h, wid


def ticks_sent(commands) -> list[int]:
    return [wire.decode(c.job.body, wire.REQUESTS).n for c in of(ev.Send, commands) if c.job.op == "tick"]


def test_a_tick_goes_to_an_idle_worker_each_interval_numbered():
    h, wid = ticking()
    assert ticks_sent(h.tick(5.0)) == []
    assert h.pool.next_deadline(h.now) <= h.now + 5.0, "the loop wakes up for the tick"
    assert ticks_sent(h.tick(5.0)) == [1]
    h.reply(wid)
    assert ticks_sent(h.tick(10.0)) == [2]
    assert h.pool.stats.requests["tick"] == 1


def test_no_tick_without_the_hook_or_the_interval():
    h = Harness(tick_interval=10.0)
    h.boot(h.tick())
    assert ticks_sent(h.tick(30.0)) == []
    h = Harness(tick_interval=0.0)
    h.pool.generations[1].hooks = ["filter_end", "filter_tick"]
    h.boot(h.tick())
    assert ticks_sent(h.tick(30.0)) == []


def test_a_tick_never_waits_for_a_worker_nor_delays_mail():
    h, wid = ticking(max_workers=1)
    job, commands = h.request("MAIL1")
    assert of(ev.Send, commands)[0].job is job
    assert ticks_sent(h.tick(10.0)) == [], "the only worker is busy: skipped"
    h.reply(wid)
    assert ticks_sent(h.tick(1.0)) == [], "not before the next interval"
    assert ticks_sent(h.tick(9.0)) == [1]
    job2, commands = h.request("MAIL2")  # mail while the tick runs: queued, not refused
    assert of(ev.Send, commands) == [] and list(h.pool.queue) == [job2]
    sent = h.reply(wid)
    assert [c.job.queue_id for c in of(ev.Send, sent)] == ["MAIL2"]


def test_a_hung_tick_is_killed_at_tick_timeout_not_busy_timeout():
    h, wid = ticking()
    assert ticks_sent(h.tick(10.0)) == [1]
    pid = h.pid(wid)
    assert of(ev.Signal, h.tick(1.9)) == []
    commands = h.tick(0.2)
    assert ev.Signal(pid, signal.SIGTERM) in of(ev.Signal, commands)
    assert answered(commands) == [], "nobody waits for a tick's answer"
    assert h.pool.stats.recycles["busy_timeout"] == 1
