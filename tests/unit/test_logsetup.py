"""[log]: the formats, and destinations that fail or rotate (real files and sockets)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest

from defang.core import logsetup

FIELDS = {"qid": "4Xyz1", "from": "<a@example.org>", "rcpts": 2, "reply": "Not wanted here",
          "tags": ["a", "b"]}


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logsetup._current = None


def record(msg: str = "4Xyz1: conn 7: message", fields: dict | None = FIELDS) -> logging.LogRecord:
    rec = logging.LogRecord("defang.milter", logging.INFO, "", 0, msg, (), None)
    if fields is not None:
        rec.fields = fields
    return rec


def test_the_three_formats_carry_the_fields():
    text = logsetup.Formatter("text").format(record())
    assert text.endswith('INFO: 4Xyz1: conn 7: message qid=4Xyz1 from=<a@example.org> rcpts=2 '
                         'reply="Not wanted here" tags=a,b')
    kv = logsetup.Formatter("kv").format(record())
    assert 'proc=defang.milter' in kv and 'level=info msg="4Xyz1: conn 7: message" qid=4Xyz1' in kv
    obj = json.loads(logsetup.Formatter("json").format(record()))
    assert obj["msg"] == "4Xyz1: conn 7: message" and obj["tags"] == ["a", "b"] and obj["rcpts"] == 2
    # a plain line has no fields, and a value a client chose cannot add a key
    assert logsetup.Formatter("text").format(record("conn 7: hello", None)).endswith("INFO: conn 7: hello")
    sneaky = logsetup.Formatter("kv").format(record(fields={"helo": 'x verdict=accept "'}))
    assert sneaky.endswith(r'helo="x verdict=accept \""')


def test_a_file_is_reopened_when_rotated_and_on_sigusr1(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(logsetup, "RECHECK", 0.0)
    path = tmp_path / "defang.log"
    logsetup.setup("info", "text", "file", path=str(path))
    log = logging.getLogger("defang.test")
    log.info("before")
    path.rename(tmp_path / "defang.log.1")  # logrotate's rename
    log.info("after")
    assert "before" in (tmp_path / "defang.log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()
    monkeypatch.setattr(logsetup, "RECHECK", 3600.0)
    path.rename(tmp_path / "defang.log.2")
    os.kill(os.getpid(), __import__("signal").SIGUSR1)
    log.info("signalled")
    assert "signalled" in path.read_text()


def test_a_full_disk_falls_back_to_stderr_and_says_so_once(capfd):
    logsetup.setup("info", "kv", "file", path="/dev/full")  # every write: ENOSPC
    log = logging.getLogger("defang.test")
    log.info("one")
    log.info("two")
    err = capfd.readouterr().err
    assert err.count("log: log file /dev/full failed") == 1 and "logging to standard error" in err
    assert 'msg=one' in err and 'msg=two' in err


def test_syslog_gets_datagrams_and_a_vanished_socket_falls_back(tmp_path: Path, capfd):
    address = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    logsetup.setup("info", "text", "syslog", path="", facility="local3", syslog_address=address)
    log = logging.getLogger("defang.test")
    log.warning("first")
    data = server.recv(65536).decode()
    assert data == f"<{19 * 8 + 4}>defang.test[{os.getpid()}]: WARNING: first"  # local3.warning
    server.close()
    os.unlink(address)  # syslog went away
    log.warning("second")
    log.warning("third")
    err = capfd.readouterr().err
    assert err.count(f"log: syslog {address} failed") == 1
    assert "WARNING: second" in err and "WARNING: third" in err


def test_an_unopenable_file_is_stderr_from_the_start(tmp_path: Path, capfd):
    logsetup.setup("info", "text", "file", path=str(tmp_path / "no" / "such" / "dir.log"))
    logging.getLogger("defang.test").info("still logged")
    err = capfd.readouterr().err
    assert err.count("failed") == 1 and "INFO: still logged" in err


def test_a_forked_daemon_reopens_the_file_and_never_writes_into_a_socket(tmp_path: Path):
    """child.fork closes every inherited descriptor: the log file's number may come back
    as the child's first socket; the child's lines must go to the file, not into it."""
    from defang.core import child

    path = tmp_path / "defang.log"
    logsetup.setup("info", "text", "file", path=str(path))

    def main() -> int:
        a, b = socket.socketpair()
        logging.getLogger("defang.child").info("from the child")
        for sock in (a, b):
            sock.setblocking(False)
            try:
                if sock.recv(100):
                    return 3  # a log line arrived on a socket
            except BlockingIOError:
                pass
        return 0

    proc = child.fork(main)
    assert proc.wait(timeout=30) == 0
    logging.getLogger("defang.parent").info("from the parent")
    text = path.read_text()
    assert "defang.child" in text and "from the child" in text and "from the parent" in text


def test_a_fifo_with_no_reader_is_stderr_not_a_process_that_never_starts(tmp_path: Path):
    """A [log] file that is a FIFO nobody reads: the open would wait for a reader forever
    (root's at start-up in give_log_file, each daemon's in setup).  Both give up at once:
    the line goes to stderr with one line saying why.  Run in a child, so that a
    regression is a failed test, not a hung suite."""
    import subprocess
    import sys

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    code = ("import logging, os, pwd, grp\n"
            "from defang.core import logsetup, privileges\n"
            "if os.geteuid() == 0:\n"
            "    privileges.give_log_file(PATH, pwd.getpwuid(0).pw_name, grp.getgrgid(0).gr_name)\n"
            "logsetup.setup('info', 'text', 'file', path=str(PATH))\n"
            "logging.getLogger('defang.test').info('still logged')\n").replace("PATH", repr(str(fifo)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"log: log file {fifo} failed" in r.stderr and r.stderr.count("failed") == 1, r.stderr
    assert "INFO: still logged" in r.stderr
