"""Started as root with no paths given, as an admin follows the README: Postfix pointed at
the milter socket defang's start-up line names gets its mail filtered."""

import re
import subprocess
import sys

import pytest
from daemon import FILTERS, Defang, system_runtime_dir
from mta import Stack, needs_postfix

pytestmark = [pytest.mark.integration, needs_postfix]


def test_postfix_pointed_at_the_logged_socket_gets_mail_through_defang():
    with system_runtime_dir() as run:
        s = Stack(FILTERS / "fe_actions.py")
        s.defang.cleanup()
        s.defang = Defang(FILTERS / "fe_actions.py", default_paths=True)
        try:
            s.sink.start()
            s.defang.start()
            logged = re.search(r"defang running: milter on (\S+),", s.defang.log()).group(1)
            assert logged == f"unix:{run}/milter.sock"
            s.postfix.milter = logged  # what the admin copies into smtpd_milters
            s.postfix.start()
            r = s.send(b"From: alice@example.org\r\nSubject: root defaults\r\n\r\nHi\r\n")
            assert r.data[0] == 250, r
            m = s.arrived(b"root defaults")
            assert b"X-Relay-Ip: 127.0.0.1" in m.raw  # the filter ran on it
            ctl = subprocess.run([sys.executable, "-m", "defang.cli.ctl", "status"], capture_output=True,
                                 text=True, timeout=60, cwd="/")  # fmt: skip
            assert ctl.returncode == 0 and "fe_actions.py" in ctl.stdout, ctl.stderr
        finally:
            s.stop()
