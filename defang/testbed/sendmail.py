"""A private, throw-away Sendmail on loopback, the twin of `defang.testbed.postfix`.

Debian's Sendmail (``sendmail-bin``) conflicts with the ``postfix`` package, so it is never
installed: ``scripts/bootstrap`` unpacks the three packages (``sendmail-bin``,
``sendmail-base``, ``sendmail-cf``) into a private prefix, `SENDMAIL_PREFIX`
(``/opt/defang-sendmail``, or ``$DEFANG_SENDMAIL_PREFIX``).  The binary runs from there
with a config of ours: `PrivateSendmail` writes a ``.mc`` file (`MC_TEMPLATE`, the
macros of the admin's own ``sendmail.mc``, with the milter lines of
``etc/sendmail.mc.snippet``), builds ``sendmail.cf`` from it with ``m4`` and the
``sendmail-cf`` macros, and runs ``sendmail -C sendmail.cf -bD`` (a daemon in the
foreground, so it is stopped by its PID).  It listens on ``127.0.0.1:smtp_port`` only,
relays everything to ``[127.0.0.1]:relay_port`` (normally a `defang.testbed.sink.Sink`)
and looks nothing up in DNS.

Layout under ``workdir`` (all created here, root's)::

    sendmail.mc, sendmail.cf   the config, and what m4 made of it
    queue/                     the queue (0700); quarantined messages are hf* files
    hosts, service.switch      name lookups from a file only: no DNS
    helpfile, statistics, sendmail.pid

Two things are different from the Postfix test bed:

* Sendmail only logs through syslog, and the test machines have no syslog daemon
  (no ``/dev/log``): there is no Sendmail log to read.  The tests check what a user sees
  instead: SMTP replies, the sink, and the queue files (`PrivateSendmail.held` reads the
  quarantine reason Sendmail keeps in each held message's queue file).
* At start-up, before it reads its config, Sendmail qualifies the machine's host name
  through the system resolver; an unqualified name (``vm``) that DNS cannot answer
  costs a 60 s sleep ("My unqualified host name unknown; sleeping for retry").  So it
  runs in a UTS namespace of its own whose host name is `HOSTNAME`, a qualified name
  (where no namespace may be made, as in some containers, it runs without one: slower
  to start on a machine whose name is not qualified, and it works the same).
  The same small parent process (`_REAPER`) is its child subreaper: PID 1 on the test
  machines never reaps orphans, and Sendmail's delivery processes outlive their parents.

Like any Sendmail, it adds a ``Date:`` (and ``From:``, ``Message-Id:``) header to mail that
comes without one; the Postfix test bed is configured not to.  Commands run against the
instance (a queue run, a release, a submission) go through `PrivateSendmail.command`,
in the same kind of namespace.

Everything here needs root.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from defang.testbed.ports import LOOPBACK
from defang.testbed.postfix import TestbedError, require_root, wait_for_banner

#: Where ``scripts/bootstrap`` unpacks Debian's Sendmail.
SENDMAIL_PREFIX = Path(os.environ.get("DEFANG_SENDMAIL_PREFIX", "/opt/defang-sendmail"))
#: The private instance's host name ($j), in its own UTS namespace: RFC 2606 .invalid.
HOSTNAME = "testbed.defang.invalid"


def sendmail_binary() -> Path:
    return SENDMAIL_PREFIX / "usr/libexec/sendmail/sendmail"


def cf_dir() -> Path:
    """The ``sendmail-cf`` macros (``m4/cf.m4``, features, mailers)."""
    return SENDMAIL_PREFIX / "usr/share/sendmail/cf"


def sendmail_available() -> bool:
    """True when the unpacked Sendmail and m4 are there (for test skips)."""
    return (os.access(sendmail_binary(), os.X_OK) and (cf_dir() / "m4/cf.m4").is_file()
            and shutil.which("m4") is not None)  # fmt: skip


#: The .mc the test bed builds its sendmail.cf from; ``{...}`` are filled in by
#: `PrivateSendmail`.  Each line says why it is there.
MC_TEMPLATE = """\
divert(-1)
dnl The defang test bed's Sendmail: loopback only, relays all mail to the sink.
divert(0)dnl
OSTYPE(`linux')dnl
dnl $j: a fixed, qualified name (never looked up).
define(`confDOMAIN_NAME', `{hostname}')dnl
dnl Host names from our own hosts file, never DNS; no interface probing, no ident.
define(`confSERVICE_SWITCH_FILE', `{workdir}/service.switch')dnl
define(`confHOSTS_FILE', `{workdir}/hosts')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_IDENT', `0s')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
dnl Our files, not /etc/mail's or /var/spool's.
define(`confPID_FILE', `{workdir}/sendmail.pid')dnl
define(`QUEUE_DIR', `{workdir}/queue')dnl
define(`STATUS_FILE', `{workdir}/statistics')dnl
define(`HELP_FILE', `{workdir}/helpfile')dnl
undefine(`ALIAS_FILE')dnl
dnl Retry deferred mail at every queue run (-q5s on the command line).
define(`confMIN_QUEUE_AGE', `0')dnl
dnl Listen on loopback only, with no submission port (no_default_msa).
FEATURE(`no_default_msa')dnl
DAEMON_OPTIONS(`Port={smtp_port}, Addr={loopback}, Name=MTA')dnl
dnl Everything goes to the sink; clients on 127.0.0.1 may relay (Sendmail's default).
define(`SMART_HOST', `esmtp:[{loopback}]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {relay_port}')dnl
dnl As many recipients as a test sends, in one delivery.
define(`confMAX_RCPTS_PER_MESSAGE', `0')dnl
define(`SMTP_MAILER_MAXRCPTS', `1000')dnl
dnl No sleeps after bad commands (tests provoke rejects).
define(`confBAD_RCPT_THROTTLE', `0')dnl
{milter}{extra}MAILER(`smtp')dnl
"""

#: Runs Sendmail (argv[1:]) in a UTS namespace named `HOSTNAME`, as a child subreaper:
#: prints Sendmail's PID, then reaps every process re-parented to it until none is left.
_REAPER = """
import ctypes, os, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if libc.unshare(0x04000000) == 0:  # CLONE_NEWUTS; refused in some containers: go on without
    socket.sethostname(sys.argv[1])
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL)
sys.stdout.write(f"{p.pid}\\n")
sys.stdout.flush()
os.close(1)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
"""


@functools.cache
def _can_unshare_uts() -> bool:
    """Whether this machine lets root make a UTS namespace (some containers do not)."""
    try:
        return subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def milter_lines(spec: str, flags: str = "F=T", timeouts: str = "C:1m;S:1m;R:2m;E:5m") -> str:
    """The ``INPUT_MAIL_FILTER`` and macro lines of ``etc/sendmail.mc.snippet`` for ``spec``.

    Read from the snippet itself, so the test bed runs exactly what the README tells an
    admin to paste, with only the socket (and, for a test, the flags) replaced.
    """
    here = Path(__file__).resolve().parents[2] / "etc/sendmail.mc.snippet"
    if not here.is_file():  # an installed defang: the package data
        here = Path(__file__).resolve().parents[1] / "etc/sendmail.mc.snippet"
    out = []
    for line in here.read_text().splitlines():
        if line.startswith("INPUT_MAIL_FILTER("):
            opts = ", ".join(filter(None, [f"S={spec}", flags, f"T={timeouts}"]))
            line = f"INPUT_MAIL_FILTER(`defang', `{opts}')dnl"
        if not line.startswith("dnl"):
            out.append(line)
    return "\n".join(out) + "\n"


class PrivateSendmail:
    """Sendmail on ``127.0.0.1:smtp_port``, relaying to ``127.0.0.1:relay_port``.

    ``milter`` is a socket spec (``unix:/path``, ``inet:PORT@127.0.0.1``) or None;
    ``milter_flags`` replaces ``F=T`` (empty: Sendmail's default, which accepts mail
    when the milter is unreachable); ``extra`` is appended to the .mc before the
    mailers.
    """

    def __init__(self, workdir: Path, smtp_port: int, relay_port: int, *, milter: str | None = None,
                 milter_flags: str = "F=T", extra: str = "") -> None:  # fmt: skip
        if smtp_port == 25 or relay_port == 25:
            raise TestbedError("the test bed never uses port 25")
        self.workdir = Path(workdir)
        self.smtp_port = smtp_port
        self.relay_port = relay_port
        self.milter = milter
        self.milter_flags = milter_flags
        self.extra = extra
        self.queue_dir = self.workdir / "queue"
        self.cf = self.workdir / "sendmail.cf"
        self.pid: int | None = None
        self._reaper: subprocess.Popen | None = None

    # -- config -----------------------------------------------------------------------

    def mc_text(self) -> str:
        milter = milter_lines(self.milter, self.milter_flags) if self.milter else ""
        return MC_TEMPLATE.format(hostname=HOSTNAME, workdir=self.workdir, smtp_port=self.smtp_port,
                                  relay_port=self.relay_port, loopback=LOOPBACK, milter=milter,
                                  extra=self.extra)  # fmt: skip

    def write_config(self) -> None:
        """Write the .mc and build sendmail.cf with m4, plus the files it names."""
        require_root("PrivateSendmail")
        if not sendmail_available():
            raise TestbedError(f"no Sendmail under {SENDMAIL_PREFIX} (scripts/bootstrap unpacks it) or no m4")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        (self.workdir / "service.switch").write_text("hosts files\naliases files\n")
        (self.workdir / "hosts").write_text(f"127.0.0.1 {HOSTNAME} localhost\n")
        shutil.copyfile(SENDMAIL_PREFIX / "etc/mail/helpfile", self.workdir / "helpfile")
        (self.workdir / "statistics").touch()
        mc = self.workdir / "sendmail.mc"
        mc.write_text(self.mc_text())
        proc = subprocess.run(["m4", f"-D_CF_DIR_={cf_dir()}/", str(cf_dir() / "m4/cf.m4"), str(mc)],
                              capture_output=True, timeout=60)  # fmt: skip
        if proc.returncode != 0 or not proc.stdout:
            err = proc.stderr.decode(errors="replace")
            raise TestbedError(f"m4 could not build sendmail.cf from {mc}: {err}")
        self.cf.write_bytes(proc.stdout)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Write the config, start ``sendmail -bD`` and wait for its 220 greeting (30 s, or 90 s
        where it runs without a namespace and may sleep 60 s first)."""
        timeout = timeout or (30 if _can_unshare_uts() else 90)
        self.write_config()
        argv = [str(sendmail_binary()), "-C", str(self.cf), "-bD", "-q5s", "-OLogLevel=0"]
        self._reaper = subprocess.Popen([sys.executable, "-c", _REAPER, HOSTNAME, *argv],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        assert self._reaper.stdout is not None
        line = self._reaper.stdout.readline()
        self._reaper.stdout.close()
        if not line.strip().isdigit():
            err = self._reaper.stderr.read().decode(errors="replace") if self._reaper.stderr else ""
            self._reaper.wait(timeout)
            self._reaper = None
            raise TestbedError(f"sendmail did not start: {err.strip() or '(no message)'}")
        self.pid = int(line)
        try:
            wait_for_banner(LOOPBACK, self.smtp_port, timeout)
        except TestbedError:
            self.stop()
            raise

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to Sendmail (it signals its children); wait until all of them are gone."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.pid = None
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            try:
                reaper.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TestbedError(f"Sendmail processes still running {timeout}s after SIGTERM "
                                   f"(reaper pid {reaper.pid})") from None  # fmt: skip
            if reaper.stderr is not None:
                reaper.stderr.close()

    def command(self, *args: str) -> list[str]:
        """The argv of this Sendmail's binary with our config and ``args``, in a UTS namespace
        named `HOSTNAME` like the daemon's (anywhere else it may sleep 60 s at start-up)."""
        argv = [str(sendmail_binary()), "-C", str(self.cf), *args]
        if not _can_unshare_uts():
            return argv
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', HOSTNAME, *argv]

    def write_wrapper(self, path: Path) -> Path:
        """A ``sendmail`` command for defang's ``sendmail_path`` that submits to this instance.

        ``-odi``: the message is delivered before the command exits; a background delivery
        process would be orphaned where no one reaps it.
        """
        argv = " ".join(shlex.quote(a) for a in self.command("-odi"))
        path.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
        path.chmod(0o755)
        return path

    # -- the queue ---------------------------------------------------------------------

    def queue(self) -> list[dict]:
        """Messages in the queue (``qf*``), held ones (``hf*``) too: each a dict of
        queue_id, held (bool), reason (the quarantine reason), sender, recipients."""
        out = []
        for path in sorted(self.queue_dir.glob("[qh]f*")):
            entry: dict = {"queue_id": path.name[2:], "held": path.name.startswith("hf"), "reason": "",
                           "sender": "", "recipients": []}  # fmt: skip
            try:
                lines = path.read_bytes().decode("utf-8", "replace").splitlines()
            except FileNotFoundError:  # delivered while we looked
                continue
            for line in lines:
                if line.startswith("q"):
                    entry["reason"] = line[1:]
                elif line.startswith("S"):
                    entry["sender"] = line[1:].strip("<>")
                elif line.startswith("R"):  # R<flags>:<address>
                    entry["recipients"].append(line.rsplit(":", 1)[-1].strip("<>"))
            out.append(entry)
        return out

    def held(self) -> list[dict]:
        """The quarantined messages (a milter's ``hold``): `queue` entries with held True."""
        return [e for e in self.queue() if e["held"]]

    def wait_queue_empty(self, timeout: float = 30) -> None:
        """Wait until the queue holds nothing but quarantined messages."""
        deadline = time.monotonic() + timeout
        while pending := [e for e in self.queue() if not e["held"]]:
            if time.monotonic() > deadline:
                raise TestbedError(f"queue not empty after {timeout}s: {pending}")
            time.sleep(0.1)

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> PrivateSendmail:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
