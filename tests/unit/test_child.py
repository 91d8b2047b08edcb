"""defang.core.child.fork: what a forked child keeps of its parent, and how it ends."""

import json
import os
import signal

from defang.core import child


def _report(fd: int, obj) -> int:
    os.write(fd, json.dumps(obj).encode())
    return 0


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_the_child_keeps_only_the_standard_descriptors_and_those_asked_for():
    pipes = [os.pipe() for _ in range(4)]  # descriptors below and above the kept one
    report_r, report_w = pipes[1]
    ours = sorted(fd for pair in pipes for fd in pair)

    def main() -> int:
        still_open = []
        for fd in ours:
            try:
                os.fstat(fd)
                still_open.append(fd)
            except OSError:
                pass
        return _report(report_w, {"open": still_open, "std": [_valid(fd) for fd in (0, 1, 2)]})

    proc = child.fork(main, keep_fds=[report_w])
    for fd in ours:
        if fd != report_r:
            os.close(fd)
    report = json.loads(_read_all(report_r))
    os.close(report_r)
    assert proc.wait(10) == 0
    assert report["open"] == [report_w]
    assert report["std"] == [_valid(fd) for fd in (0, 1, 2)]


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_the_child_has_the_default_signal_handlers_and_its_exit_code_is_main_s():
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        r, w = os.pipe()
        proc = child.fork(lambda: _report(w, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL) or 3,
                          keep_fds=[w])  # fmt: skip
        os.close(w)
        assert json.loads(_read_all(r)) is True
        os.close(r)
        assert proc.wait(10) == 3
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_child_that_raises_exits_1_and_sys_exit_gives_its_code():
    def boom() -> int:
        raise RuntimeError("boom in the child")

    def leave() -> int:
        raise SystemExit(4)

    assert child.fork(boom).wait(10) == 1
    assert child.fork(leave).wait(10) == 4
