"""scripts/soak at a small count: the same checks as the million-message run, in a minute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mta import needs_postfix
from paths import REPO

pytestmark = [pytest.mark.integration, needs_postfix]


def test_a_small_soak_loses_nothing_and_leaks_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--messages", "3000",
                        "--batch", "500", "--reload-every", "1000", "--sample", "2", "--warm", "300",
                        "--conns-min", "5", "--conns-max", "30", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "soak.json").read_text())["summary"]
    assert summary["messages"] == 3000 == summary["delivered"] + summary["rejected"]
    assert summary["rejected"] > 0 and summary["delivered"] > 2000  # the mix: some .exe, some corpus refusals
    assert summary["reloads"] == 2 and summary["multiplexor_events"].get("worker_retired", 0) > 0
    assert all(summary["checks"].values()), summary["checks"]
    assert not summary["log_errors"], summary["log_errors"]
    assert "| defang-milter |" in (tmp_path / "soak.md").read_text()
