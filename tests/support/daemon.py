"""Start and stop the real defang daemons (``defang run``) for a test."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from paths import FILTERS, REPO  # noqa: F401  (FILTERS: for the tests that import it from here)

from defang.core.config import SYSTEM_QUARANTINE_DIR, SYSTEM_RUNTIME_DIR, SYSTEM_STATE_PATH
from defang.testbed.access import reachable_by_others
from defang.testbed.procs import stat_fields, titled


def traversable_dir(prefix: str) -> Path:
    """A fresh dir under /tmp that Postfix's unprivileged daemons can enter; removed when
    the test run ends (what a test left there is the test's, and goes with it)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    atexit.register(shutil.rmtree, d, True)
    return d


def daemon_user(filter_path: Path, settings: dict) -> str:
    """``defang`` (the default: the daemons drop root) when it can read what the test gives
    them, else ``root``: a filter or directory under pytest's tmp_path (/tmp/pytest-of-root,
    mode 0700), or an interpreter under /root, is out of the unprivileged user's reach, as
    it would be in production."""
    paths = [Path(filter_path), Path(sys.executable).resolve()] + [
        Path(v) for t in settings.values() for v in t.values() if isinstance(v, str) and v.startswith("/")]
    return "defang" if all(reachable_by_others(p) or not p.exists() and reachable_by_others(p.parent)
                           for p in paths) else "root"  # fmt: skip


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, settings: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, table in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def system_runtime_dir():
    """/run/defang (a root defang's default) for one test at a time: locked, absent before
    (else the test is skipped: a defang serves there), removed after; so are the
    quarantine and state folders a root defang makes under /var, if the test made them."""
    with open("/run/defang-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(SYSTEM_RUNTIME_DIR / "control.sock")) == 0:
                pytest.skip("a defang serves from /run/defang on this machine")
        subprocess.run(["rm", "-rf", str(SYSTEM_RUNTIME_DIR)], check=True)
        made = [d for d in (SYSTEM_QUARANTINE_DIR.parent, SYSTEM_STATE_PATH.parent) if not d.exists()]
        try:
            yield SYSTEM_RUNTIME_DIR
        finally:
            subprocess.run(["rm", "-rf", str(SYSTEM_RUNTIME_DIR), *map(str, made)], check=False)


class Defang:
    """``defang run`` in a subprocess, its log in a file, stopped by PID."""

    def __init__(self, filter_path: Path | str, *, settings: dict | None = None,
                 socket: str | None = None, default_paths: bool = False) -> None:  # fmt: skip
        """``default_paths``: no --runtime-dir or --socket, as an admin would start it (as root:
        /run/defang, which only one test may use at a time: ``tests/daemons/test_rootdirs.py``)."""
        self.dir = traversable_dir("defang-test-")
        self.default_paths = default_paths
        self.runtime = SYSTEM_RUNTIME_DIR if default_paths else self.dir / "run"
        base = {"daemon": {"log_level": "debug"}, "multiplexor": {"min_workers": 2, "max_workers": 2}}
        for section, table in (settings or {}).items():
            base.setdefault(section, {}).update(table)
        base["daemon"].setdefault("user", daemon_user(filter_path, base))
        self.settings = base
        self.config = write_config(self.dir / "defang.toml", base)
        self.filter = Path(filter_path)
        # a filter or milter socket named in the settings is the config's, not the command line's
        # (a reload re-reads the config; the command line's overrides stay)
        self.socket_spec = (socket or base.get("milter", {}).get("socket")
                            or f"unix:{self.runtime / 'milter.sock'}")  # fmt: skip
        self.log_path = self.dir / "defang.log"
        self.proc: subprocess.Popen | None = None

    @property
    def milter_path(self) -> str:
        return self.socket_spec.partition(":")[2]

    @property
    def control_socket(self) -> Path:
        return self.runtime / "control.sock"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "defang", "run", "--config", str(self.config)]
        if "filter" not in self.settings["daemon"]:
            argv += ["--filter", str(self.filter)]
        if not self.default_paths:
            argv += ["--runtime-dir", str(self.runtime)]
            if "socket" not in self.settings.get("milter", {}):
                argv += ["--socket", self.socket_spec]
        return argv

    def rewrite_config(self, settings: dict[str, dict[str, Any]]) -> None:
        """Change the config file (``settings`` merged over the running ones), as an admin
        would before a reload."""
        for section, table in settings.items():
            self.settings.setdefault(section, {}).update(table)
        write_config(self.config, self.settings)

    def start(self, timeout: float = 30.0) -> Defang:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "defang running" in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"defang run exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        log = self.log()
        # Stopped here: a `with Defang(...)` whose start raised never reaches __exit__,
        # and the stack would outlive the test.
        self.stop(signal.SIGTERM, 15.0)
        self.cleanup()
        raise RuntimeError(f"defang run not ready in {timeout}s:\n{log}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the defang log within {timeout}s:\n{self.log()}")

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        where = [] if self.default_paths else ["--runtime-dir", str(self.runtime)]
        return subprocess.run([sys.executable, "-m", "defang.cli.ctl", "--config", str(self.config), *where,
                               *args], capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip

    def status(self) -> dict:
        import json

        r = self.ctl("--json", "status")
        return json.loads(r.stdout)

    def pids(self, title_prefix: str) -> list[int]:
        """PIDs of our processes whose title starts with ``title_prefix`` (e.g. defang-worker)."""
        return titled(_descendants(self.proc.pid), title_prefix)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in _descendants(self.proc.pid):
                    _kill(pid)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Defang:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, fields in stat_fields():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
