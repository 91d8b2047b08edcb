"""scripts/dashboard's renderer: every panel of etc/grafana-dashboard.json is queried and
named as the dashboard says (on query_range answers made here; the real run against
Prometheus is the script itself, too slow for the suite)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from paths import REPO

_spec = importlib.util.spec_from_file_location("dashboard", REPO / "scripts" / "dashboard.py")
dashboard = importlib.util.module_from_spec(_spec)
sys.modules["dashboard"] = dashboard  # its dataclasses look their module up
_spec.loader.exec_module(dashboard)

DASHBOARD = json.loads((REPO / "etc" / "grafana-dashboard.json").read_text())


def answer(expr: str) -> dict:
    """A query_range answer as Prometheus gives it: one series per value of each label the
    expression groups by, two points, the second NaN (a gap)."""
    grouped = re.findall(r"by \(([^)]*)\)", expr)
    names = [n.strip() for n in grouped[0].split(",")] if grouped and grouped[0] != "le" else []
    series = []
    for v in ("one", "two"):
        metric = {n: f"{n}-{v}" for n in names}
        series.append({"metric": metric, "values": [[1000.0, "1.5"], [1060.0, "2"], [1120.0, "NaN"]]})
        if not names:
            break
    return {"status": "success", "data": {"resultType": "matrix", "result": series}}


class Recorder:
    def __init__(self) -> None:
        self.asked: list[tuple[str, float, float, float]] = []

    def __call__(self, expr, start, end, step):
        self.asked.append((expr, start, end, step))
        return dashboard.matrix(answer(expr))


def test_every_panels_query_is_asked_with_the_runs_range():
    rec = Recorder()
    panels = dashboard.collect(DASHBOARD, rec, 1000.0, 1180.0, 2.0, "15s")
    wanted = [t["expr"].replace("$__rate_interval", "15s") for p in DASHBOARD["panels"] for t in p["targets"]]
    assert [a[0] for a in rec.asked] == wanted
    assert all(a[1:] == (1000.0, 1180.0, 2.0) for a in rec.asked)
    assert not any("$__" in a[0] for a in rec.asked)
    assert [p.title for p in panels] == [p["title"] for p in DASHBOARD["panels"]]
    assert [p.grid for p in panels] == [p["gridPos"] for p in DASHBOARD["panels"]]


def test_each_series_is_named_by_its_targets_legend_format():
    panels = {p.title: p for p in dashboard.collect(DASHBOARD, Recorder(), 0, 10, 1, "15s")}
    verdicts = panels["Messages per second by verdict"].lines
    assert [ln.label for ln in verdicts] == ["verdict-one", "verdict-two"]
    assert [ln.label for ln in panels["End-of-message latency in the daemons"].lines] == ["p50", "p95", "p99"]
    assert [ln.label for ln in panels["Scanner outcomes per second"].lines] == [
        "scanner-one outcome-one",
        "scanner-two outcome-two",
    ]
    assert [ln.label for ln in panels["Worker recycles and reloads (per hour)"].lines] == [
        "recycled: reason-one",
        "recycled: reason-two",
        "reload outcome-one",
        "reload outcome-two",
    ]
    line = panels["Queue"].lines[0]
    assert line.label == "depth" and line.points[0] == (1000.0, 1.5)


def test_a_legend_without_a_format_is_the_series_name():
    assert (
        dashboard.legend("", {"__name__": "defang_queue_depth", "job": "defang"})
        == 'defang_queue_depth{job="defang"}'
    )


def test_an_error_answer_is_said():
    with pytest.raises(RuntimeError, match="bad_data: parse error"):
        dashboard.matrix({"status": "error", "errorType": "bad_data", "error": "parse error"})


def test_the_panels_are_drawn_into_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    panels = dashboard.collect(DASHBOARD, Recorder(), 1000.0, 1120.0, 60.0, "15s")
    panels[7].lines = []  # a panel with no series says "No data", as Grafana does
    out = tmp_path / "d.png"
    dashboard.draw(panels, "defang", "a test", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
