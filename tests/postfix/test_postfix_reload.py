"""A reload that reloads, through a real Postfix: the filter named in the config changes,
a limit changes, the milter socket changes (named as needing a restart, the old one goes
on serving Postfix), then a config that does not load (nothing changes)."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
from daemon import traversable_dir
from mta import Stack, delivered, message, needs_postfix

pytestmark = [pytest.mark.integration, needs_postfix]

ONE = 'def filter_end(msg):\n    msg.add_header("X-Gen", "one")\n'
TWO = ('from defang import reject\n\n\ndef filter_end(msg):\n'
       '    return reject("generation two refuses", code="550", dsn="5.7.1")\n')  # fmt: skip


def test_a_reload_applies_the_new_filter_path_and_limits_and_keeps_the_socket():
    files = traversable_dir("defang-reload-pf-")
    (files / "one.py").write_text(ONE)
    (files / "two.py").write_text(TWO)
    settings = {"daemon": {"filter": str(files / "one.py")},
                "multiplexor": {"min_workers": 1, "max_workers": 2}}  # fmt: skip
    stack = Stack(files / "one.py", settings=settings).start()
    d = stack.defang
    try:
        data, mid = message("before")
        assert stack.send(data).data[0] == 250
        assert b"X-Gen: one" in stack.arrived(mid.encode()).raw

        old_socket = d.socket_spec
        d.rewrite_config({"daemon": {"filter": str(files / "two.py")},
                          "multiplexor": {"queue_size": 9},
                          "milter": {"socket": f"unix:{files / 'other' / 'milter.sock'}"}})  # fmt: skip
        r = d.ctl("reload")
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "reloaded: generation 2, hooks: filter_end"
        assert f"changed: [daemon] filter: {files / 'one.py'} -> {files / 'two.py'}" in lines
        assert "changed: [multiplexor] queue_size: 200 -> 9" in lines
        assert (f"not applied: [milter] socket: {old_socket} -> unix:{files / 'other' / 'milter.sock'} "
                f"(needs a restart; still {old_socket})") in lines  # fmt: skip
        assert d.status()["queue"]["size"] == 9

        # Postfix still talks to the old socket, and gets the new filter's verdict there
        data, mid = message("after")
        r = stack.send(data)
        assert r.data == (550, "5.7.1 generation two refuses"), r
        assert not delivered(stack, mid)

        # a config that does not load: SIGHUP (systemctl reload) changes nothing
        d.rewrite_config({"daemon": {"filter": str(files / "one.py")}, "multiplexor": {"queue_size": "many"}})
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_log("reload refused: the config does not load, nothing changed: "
                   f"{d.config}: [multiplexor] queue_size = 'many'")  # fmt: skip
        data, mid = message("broken")
        assert stack.send(data).data == (550, "5.7.1 generation two refuses")
        d.rewrite_config({"multiplexor": {"queue_size": 9}})
        assert d.status()["generation"] == 2 and d.status()["queue"]["size"] == 9
    finally:
        stack.stop()
        shutil.rmtree(files, ignore_errors=True)
