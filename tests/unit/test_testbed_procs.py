"""The test bed's one wait for a server it started (``procs.wait_ready``): ready, gone, or
never ready, each said with what the server printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from defang.testbed.procs import stop_process, wait_ready


def _server(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)


def test_ready_once_the_probe_says_so_and_a_probe_error_is_not_yet():
    proc = _server("import time; time.sleep(60)")
    answers = iter([OSError("refused"), False, True])

    def probe() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    try:
        wait_ready(proc, probe, 30.0, "server")
        assert next(answers, "spent") == "spent"
    finally:
        stop_process(proc, 5)


def test_a_server_that_exits_is_named_with_its_status_and_what_it_said():
    proc = _server("import sys; sys.exit(3)")
    proc.wait(30)
    with pytest.raises(RuntimeError) as e:
        wait_ready(proc, lambda: False, 30.0, "redis-server", lambda: "x" * 5000 + "port in use")
    assert str(e.value) == "redis-server exited 3: " + ("x" * 5000 + "port in use")[-2000:]


def test_a_server_never_ready_is_said_once_the_time_is_up():
    proc = _server("import time; time.sleep(60)")
    try:
        with pytest.raises(RuntimeError) as e:
            wait_ready(proc, lambda: False, 0.2, "nsd", lambda: "starting")
        assert str(e.value) == "nsd not ready within 0.2s: starting"
        assert proc.poll() is None  # stopping it is the caller's
    finally:
        stop_process(proc, 5)
