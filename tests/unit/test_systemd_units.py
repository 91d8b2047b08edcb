"""The systemd units ship with the usual sandbox, and systemd itself rates it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from paths import REPO

UNITS = sorted((REPO / "etc" / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_each_unit_is_sandboxed(unit):
    text = unit.read_text()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "CapabilityBoundingSet=\n",
                 "User=defang", "UMask=0077"):  # fmt: skip
        assert line in text, f"{unit.name}: no {line.strip()}"
    # the milter alone writes no quarantine
    assert "ReadWritePaths=/var/spool/defang" in text or "defang milter" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze on this machine")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_security_rates_each_unit_ok(unit):
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", m.group(0)
