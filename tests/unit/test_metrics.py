"""[metrics]: the address check, and the page rendered from the pool's counters."""

from __future__ import annotations

import selectors

import pytest
from prometheus_client.parser import text_string_to_metric_families

from defang.core.config import Config
from defang.core.convert import as_loopback, loopback_address
from defang.multiplexor.metrics import MetricsServer
from defang.multiplexor.pool import Pool


@pytest.mark.parametrize("bad", ["0.0.0.0:9187", "192.0.2.1:9187", "[::]:9187", "localhost:9187",
                                 "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000"])  # fmt: skip
def test_only_a_loopback_address_and_a_port(bad):
    with pytest.raises(TypeError):
        as_loopback(bad)


def test_loopback_addresses_pass():
    assert as_loopback("127.0.0.1:9187") == "127.0.0.1:9187"
    assert as_loopback("[::1]:9187") == "[::1]:9187"
    assert as_loopback("") == ""


def test_the_checked_address_is_the_one_the_server_binds():
    """One parser: what the config accepts is what the multiplexor binds."""
    assert loopback_address("127.0.0.1:9187") == ("127.0.0.1", 9187)
    assert loopback_address("[::1]:9187") == ("::1", 9187)
    sel = selectors.DefaultSelector()
    server = MetricsServer(Pool(Config()), sel, ("::1", 0))  # port 0: any free one
    try:
        assert server.lsock.getsockname()[0] == "::1"
    finally:
        server.close()


def test_the_page_counts_what_the_stats_recorded():
    pool = Pool(Config())
    stats = pool.stats
    stats.record("eom", "continue", 0.01, None, tags=["a"], waited=0.002, elapsed=0.009,
                 checks=["spamassassin:spam 9.0/5.0", "clamav:error"], actions=[["add_header", "X", "y"]])
    stats.record("eom", "reject", 0.5, "filter error in filter_end: boom", tags=["a", "b"])
    stats.record("rcpt", "continue", 0.001, None)
    sel = selectors.DefaultSelector()
    server = MetricsServer(pool, sel, ("127.0.0.1", 0))
    try:
        got = {}
        for family in text_string_to_metric_families(server.render().decode()):
            for s in family.samples:
                got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    finally:
        server.close()
    assert got[("defang_messages_total", (("verdict", "accept"),))] == 1
    assert got[("defang_messages_total", (("verdict", "reject"),))] == 1
    assert got[("defang_tags_total", (("tag", "a"),))] == 2
    assert got[("defang_filter_errors_total", ())] == 1
    assert got[("defang_scanner_results_total", (("outcome", "spam"), ("scanner", "spamassassin")))] == 1
    assert got[("defang_scanner_results_total", (("outcome", "error"), ("scanner", "clamav")))] == 1
    assert got[("defang_actions_total", (("action", "add_header"),))] == 1
    eom = (("stage", "eom"),)
    assert got[("defang_decision_seconds_count", eom)] == 2
    assert got[("defang_decision_seconds_bucket", (("le", "0.02"), ("stage", "eom")))] == 1
    assert got[("defang_decision_seconds_sum", eom)] == pytest.approx(0.512)
    assert got[("defang_queue_wait_seconds_count", (("stage", "rcpt"),))] == 1


def test_a_latency_on_a_bound_counts_in_that_bound_for_status_and_metrics_alike():
    """One histogram type for ``defangctl histo`` and the metrics: a bound is "at most"."""
    from defang.multiplexor.stats import BUCKETS, Stats

    stats = Stats()
    for seconds in (0.0, 0.001, 0.0011, 0.02, 30.0, 31.0):
        stats.record("eom", "continue", seconds, None)
    counts = stats.snapshot()["histogram"]["counts"]
    assert len(counts) == len(BUCKETS) + 1
    assert counts[0] == 2 and counts[1] == 1  # 0 and 0.001 at most 1 ms; 0.0011 in (1 ms, 2 ms]
    assert counts[BUCKETS.index(0.02)] == 1 and counts[BUCKETS.index(30.0)] == 1 and counts[-1] == 1
    assert stats.filtering["eom"].counts == [6] + [0] * len(BUCKETS)  # elapsed 0 each time
    assert stats.decision["eom"].counts == counts  # nothing waited: the same times


def test_top_rates_come_from_two_replies_a_refresh_apart():
    from defang.cli.ctlview import top

    before = {"verdicts": {"accept": 10, "reject": 2}, "workers": [], "errors": []}
    after = {"verdicts": {"accept": 16, "reject": 3, "quarantine": 1}, "queue": {"depth": 4, "size": 200},
             "workers": [{"id": 1, "pid": 9, "gen": 1, "state": "busy", "served": 3, "queue_id": "4Q",
                          "busy_for": 1.25}],
             "errors": ["12:00:00 4Q eom: filter error in filter_end: boom", "12:00:01 4R eom: busy"]}
    lines = top(after, before, 2.0)
    assert lines[1] == "messages/s  accept 3.0  reject 0.5  tempfail 0.0  discard 0.0  quarantine 0.5"
    assert lines[2] == "total       accept 16  reject 3  tempfail 0  discard 0  quarantine 1"
    assert lines[4].startswith("queue       4/200   workers 1 busy")
    assert any(x.split() == ["1", "9", "1", "busy", "3", "4Q", "1.2s"] for x in lines), lines
    newest, oldest = "  12:00:01 4R eom: busy", "  12:00:00 4Q eom: filter error in filter_end: boom"
    assert lines.index(newest) < lines.index(oldest)
    assert top(after, None, 0.0)[1].startswith("messages/s  accept -")


def test_the_grafana_dashboard_asks_only_for_metrics_defang_serves():
    """etc/grafana-dashboard.json: every series a panel's query names is on the page."""
    import json
    import re

    from daemon import REPO

    pool = Pool(Config())
    pool.stats.record("eom", "continue", 0.01, None, tags=["a"], checks=["clamav:clean clean"],
                      actions=[["add_header", "X", "y"]])  # fmt: skip
    pool.stats.recycles["idle_timeout"] += 1
    pool.stats.reloads["ok"] += 1
    pool.stats.count("busy")
    server = MetricsServer(pool, selectors.DefaultSelector(), ("127.0.0.1", 0))
    try:
        served = {s.name for f in text_string_to_metric_families(server.render().decode()) for s in f.samples}
    finally:
        server.close()
    dashboard = json.loads((REPO / "etc" / "grafana-dashboard.json").read_text())
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\bdefang_[a-z_]+", target["expr"])}  # fmt: skip
    assert asked and asked <= served, asked - served
    titles = [p["title"] for p in dashboard["panels"]]
    assert "Messages per second by verdict" in titles and "Workers by state" in titles


def test_a_fresh_page_shows_the_closed_label_sets_at_zero():
    """A series born at 1 loses that 1 to rate() and increase(): scripts/dashboard's first
    run drew its reload as 0.  Verdicts, recycle reasons and reload outcomes start at 0."""
    pool = Pool(Config())
    pool.stats.reloads["ok"] += 1
    sel = selectors.DefaultSelector()
    server = MetricsServer(pool, sel, ("127.0.0.1", 0))
    try:
        got = {(s.name, tuple(s.labels.values())): s.value
               for family in text_string_to_metric_families(server.render().decode())
               for s in family.samples}  # fmt: skip
    finally:
        server.close()
    for verdict in ("accept", "reject", "tempfail", "discard"):
        assert got[("defang_messages_total", (verdict,))] == 0
    for reason in ("max_requests", "max_rss", "idle_timeout", "busy_timeout", "lost", "reload", "stop"):
        assert got[("defang_worker_recycles_total", (reason,))] == 0
    assert got[("defang_reloads_total", ("failed",))] == 0
    assert got[("defang_reloads_total", ("ok",))] == 1
