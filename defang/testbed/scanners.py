"""Private SpamAssassin ``spamd``, ClamAV ``clamd`` and ``rspamd`` on loopback, for tests and
benchmarks.

Debian's packages, started by us and stopped by PID, offline (``../shared/notes/
scanners.md`` has the why of each setting):

- spamd: the stock rules pinned (``-C /usr/share/spamassassin``), a private site config
  (the ``.pre`` files copied, a ``local.cf`` with no network test, no Bayes), local
  tests only (``-L``), on ``127.0.0.1:PORT`` and a Unix socket; ready when it answers
  PING (its port accepts connections half a second before it can answer).
- clamd: a signature database of our own (ClamAV ships none): one body signature for
  the EICAR test file, found anywhere, also inside archives and mail; a Unix socket and
  ``127.0.0.1:PORT`` (``TCPAddr`` set: clamd binds every address otherwise).

The EICAR string is assembled at run time, so no file of the repository is one a
virus scanner would flag.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from defang.testbed.ports import free_port
from defang.testbed.procs import stop_process, wait_ready

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!" + b"$H+H*")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
LOCAL_CF = """\
skip_rbl_checks    1
use_razor2         0
use_pyzor          0
use_bayes          0
bayes_auto_learn   0
dns_available      no
report_safe        0
required_score     5.0
"""


def scanners_available() -> str | None:
    """None when spamd and clamd are installed, else what is missing."""
    missing = [p for p in ("spamd", "clamd") if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    return f"not installed: {', '.join(missing)} (scripts/bootstrap installs them)" if missing else None


class _Daemon:
    """A daemon of ours in ``dir`` (made here, and then removed by ``stop``, unless given),
    on 127.0.0.1:``port`` and the Unix socket ``<dir>/<name>.sock``."""

    proc: subprocess.Popen[bytes] | None = None

    #: the readiness probe: what to send, what the answer has when the daemon can answer
    PING: tuple[bytes, bytes] = (b"", b"")

    def __init__(self, name: str, directory: Path | None, port: int | None) -> None:
        self.name = name
        self.own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix=f"defang-{name}-"))
        self.port = port or free_port()
        self.socket_path = self.dir / f"{name}.sock"
        self.log = self.dir / f"{name}.log"

    @property
    def inet(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    @property
    def unix(self) -> str:
        return f"unix:{self.socket_path}"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the PID we started, SIGKILL if it lingers; our directory removed."""
        stop_process(self.proc, timeout)
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _launch(self, argv: list[str], timeout: float, **popen) -> None:  # noqa: ANN003
        """Start ``argv`` in the foreground (its PID is ours to stop), output to <name>.out."""
        with open(self.dir / f"{self.name}.out", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         **popen)  # fmt: skip
        self._wait_ready(self._pong, timeout)

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(self.PING[0])
            return self.PING[1] in s.recv(200)

    def _wait_ready(self, probe, timeout: float) -> None:  # noqa: ANN001
        assert self.proc is not None
        try:
            wait_ready(self.proc, probe, timeout, type(self).__name__,
                       lambda: self.log.read_text() if self.log.exists() else "")  # fmt: skip
        except RuntimeError:
            self.stop()
            raise


class Spamd(_Daemon):
    """``spamd`` on 127.0.0.1:``port`` and ``<dir>/spamd.sock``.

    With ``dns_server`` ("127.0.0.1:PORT", a test DNS server) the network rules are on and
    SpamAssassin asks that server only (``dns_server``); ``rules`` is more ``local.cf``
    text (a test's own DNSBL rule, say); ``users`` are per-user settings (spamd's virtual
    users: ``<dir>/users/<name>/user_prefs``, picked by the request's ``User`` header)."""

    PING = (b"PING SPAMC/1.5\r\n\r\n", b"PONG")

    def __init__(self, directory: Path | None = None, port: int | None = None, children: int = 2,
                 dns_server: str = "", rules: str = "",
                 users: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__("spamd", directory, port)
        self.children = children
        self.dns_server = dns_server
        self.rules = rules
        self.users = users or {}  # per-user settings: user name -> its user_prefs text

    def local_cf(self) -> str:
        text = LOCAL_CF
        if self.dns_server:
            text = text.replace("skip_rbl_checks    1", "skip_rbl_checks    0")
            dns = f"dns_available      yes\ndns_server {self.dns_server}"
            text = text.replace("dns_available      no", dns)
        return text + self.rules

    def start(self, timeout: float = 30.0) -> Spamd:
        site, home = self.dir / "site", self.dir / "home"
        site.mkdir(parents=True, exist_ok=True)
        home.mkdir(exist_ok=True)
        for pre in Path("/etc/spamassassin").glob("*.pre"):
            shutil.copy(pre, site)
        (site / "local.cf").write_text(self.local_cf())
        local = [] if self.dns_server else ["-L"]
        for user, prefs in self.users.items():
            (self.dir / "users" / user).mkdir(parents=True, exist_ok=True)
            (self.dir / "users" / user / "user_prefs").write_text(prefs)
        if self.users:
            os.chmod(self.dir / "users", 0o755)
            local.append(f"--virtual-config-dir={self.dir / 'users'}/%u")
        argv = ["spamd", *local, "-x", "-C", "/usr/share/spamassassin", f"--siteconfigpath={site}",
                "-i", f"127.0.0.1:{self.port}", "-A", "127.0.0.1", f"--socketpath={self.socket_path}",
                "--socketmode=0666", "-r", str(self.dir / "spamd.pid"), "-s", str(self.log),
                "-m", str(self.children), "--min-children=1", "--min-spare=1",
                f"--max-spare={self.children}"]  # fmt: skip
        if os.geteuid() == 0:
            os.chown(home, *_nobody())
            os.chmod(self.dir, 0o755)
            argv += ["-u", "nobody", "-g", "nogroup", "-H", str(home)]
        env = {**os.environ, "HOME": str(home)}
        self._launch(argv, timeout, env=env)
        return self


class Clamd(_Daemon):
    """``clamd`` on ``<dir>/clamd.sock`` and 127.0.0.1:``port``, with an EICAR signature."""

    PING = (b"zPING\0", b"PONG")

    def __init__(self, directory: Path | None = None, port: int | None = None,
                 stream_max: str = "25M", extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        super().__init__("clamd", directory, port)
        self.stream_max = stream_max
        self.extra = extra  # more clamd.conf lines (e.g. "AlertEncrypted yes")

    def start(self, timeout: float = 30.0) -> Clamd:
        db, tmp = self.dir / "db", self.dir / "tmp"
        db.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(exist_ok=True)
        (db / "test-eicar.ndb").write_text(f"Test.EICAR.NDB:0:*:{EICAR.hex()}\n")
        os.chmod(self.dir, 0o755)  # the socket inside, for clients running as other users
        conf = self.dir / "clamd.conf"
        conf.write_text("\n".join([
            "Foreground yes", f"PidFile {self.dir / 'clamd.pid'}", f"LogFile {self.log}", "LogTime yes",
            f"DatabaseDirectory {db}", f"TemporaryDirectory {tmp}", f"LocalSocket {self.socket_path}",
            "LocalSocketMode 666", f"TCPSocket {self.port}", "TCPAddr 127.0.0.1", "MaxThreads 4",
            "SelfCheck 0", "ScanArchive yes", "ScanMail yes", f"StreamMaxLength {self.stream_max}",
            "MaxFileSize 25M", "MaxScanSize 100M", "Bytecode no", *self.extra, "",
        ]))  # fmt: skip
        self._launch(["clamd", "-c", str(conf)], timeout)
        return self


class Rspamd(_Daemon):
    """Debian's ``rspamd``: its stock configuration, one normal worker on 127.0.0.1:``port``,
    no controller or proxy, no Redis (Bayes, fuzzy and the like are off without it), its own
    directories (``--var``: local.d, database, run, log), in the foreground; DNS only to
    ``dns_server`` (a test server; default: a closed loopback port, where every lookup
    fails after rspamd's 1 s timeout).  Started as root it runs as ``_rspamd``.

    Its compiled Hyperscan regexps are kept in ``HS_CACHE`` between runs: compiling them
    is most of rspamd's start-up (30 s on a busy machine, 2 s from the cache)."""

    HS_CACHE = Path(tempfile.gettempdir()) / "defang-rspamd-hs-cache"
    PING = (b"GET /ping HTTP/1.0\r\n\r\n", b"pong")

    def __init__(self, directory: Path | None = None, port: int | None = None, dns_server: str = "",
                 local_d: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__("rspamd", directory, port)
        self.dns_server = dns_server or "127.0.0.1:9"
        self.local_d = local_d or {}  # more local.d files (settings.conf: per-user settings)

    def start(self, timeout: float = 120.0) -> Rspamd:
        local = self.dir / "local" / "local.d"
        local.mkdir(parents=True, exist_ok=True)
        writable = [self.dir / "db", self.dir / "run", self.HS_CACHE]
        for d in writable:
            d.mkdir(exist_ok=True)
        os.chmod(self.dir, 0o755)
        files = {
            "worker-normal.inc": f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n',
            "worker-controller.inc": "enabled = false;\n",
            "worker-proxy.inc": "enabled = false;\n",
            "logging.inc": f'type = "file";\nfilename = "{self.log}";\nlevel = "info";\n',
            "options.inc": (f'hs_cache_dir = "{self.HS_CACHE}";\n'
                            f'dns {{ nameserver = ["{self.dns_server}"]; timeout = 1s; '
                            "retransmits = 1; }\n"),
        } | self.local_d  # fmt: skip
        for name, text in files.items():
            (local / name).write_text(text)
        argv = ["rspamd", "-f", "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={self.dir / 'local'}",
                f"--var=DBDIR={self.dir / 'db'}", f"--var=RUNDIR={self.dir / 'run'}",
                f"--var=LOGDIR={self.dir}"]  # fmt: skip
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("_rspamd")
            for d in writable:
                os.chown(d, user.pw_uid, user.pw_gid)
            self.log.touch()
            os.chown(self.log, user.pw_uid, user.pw_gid)
            argv += ["-u", "_rspamd", "-g", "_rspamd"]
        self._launch(argv, timeout, cwd=self.dir)
        return self


def rspamd_available() -> str | None:
    """None when rspamd is installed, else what is missing."""
    return None if shutil.which("rspamd") else "not installed: rspamd (scripts/bootstrap installs it)"


def _nobody() -> tuple[int, int]:
    import grp
    import pwd

    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
