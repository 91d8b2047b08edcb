"""The supervisor's restart back-off, as the pure logic it is (no processes, no sleeps)."""

from defang.supervisor import HEALTHY_RUN, MAX_BACKOFF, Backoff


def crash_loop(b: Backoff, now: float, times: int, ran_for: float) -> tuple[list[int], float]:
    delays = []
    for _ in range(times):
        b.start(now)
        now += ran_for
        delay = b.died(now)
        delays.append(delay)
        now += delay
    return delays, now


def test_a_daemon_that_keeps_dying_waits_longer_each_time_up_to_the_cap():
    delays, _ = crash_loop(Backoff(), 1000.0, 8, ran_for=0.5)
    assert delays == [2, 4, 8, 16, 30, 30, 30, 30]
    assert max(delays) == MAX_BACKOFF


def test_the_back_off_starts_over_after_a_long_healthy_run():
    b = Backoff()
    delays, now = crash_loop(b, 1000.0, 6, ran_for=1.0)
    assert delays[-1] == MAX_BACKOFF
    # restarted, then it served for a week before dying again: 2 s, not 30 s
    b.start(now)
    assert b.died(now + 7 * 86400) == 2
    # and if it then crash-loops again, the back-off grows again from there
    delays, _ = crash_loop(b, now + 7 * 86400 + 2, 3, ran_for=1.0)
    assert delays == [4, 8, 16]


def test_a_run_just_short_of_healthy_does_not_reset_it():
    b = Backoff()
    crash_loop(b, 0.0, 4, ran_for=1.0)
    b.start(500.0)
    assert b.died(500.0 + HEALTHY_RUN - 1) == 30
    b.start(600.0)
    assert b.died(600.0 + HEALTHY_RUN) == 2
