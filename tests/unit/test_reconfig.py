"""What a reload applies and what it leaves for a restart (defang.core.reconfig), on Config
objects: no file, no process."""

from dataclasses import replace
from pathlib import Path

from defang.core import config
from defang.core.config import ReplySpec
from defang.core.reconfig import RESTART_ONLY, reconfigure


def running() -> config.Config:
    return config.finish(config.Config(runtime_dir=Path("/run/defang")))


def test_nothing_changed_is_nothing_changed():
    r = reconfigure(running(), running())
    assert r.changed == () and r.restart == () and r.cfg == running()


def test_what_can_be_applied_is_applied_with_one_line_each():
    old = running()
    fresh = replace(old, filter=Path("/etc/defang/new.py"), max_workers=4, log_level="debug",
                    clamav_timeout=15.0, dns_servers=("127.0.0.1:5353",), max_recipients=50,
                    on_busy=ReplySpec("421", "4.3.2", "later"))  # fmt: skip
    r = reconfigure(old, fresh)
    assert r.cfg == fresh and r.restart == ()
    assert set(r.changed) == {
        f"[daemon] filter: {old.filter} -> /etc/defang/new.py",
        "[daemon] log_level: info -> debug",
        "[milter] max_recipients: 1000 -> 50",
        "[multiplexor] max_workers: 10 -> 4",
        "[replies] on_busy: 451 4.3.2 defang busy, try again later -> 421 4.3.2 later",
        "[clamav] timeout: 20 -> 15",
        "[dns] servers: [] -> [127.0.0.1:5353]",
    } and len(r.changed) == 7


def test_what_needs_a_restart_is_named_and_keeps_its_running_value():
    old = running()
    fresh = replace(old, milter_socket="unix:/var/spool/postfix/defang.sock", daemon_user="mail",
                    control_socket=Path("/tmp/c.sock"), max_workers=3)  # fmt: skip
    r = reconfigure(old, fresh)
    assert r.cfg.milter_socket == old.milter_socket and r.cfg.daemon_user == "defang"
    assert r.cfg.control_socket == old.control_socket and r.cfg.max_workers == 3
    assert r.changed == ("[multiplexor] max_workers: 10 -> 3",)
    assert set(r.restart) == {
        "[daemon] user: defang -> mail (needs a restart; still defang)",
        f"[milter] socket: {old.milter_socket} -> unix:/var/spool/postfix/defang.sock (needs a restart; "
        f"still {old.milter_socket})",
        "[multiplexor] control_socket: /run/defang/control.sock -> /tmp/c.sock (needs a restart; still "
        "/run/defang/control.sock)",
    }


def test_every_restart_only_name_is_an_option():
    assert RESTART_ONLY <= {attr for attr, _ in config.KEYS.values()}
