"""A private, throw-away Postfix instance on loopback.

`PrivatePostfix` writes its own ``main.cf`` and ``master.cf`` into ``workdir/config`` and
runs ``postfix -c workdir/config start``.  It listens on ``127.0.0.1:smtp_port`` only,
relays everything to ``[127.0.0.1]:relay_port`` (normally a `defang.testbed.sink.Sink`),
does no local delivery and no DNS, and is configured to leave messages alone: what the
sink receives is what the client sent, plus exactly one ``Received:`` header that
Postfix prepends.  See `MAIN_CF_DEFAULTS` for every setting and why it is there.

Layout under ``workdir`` (all created by `PrivatePostfix`)::

    config/    main.cf, master.cf           root, 0755
    queue/     queue_directory               root, 0755 (subdirs: post-install)
    maillog    written by postlogd (there is no syslog daemon on the test machines)
    data       symlink to the data_directory, /tmp/defang-postfix-data-XXXX (see below)

Permissions: ``workdir`` may be a pytest ``tmp_path`` (below ``/tmp/pytest-of-root``, mode
0700, which the ``postfix`` user cannot traverse).  Postfix mostly copes: the master
and every daemon ``chdir`` into the queue directory and open their other files (the
maillog, table caches) while still root -- Postfix is built to run its daemons
chrooted.  Two things are opened as ``postfix`` by absolute path, though:

* ``data_directory``: the master creates ``master.lock`` there with euid ``postfix``
  ("open lock file ...: Permission denied" under a 0700 parent).  So the data directory
  is created with ``mkdtemp`` directly under /tmp (world-searchable) and removed by
  `PrivatePostfix.stop`; ``workdir/data`` is a symlink to it for humans.
* a ``unix:`` milter socket: smtpd connects *after* dropping to ``postfix``, so the socket
  must live in a directory ``postfix`` can reach.  Use `socket_dir` for that (or an
  ``inet:`` milter on 127.0.0.1).

We deliberately do not chmod pytest's directories (o+x on the parents would also work,
until the next pytest session starts: pytest resets ``pytest-of-<user>`` to 0700, which
broke a running test bed when two sessions overlapped).

Everything here needs root: ``postfix start`` refuses to run otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from defang.testbed.ports import LOOPBACK
from defang.testbed.procs import stat_fields
from defang.testbed.smtpclient import normalize_for_smtp

POSTFIX_USER = "postfix"

#: Postfix's daemon and command directories on Debian; used to find programs that are not
#: on $PATH (smtp-sink lives in /usr/sbin on Debian, in the daemon dir elsewhere).
_SEARCH_DIRS = ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/libexec/postfix", "/usr/bin")


class TestbedError(RuntimeError):
    """The test bed could not be set up or driven (not root, Postfix missing, timeout)."""

    __test__ = False  # not a pytest test class, despite the name


def require_root(what: str) -> None:
    """Raise `TestbedError` unless running as root.

    ``postfix start`` needs root (the master binds the port and starts daemons as
    ``postfix``), and so does ``smtp-sink -u postfix``.  Failing early gives one clear
    message instead of a confusing Postfix fatal error.
    """
    if os.geteuid() != 0:
        raise TestbedError(f"{what} must run as root (euid is {os.geteuid()})")


def find_program(name: str) -> str:
    """Return the absolute path of a Postfix program, or raise `TestbedError`."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SEARCH_DIRS:
        p = Path(d, name)
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise TestbedError(f"{name} not found (is the Debian package 'postfix' installed?)")


def postfix_available() -> bool:
    """True when the programs the test bed needs are installed (for test skips)."""
    try:
        for name in ("postfix", "postconf", "postqueue", "smtp-sink"):
            find_program(name)
    except TestbedError:
        return False
    return True


def socket_dir(prefix: str = "defang-sock-") -> Path:
    """Create a fresh directory for ``unix:`` milter sockets that Postfix can reach.

    ``mkdtemp`` under /tmp (every ancestor world-searchable), then group ``postfix`` and
    mode 0750: smtpd (uid ``postfix``, no supplementary groups) may traverse it, other
    users may not.  The socket inside must itself be group ``postfix``, mode 0660.
    The caller removes the directory when done.
    """
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    shutil.chown(d, "root", POSTFIX_USER)
    os.chmod(d, 0o750)
    return d


def chown_postfix(path: Path, mode: int) -> None:
    """chown ``path`` to ``postfix:postfix`` and chmod it to ``mode``."""
    shutil.chown(path, POSTFIX_USER, POSTFIX_USER)
    os.chmod(path, mode)


def wait_for_banner(host: str, port: int, timeout: float) -> str:
    """Connect repeatedly until the server at host:port sends its greeting; return it.

    A listening socket is not enough: Postfix's master accepts connections before an
    smtpd process is ready, so only the greeting proves the service is up.  A 4xx or
    5xx greeting proves it too: a milter refusing every client at connect (a test of a
    blocklist) makes smtpd greet with its reply.
    """
    deadline = time.monotonic() + timeout
    last: Exception | str = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                line = s.makefile("rb").readline().decode("latin-1").rstrip("\r\n")
                if line[:1] in ("2", "4", "5") and line[1:3].isdigit() and line[3:4] in (" ", "-"):
                    try:
                        s.sendall(b"QUIT\r\n")
                    except OSError:
                        pass
                    return line
                last = f"unexpected greeting {line!r}"
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TestbedError(f"no SMTP greeting from {host}:{port} within {timeout}s: {last}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


_HEADER_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def expected_after_relay(data: bytes) -> bytes:
    """What the sink receives (minus Postfix's Received header) when ``data`` is sent.

    A model of the three changes Postfix 3.7 makes to message content that no
    main.cf setting turns off; it reproduces exactly what this test bed delivers for
    all 193 files of the developer corpus (41 of them are changed):

    1. smtpd: leading mbox "From " lines (also ">From ") become
       ``X-Mailbox-Line: From ...`` headers; if the first line then starts with a space
       or tab, smtpd inserts an empty line before it (otherwise it would read as a
       continuation of the Received header that Postfix prepends).
    2. cleanup: whitespace between a header name and its colon is removed
       ("Subject :" becomes "Subject:").
    3. cleanup: a primary header section that ends with a line which is neither a
       header, a continuation line nor empty gets an empty line inserted before that
       line, so everything from there on is body.

    Not modelled: header truncation at ``header_size_limit``.  Note that Postfix caps
    that limit at 60000 bytes whenever a milter is configured (the milter protocol's
    request size), so a single header longer than that is cut even with the 4 MB
    setting here.
    """
    lines = normalize_for_smtp(data).split(b"\r\n")[:-1]
    out: list[bytes] = []
    i = 0
    while i < len(lines) and lines[i].lstrip(b">").startswith(b"From "):
        out.append(b"X-Mailbox-Line: " + lines[i])
        i += 1
    in_header = True
    if i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        out.append(b"")
        in_header = False
    while in_header and i < len(lines):
        line = lines[i]
        if line == b"":
            break
        if m := _HEADER_NAME.match(line):
            out.append(m.group(1) + b":" + line[m.end() :])
        elif line[:1] in (b" ", b"\t"):
            out.append(line)
        else:
            out.append(b"")
            break
        i += 1
    out.extend(lines[i:])
    return b"\r\n".join(out) + b"\r\n" if out else b""


#: main.cf settings, in order, with the reason for each.  Keys in ``extra`` override
#: these; ``{...}`` placeholders are filled in by `PrivatePostfix`.
MAIN_CF_DEFAULTS: dict[str, str] = {
    # -- instance layout ------------------------------------------------------------
    # 3.6 behaviour and no "backwards-compatible default" warnings in the log.
    "compatibility_level": "3.6",
    "queue_directory": "{queue_dir}",
    "data_directory": "{data_dir}",
    # postlogd writes this file; there is no syslog on the test machines.
    "maillog_file": "{maillog}",
    # maillog_file must start with one of these (default "/var, /dev/stdout").
    "maillog_file_prefixes": "{workdir}",
    "mail_owner": POSTFIX_USER,
    "setgid_group": "postdrop",
    # A fixed, non-resolvable name (RFC 2606 .invalid): never looked up.
    "myhostname": "testbed.defang.invalid",
    "mydomain": "defang.invalid",
    "myorigin": "$myhostname",
    # -- network: loopback only, no DNS ------------------------------------------------
    "inet_interfaces": LOOPBACK,
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",
    "mynetworks_style": "host",
    "relayhost": "[127.0.0.1]:{relay_port}",
    "smtpd_relay_restrictions": "permit_mynetworks, reject",
    # Defaults, spelled out: nothing but relay control decides acceptance.
    "smtpd_client_restrictions": "",
    "smtpd_helo_restrictions": "",
    "smtpd_sender_restrictions": "",
    "smtpd_recipient_restrictions": "",
    "smtpd_data_restrictions": "",
    "smtp_dns_support_level": "disabled",
    "smtp_host_lookup": "native",
    "smtpd_peername_lookup": "no",
    "smtp_address_preference": "ipv4",
    "smtp_tls_security_level": "none",
    "smtpd_tls_security_level": "none",
    # -- no local delivery ---------------------------------------------------------------
    "mydestination": "",
    "local_transport": "error:local delivery is disabled in the defang test bed",
    "alias_maps": "",
    "alias_database": "",
    "local_recipient_maps": "",
    "biff": "no",
    # -- acceptance: take any syntactically possible envelope ---------------------------
    # RFC 821 strictness would reject envelopes defang's tests want to send (e.g.
    # addresses without <>, comments); the default is already "no", pinned here.
    "strict_rfc821_envelopes": "no",
    # We are a relay without recipient/sender tables: nothing is "unlisted".  The
    # recipient default is "yes"; for a relay domain with empty relay_recipient_maps it
    # would be a no-op, but pinning "no" avoids surprises if a test adds a domain.
    "smtpd_reject_unlisted_sender": "no",
    "smtpd_reject_unlisted_recipient": "no",
    # No 1-second sleeps after rejected commands: tests that provoke rejects
    # (milter 5xx, relay denied) would otherwise get slow.
    "smtpd_error_sleep_time": "0",
    "smtpd_soft_error_limit": "100",
    "smtpd_hard_error_limit": "1000",
    # -- speed under load ----------------------------------------------------------------
    "in_flow_delay": "0",
    "default_process_limit": "200",
    "initial_destination_concurrency": "20",
    "default_destination_concurrency_limit": "100",
    # One delivery per message at the sink even with many recipients (default 50 would
    # split a 60-recipient message into two sink files).
    "default_destination_recipient_limit": "1000",
    # Short IDs are reused within seconds and break counting keyed on them.
    "enable_long_queue_ids": "yes",
    # Retry deferred mail quickly (a test that stops the sink and restarts it).
    "queue_run_delay": "5s",
    "minimal_backoff_time": "5s",
    "maximal_backoff_time": "30s",
    "smtp_connect_timeout": "5s",
    "delay_warning_time": "0",
    # -- message fidelity: do not touch the message --------------------------------------
    # (Counts below: corpus files, of 193, that arrive changed *beyond* the three
    # unavoidable changes in `expected_after_relay` when that one setting is left at
    # its default -- measured by relaying the whole corpus.)
    # Default "permit_inet_interfaces" makes a client on 127.0.0.1 "local", and for
    # local clients cleanup rewrites addresses in headers (canonicalisation, appending
    # @$myorigin) and adds missing From/Date/Message-ID/To headers: 80 files.  Empty:
    # no client is local, and remote_header_rewrite_domain (empty) disables remote
    # rewriting.
    "local_header_rewrite_clients": "",
    "remote_header_rewrite_domain": "",
    # Do not add Date/From/Message-ID/To to remote mail either ("yes": 77 files).
    "always_add_missing_headers": "no",
    # Default "bcc, content-length, resent-bcc, return-path": cleanup deletes those
    # headers from every message (61 files, mostly Return-Path).  defang must see, and
    # the sink must get, them as sent.
    "message_drop_headers": "",
    # Default 100 KB: a longer (folded) header is truncated -- flanker-long-header.eml
    # has a single 209 KB header.  NB: with any milter configured Postfix caps this at
    # 60000 (milter request size), so that file is then cut regardless.
    "header_size_limit": "4194304",
    # Default 50: more Received headers than this bounces the message as a mail loop
    # (no corpus file has that many; tests that stack Received headers might).
    "hopcount_limit": "1000",
    # 200 MB messages; the mailbox limit must not be smaller than the message limit.
    "message_size_limit": "209715200",
    "mailbox_size_limit": "419430400",
    "virtual_mailbox_limit": "419430400",
    # Default 998: the SMTP client breaks every longer line, header or body, by
    # inserting "\r\n " (6 files: 200 KB lines, long boundaries, a 6 KB header).
    # 0 = send lines as they are.
    "smtp_line_length_limit": "0",
    # No 8bit -> 7bit (quoted-printable) conversion, even if the next hop does not offer
    # 8BITMIME (smtp-sink offers it, so the default changes nothing there today).
    "disable_mime_output_conversion": "yes",
    # No CTE checks that could reject "invalid" MIME (the corpus is full of it).
    "strict_7bit_headers": "no",
    "strict_8bitmime_body": "no",
    "strict_mime_encoding_domain": "no",
    "strict_8bitmime": "no",
    # Do not announce/strip anything odd in EHLO (defaults, pinned).
    "smtpd_discard_ehlo_keywords": "",
    "smtp_discard_ehlo_keywords": "",
    # No address rewriting of any kind (all empty by default; pinned so an override in
    # a test is visible).
    "canonical_maps": "",
    "sender_canonical_maps": "",
    "recipient_canonical_maps": "",
    "masquerade_domains": "",
    "smtp_generic_maps": "",
    "header_checks": "",
    "body_checks": "",
    "smtp_header_checks": "",
    "smtp_body_checks": "",
    # -- milter ----------------------------------------------------------------------------
    "milter_protocol": "6",
    "milter_default_action": "tempfail",
    "smtpd_milters": "",
    "non_smtpd_milters": "",
    "milter_connect_timeout": "30s",
    "milter_command_timeout": "30s",
    "milter_content_timeout": "300s",
}

# Internal services.  Nothing chrooted (a chrooted smtpd cannot reach unix:/abs/path
# milter sockets, and a chroot would need copies of /etc files).  No local/virtual
# delivery agents, no postscreen, no pickup-side milters.
_MASTER_CF_SERVICES = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


#: Runs ``postfix start`` (argv[1:]) as a child subreaper (prctl PR_SET_CHILD_SUBREAPER),
#: prints one JSON status line {"rc", "output"} and then reaps every process that gets
#: re-parented to it (the master and, after ``postfix stop``, its orphaned daemons)
#: until none is left.
_REAPER = """
import ctypes, json, os, subprocess, sys, threading
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
mfd, sfd = os.openpty()  # Postfix prints errors to stderr only if it is a tty
chunks = []
def drain():
    while True:
        try:
            b = os.read(mfd, 65536)
        except OSError:
            return
        if not b:
            return
        chunks.append(b)
t = threading.Thread(target=drain, daemon=True)
t.start()
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=sfd, stderr=sfd)
os.close(sfd)
rc = p.wait()
t.join(5)
out = b"".join(chunks).decode(errors="replace").replace("\\r\\n", "\\n")
sys.stdout.write(json.dumps({"rc": rc, "output": out}) + "\\n")
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


class PrivatePostfix:
    """A private Postfix 3.7 instance on ``127.0.0.1:smtp_port`` relaying to a sink.

    ``milter`` is an ``smtpd_milters`` value (``unix:/path`` or ``inet:127.0.0.1:PORT``)
    or None.  ``extra`` overrides any main.cf key (e.g. ``milter_command_timeout``).

    Use as a context manager (``with PrivatePostfix(...) as pf:``) to start it and make
    sure it is stopped.  ``workdir`` is created if needed; it may be a pytest
    ``tmp_path`` (see the module docstring for why that works).  Must run as root.
    """

    def __init__(
        self,
        workdir: Path,
        smtp_port: int,
        relay_port: int,
        milter: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        if smtp_port == 25 or relay_port == 25:
            raise ValueError("the test bed never uses port 25")
        self.workdir = Path(workdir).resolve()
        self.smtp_port = smtp_port
        self.relay_port = relay_port
        self.milter = milter
        self.extra: dict[str, str] = dict(extra or {})
        self.config_dir = self.workdir / "config"
        self.queue_dir = self.workdir / "queue"
        self.data_dir: Path | None = None  # created by write_config, see module doc
        self.maillog = self.workdir / "maillog"
        self.started = False
        self._reaper: subprocess.Popen[bytes] | None = None

    # -- configuration -------------------------------------------------------------

    def main_cf_settings(self) -> dict[str, str]:
        """The main.cf key/value pairs this instance uses (defaults, milter, extra)."""
        subst = {
            "workdir": str(self.workdir),
            "queue_dir": str(self.queue_dir),
            "data_dir": str(self.data_dir or "(not yet created)"),
            "maillog": str(self.maillog),
            "relay_port": str(self.relay_port),
        }
        settings = {k: v.format(**subst) for k, v in MAIN_CF_DEFAULTS.items()}
        if self.milter:
            settings["smtpd_milters"] = self.milter
        settings.update(self.extra)
        return settings

    def master_cf_text(self) -> str:
        """master.cf: one loopback smtpd listener plus the internal services."""
        return (
            f"{LOOPBACK}:{self.smtp_port} inet n - n - - smtpd\n" + _MASTER_CF_SERVICES
        )

    def write_config(self) -> None:
        """Create the directories and write main.cf and master.cf from scratch."""
        require_root("PrivatePostfix")
        for name in ("postfix", "postconf", "postqueue", "postsuper"):
            find_program(name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in (self.config_dir, self.queue_dir):
            d.mkdir(exist_ok=True)
            shutil.chown(d, "root", "root")
            os.chmod(d, 0o755)
        if self.data_dir is None or not self.data_dir.is_dir():
            self.data_dir = Path(tempfile.mkdtemp(prefix="defang-postfix-data-", dir="/tmp"))
        chown_postfix(self.data_dir, 0o700)
        link = self.workdir / "data"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.data_dir)
        lines = ["# Written by defang.testbed.postfix.PrivatePostfix; do not edit."]
        lines += [f"{k} = {v}" for k, v in self.main_cf_settings().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf_text())
        self._backdate_config()

    def _backdate_config(self) -> None:
        """Set main.cf/master.cf mtimes a few seconds into the past.

        Postfix programs that read a main.cf modified within the last second or so
        sleep until it is older (a guard against reading a half-written file): a fresh
        main.cf costs 1.5-2 s in ``postfix start``, ``postconf`` and each reload.  We
        write the files completely before any Postfix program runs, so that guard
        protects nothing here.
        """
        past = time.time() - 5
        for name in ("main.cf", "master.cf"):
            p = self.config_dir / name
            if p.exists():
                os.utime(p, (past, past))

    # -- running postfix commands ----------------------------------------------------

    def _run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """Run a Postfix command against this config dir; return its stdout.

        Postfix commands write their diagnostics to stderr only when stderr is a
        terminal (otherwise to the log service, which may not be running yet, so a
        failing ``postfix start`` is silent).  stderr is therefore a pseudo-terminal,
        and its text goes into the `TestbedError`.
        """
        prog = find_program(argv[0])
        master_fd, slave_fd = os.openpty()
        err_chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    chunk = os.read(master_fd, 65536)
                except OSError:  # EIO once every writer has closed the slave side
                    return
                if not chunk:
                    return
                err_chunks.append(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            with subprocess.Popen(
                [prog, "-c", str(self.config_dir), *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=slave_fd,
                env={**os.environ, "LC_ALL": "C"},
            ) as proc:
                os.close(slave_fd)
                slave_fd = -1
                try:
                    out, _ = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise TestbedError(f"{' '.join(argv)} timed out after {timeout}s") from None
        finally:
            if slave_fd >= 0:
                os.close(slave_fd)
            reader.join(timeout=5)
            os.close(master_fd)
        err = b"".join(err_chunks).decode(errors="replace").replace("\r\n", "\n").strip()
        if check and proc.returncode != 0:
            raise TestbedError(
                f"{' '.join(argv)} -c {self.config_dir} failed ({proc.returncode}): "
                f"{err or '(no message)'}\nmaillog tail:\n{self._log_tail()}"
            )
        return out.decode(errors="replace")

    def _log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def master_pid(self) -> int | None:
        """PID of the running master, or None (reads queue/pid/master.pid)."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def _children(self) -> set[int]:
        """PIDs of the master's child processes (the daemons)."""
        master = self.master_pid()
        if master is None:
            return set()
        kids: set[int] = set()
        for pid, fields in stat_fields():
            if int(fields[1]) == master:
                kids.add(pid)
        return kids

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Write the config, start Postfix and wait for the 220 greeting.

        ``postfix start`` runs inside a small reaper process (see `_REAPER`): the master
        daemonizes, and when it is stopped its children outlive it for a moment.  On
        this machine PID 1 never reaps orphans, so without a subreaper every start/stop
        would leave a handful of ``<defunct>`` Postfix processes behind.
        """
        self.write_config()
        if self.master_pid() is not None:
            raise TestbedError(f"a Postfix master is already running for {self.config_dir}")
        self._reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, find_program("postfix"), "-c",
             str(self.config_dir), "start"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C"},
            start_new_session=True,  # keep a ^C in the terminal away from Postfix
        )
        assert self._reaper.stdout is not None
        status_line = self._reaper.stdout.readline()
        self._reaper.stdout.close()
        try:
            status = json.loads(status_line)
        except ValueError:
            status = {"rc": -1, "output": "reaper died without a status"}
        if status["rc"] != 0:
            self.stop(timeout=timeout)  # reaps the reaper, removes the data directory
            raise TestbedError(
                f"postfix -c {self.config_dir} start failed ({status['rc']}): "
                f"{status['output'].strip() or '(no message)'}\n"
                f"maillog tail:\n{self._log_tail()}"
            )
        self.started = True
        try:
            wait_for_banner(LOOPBACK, self.smtp_port, timeout)
        except TestbedError as e:
            self.stop()
            raise TestbedError(f"{e}\nmaillog tail:\n{self._log_tail()}") from None

    def stop(self, timeout: float = 30) -> None:
        """Stop Postfix and wait until its processes are gone (no-op if not running)."""
        pid = self.master_pid()
        if pid is not None:
            self._run("postfix", "stop", check=False, timeout=timeout)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid):
                if time.monotonic() > deadline:
                    self._run("postfix", "abort", check=False)
                    raise TestbedError(f"Postfix master {pid} did not exit within {timeout}s")
                time.sleep(0.05)
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            # The reaper exits once the last Postfix daemon has exited and been reaped.
            try:
                reaper.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TestbedError(
                    f"Postfix daemons still running {timeout}s after stop "
                    f"(reaper pid {reaper.pid})"
                ) from None
        self.started = False
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def reload(self, timeout: float = 30) -> None:
        """Make the master re-read main.cf/master.cf; wait for the old daemons to exit.

        This sends SIGHUP to the master, which is what ``postfix reload`` does after its
        sanity checks; the script also starts a background ``postsuper`` that would be
        orphaned (and left as a zombie here).  After SIGHUP, idle daemons from before
        the reload may still take one more connection with the old settings; waiting
        for them to go makes ``set_milter(...); send(...)`` deterministic.  Daemons busy
        with a session finish it first; after ``timeout`` we stop waiting (no error).
        """
        master = self.master_pid()
        if master is None:
            raise TestbedError(f"Postfix for {self.config_dir} is not running")
        old = self._children()
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while old and time.monotonic() < deadline:
            old = {p for p in old if _pid_alive(p)}
            if old:
                time.sleep(0.02)
        wait_for_banner(LOOPBACK, self.smtp_port, timeout)

    def set_config(self, **settings: str) -> None:
        """Change main.cf keys with ``postconf -e`` (no reload; see `reload`)."""
        self.extra.update(settings)
        if not (self.config_dir / "main.cf").exists():
            return
        self._run("postconf", "-e", *(f"{k}={v}" for k, v in settings.items()))
        self._backdate_config()

    def set_milter(self, spec: str | None, reload: bool = True) -> None:
        """Set (or with None, clear) ``smtpd_milters`` and reload if running."""
        self.milter = spec
        self.extra.pop("smtpd_milters", None)
        if (self.config_dir / "main.cf").exists():
            self._run("postconf", "-e", f"smtpd_milters={spec or ''}")
            self._backdate_config()
        if reload and self.master_pid() is not None:
            self.reload()

    def flush(self) -> None:
        """Ask the queue manager to retry all deferred mail now (``postqueue -f``)."""
        self._run("postqueue", "-f")

    # -- queue and log --------------------------------------------------------------

    def queue(self) -> list[dict]:
        """Every queued message, as parsed from ``postqueue -j`` (one JSON object each).

        Keys per Postfix 3.7: queue_name, queue_id, arrival_time, message_size,
        forced_expire, sender, recipients (list of {address, delay_reason?}).
        """
        out = self._run("postqueue", "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def hold_queue(self) -> list[dict]:
        """Messages in the hold queue (where a milter ``quarantine`` puts them)."""
        return [e for e in self.queue() if e.get("queue_name") == "hold"]

    def delete_queue(self, queue_name: str = "ALL") -> None:
        """``postsuper -d ALL [queue_name]``: drop queued mail (e.g. "hold")."""
        args = ["postsuper", "-d", "ALL"]
        if queue_name != "ALL":
            args.append(queue_name)
        self._run(*args)

    def log_text(self) -> str:
        """The instance's maillog (postlogd output); empty if none yet."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_queue_empty(self, timeout: float = 30) -> None:
        """Wait until the queue holds nothing but held messages."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [e for e in self.queue() if e.get("queue_name") != "hold"]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"queue not empty after {timeout}s: {pending}")
            time.sleep(0.1)

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> PrivatePostfix:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
