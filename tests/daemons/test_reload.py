"""A reload re-reads the config: what it can apply it applies, what needs a restart it names
and leaves as it runs, a config that does not load changes nothing.  Through the real
daemons (``defang run``), driven by the fake MTA, reloaded with ``defangctl reload``."""

import os
import shutil
import signal

import pytest
from daemon import Defang, traversable_dir
from fakemta import MilterSession

MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


def tagged(tag: str) -> str:
    return f'def filter_end(msg):\n    msg.add_header("X-Gen", "{tag}")\n'


def send(path: str, message: bytes = MSG, qid: str = "Q1"):
    with MilterSession(path) as s:
        s.connect()
        s.helo()
        s.mail("a@example.org")
        s.rcpt("b@example.org")
        return s.message(message, queue_id=qid)


def gen_header(result) -> list[str]:
    return [a[1][1] for a in result.actions if a[0] == "addheader" and a[1][0] == "X-Gen"]


@pytest.fixture
def stack():
    """defang run with the filter and the milter socket named in the config file (no
    command-line override), and a second filter beside the first."""
    files = traversable_dir("defang-reload-")
    (files / "one.py").write_text(tagged("one"))
    (files / "two.py").write_text(tagged("two"))
    d = Defang(files / "one.py", settings={
        "daemon": {"filter": str(files / "one.py")},
        "milter": {"socket": f"unix:{files / 'sock' / 'milter.sock'}"},  # made by defang
        "multiplexor": {"min_workers": 1, "max_workers": 2},
    }).start()  # fmt: skip
    yield d, files
    d.stop()
    d.cleanup()
    shutil.rmtree(files, ignore_errors=True)


def test_a_changed_filter_path_and_limits_are_applied_and_listed(stack):
    d, files = stack
    assert gen_header(send(d.milter_path)) == ["one"]
    d.rewrite_config({"daemon": {"filter": str(files / "two.py")},
                      "multiplexor": {"max_workers": 3, "queue_size": 7},
                      "milter": {"max_message_size": 200}})  # fmt: skip
    r = d.ctl("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "reloaded: generation 2, hooks: filter_end",
        f"changed: [daemon] filter: {files / 'one.py'} -> {files / 'two.py'}",
        "changed: [milter] max_message_size: 52428800 -> 200",
        "changed: [multiplexor] max_workers: 2 -> 3",
        "changed: [multiplexor] queue_size: 200 -> 7",
    ]
    # the new filter's verdict; the multiplexor's limits in force
    assert gen_header(send(d.milter_path, qid="Q2")) == ["two"]
    status = d.status()
    assert status["filter"] == str(files / "two.py") and status["generation"] == 2
    assert status["queue"]["size"] == 7 and status["pool"]["max_workers"] == 3
    assert "reload: applied [multiplexor] queue_size: 200 -> 7" in d.log()
    # the front end's limit: taken once it has seen the new generation (the reply above)
    d.wait_log("milter: generation 2: config re-read, 4 option(s) changed")
    big = MSG.replace(b"Hello", b"x" * 300)
    assert send(d.milter_path, big, qid="Q3").text == "552 5.3.4 Message size exceeds limit"


def test_a_changed_socket_needs_a_restart_and_the_old_one_keeps_serving(stack):
    d, files = stack
    old = d.milter_path
    new = f"unix:{files / 'sock' / 'other.sock'}"
    d.rewrite_config({"milter": {"socket": new},
                      "multiplexor": {"busy_timeout": 50}})  # fmt: skip
    r = d.ctl("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[1:] == [
        "changed: [multiplexor] busy_timeout: 60 -> 50",
        f"not applied: [milter] socket: unix:{old} -> {new} (needs a restart; still unix:{old})",
    ]  # fmt: skip
    assert f"reload: not applied: [milter] socket: unix:{old} -> {new} (needs a restart" in d.log()
    assert gen_header(send(old)) == ["one"]
    assert not (files / "sock" / "other.sock").exists()


def test_a_config_that_does_not_load_changes_nothing(stack):
    d, files = stack
    d.rewrite_config({"daemon": {"filter": str(files / "two.py")}, "multiplexor": {"workerz": 3}})
    # defangctl reads the same file (for the control socket): it stops there, in one line
    r = d.ctl("reload")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"defangctl: {d.config}: unknown option [multiplexor] workerz\n"
    # SIGHUP (systemctl reload): the multiplexor reads it, says why, keeps everything
    os.kill(d.proc.pid, signal.SIGHUP)
    d.wait_log("reload refused: the config does not load, nothing changed: "
               f"{d.config}: unknown option [multiplexor] workerz")  # fmt: skip
    assert gen_header(send(d.milter_path)) == ["one"]
    # a file defangctl (root) can read and the daemons (the defang user) cannot
    del d.settings["multiplexor"]["workerz"]
    d.rewrite_config({})
    assert d.status()["generation"] == 1
    if d.settings["daemon"]["user"] == "defang":
        d.config.chmod(0o600)
        r = d.ctl("reload")
        assert r.returncode == 1
        assert r.stdout == (f"error: the config does not load, nothing changed: [Errno 13] Permission "
                            f"denied: '{d.config}'\n")  # fmt: skip
        assert gen_header(send(d.milter_path)) == ["one"]
        d.config.chmod(0o644)
    # fixed, it reloads
    assert d.ctl("reload").returncode == 0
    assert gen_header(send(d.milter_path)) == ["two"]


def test_a_reload_with_nothing_changed_says_so(stack):
    d, _ = stack
    r = d.ctl("reload")
    assert r.returncode == 0 and r.stdout.splitlines() == ["reloaded: generation 2, hooks: filter_end",
                                                           "config: no option changed"]  # fmt: skip


def test_a_reload_warns_when_the_scanner_timeouts_do_not_fit(stack):
    d, _ = stack
    d.rewrite_config({"clamav": {"address": "inet:3310@127.0.0.1", "timeout": 60}})
    r = d.ctl("reload")
    assert r.returncode == 0
    warning = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert warning == ["warning: config: [multiplexor] busy_timeout 60 is not above [clamav] timeout 60 + "
                       "[dns] lifetime 5 = 65 s: a hung scanner gets the worker killed and the message "
                       "on_internal_error before the filter can handle it; raise busy_timeout or lower those "
                       "timeouts"]  # fmt: skip
    assert "reload: config: [multiplexor] busy_timeout 60 is not above" in d.log()


def test_a_changed_log_level_is_taken_by_the_milter_with_the_generation(stack):
    """The milter takes a reload's log level when it meets the new generation, before it
    writes that message's line: at "warning" the per-message INFO line is gone, back at
    "debug" (the tests' level) it is there again."""
    d, _ = stack
    send(d.milter_path, qid="QINFO1")
    assert "QINFO1: conn" in d.log()
    d.rewrite_config({"daemon": {"log_level": "warning"}})
    r = d.ctl("reload")
    assert r.returncode == 0 and "changed: [daemon] log_level: debug -> warning" in r.stdout.splitlines()
    assert gen_header(send(d.milter_path, qid="QWARN")) == ["one"]
    d.rewrite_config({"daemon": {"log_level": "debug"}})
    assert d.ctl("reload").returncode == 0
    assert gen_header(send(d.milter_path, qid="QINFO2")) == ["one"]
    log = d.log()
    assert "QWARN: conn" not in log and "QINFO2: conn" in log
