"""``pip install .`` (not editable) into a fresh venv: one top-level package, the defaults
found without the source tree, and ``defang check`` / ``defang run`` working from it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paths import REPO


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    pip = subprocess.run([str(root / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check",
                          str(REPO)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    return root / "venv"


def test_one_top_level_package_with_its_defaults(venv):
    shown = subprocess.run([str(venv / "bin/pip"), "show", "-f", "defang"], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    files = [line.strip() for line in shown.split("Files:", 1)[1].splitlines() if line.strip()]
    top = {f.split("/")[0] for f in files if not f.startswith("..") and ".dist-info/" not in f}
    assert top == {"defang"}
    assert {"defang/etc/defang.toml", "defang/filters/filter.py", "defang/workers/loader.py"} <= set(files)
    probe = "import defang.workers.runner as r; print(r.__file__)"
    where = subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True, text=True,
                           check=True, cwd="/").stdout  # fmt: skip
    assert where.startswith(str(venv))


def test_check_finds_the_packaged_default_filter_outside_the_source_tree(venv, tmp_path):
    r = subprocess.run([str(venv / "bin/defang"), "check"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(venv)) and "defang/filters/filter.py: OK; hooks: filter_end" in r.stdout
    r = subprocess.run([str(venv / "bin/defang"), "check", "--filter", "filters/filter.py"],
                       capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith(f"{REPO}/filters/filter.py: OK"), r.stderr


def test_run_with_a_config_serves_and_stops(venv, tmp_path):
    config = tmp_path / "defang.toml"
    # root: this venv lies in pytest's tmp_path (mode 0700), out of the defang user's reach
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path / "run"}"\nuser = "root"\n'
                      '[multiplexor]\nmin_workers = 1\n')
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin/defang"), "run", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "defang running" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "defang running" in log.read_text(), log.read_text()
        status = subprocess.run([str(venv / "bin/defangctl"), "--config", str(config), "status"],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert status.returncode == 0 and f"filter {venv}" in status.stdout, status.stdout + status.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "defang stopped" in log.read_text()


def test_the_packaged_examples_load_and_replay_runs(venv, tmp_path):
    probe = "import defang, os; print(os.path.dirname(defang.__file__))"
    site = subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip()  # fmt: skip
    modular = Path(site) / "filters" / "examples" / "modular" / "filter.py"
    r = subprocess.run([str(venv / "bin/defang"), "check", "--strict", "--filter", str(modular)],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "hooks: filter_begin, filter_helo" in r.stdout, r.stderr
    (tmp_path / "m.eml").write_bytes(b"From: a@example.org\r\nSubject: =?euc-kr?B?x5GxuQ==?=\r\n\r\nhi\r\n")
    r = subprocess.run([str(venv / "bin/defang"), "replay", str(tmp_path), "--filter", str(modular)],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "reject 554 5.7.1 Mail in the charset euc-kr" in r.stdout, r.stderr
