"""Milters nobody here wrote, run beside defang to check its verdicts: OpenDKIM and
OpenDMARC (Debian's packages, started by us with a config file of our own, never as the
system's service).

Both ask a DNS server of the test's own, never the system's resolver:

* OpenDKIM resolves with libunbound, configured by a file of ours
  (``ResolverConfiguration``): every name forwarded to the test's server.
* OpenDMARC (and the libspf2 it checks SPF with) resolves with glibc's libresolv, which
  only reads ``/etc/resolv.conf``; resolv.conf names a server by address, always on port
  53.  So the test's NSD listens on port 53 of a loopback address nothing else uses
  (``nameserver_address``), and OpenDMARC runs in a mount namespace of its own
  (``unshare --mount``) where a resolv.conf naming that address is bind-mounted over
  ``/etc/resolv.conf``; the machine's own file is untouched.

Each peer writes its verdicts into an Authentication-Results field under an authserv-id
of its own (``OpenDkim.AUTHSERV_ID``, ``OpenDmarc.AUTHSERV_ID``); OpenDMARC takes the DKIM
results from OpenDKIM's field (``TrustedAuthservIDs``) and checks SPF itself.  Neither
refuses anything unless asked (``OpenDmarc(reject=True)``): the test reads what they
wrote at the sink.

    with Nsd(zones, port=53, host=nameserver_address()) as ns, OpenDkim(ns.host, dir1) as dkim, \\
         OpenDmarc(ns.host, dir2) as dmarc:
        postfix_extra = {"smtpd_milters": f"{defang}, {dkim.socket_spec}, {dmarc.socket_spec}"}
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from defang.testbed.ports import free_port
from defang.testbed.procs import stop_process, wait_ready

#: Clients the peers must treat as the outside world: neither may skip or sign what
#: comes from 127.0.0.1 (both do by default), so their "internal"/"ignored" list names
#: a documentation address (RFC 5737) no test connects from.
NOBODY = "192.0.2.254"
PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"


def peers_available() -> bool:
    """OpenDKIM, OpenDMARC and unshare are installed (scripts/bootstrap installs them)."""
    return all(Path(p).exists() for p in ("/usr/sbin/opendkim", "/usr/sbin/opendmarc", "/usr/bin/unshare"))


def _port_53_free(host: str) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, 53))
            except OSError:
                return False
    return True


def nameserver_address() -> str:
    """A loopback address (127.53.0.0/16) whose port 53 is free, UDP and TCP: for an NSD
    that a resolv.conf can name.  Never 127.0.0.1, where a machine's own resolver may
    listen; each call probes afresh, so tests run side by side get different ones."""
    import random

    for _ in range(64):
        host = f"127.53.{random.randrange(256)}.{random.randrange(1, 255)}"
        if _port_53_free(host):
            return host
    raise RuntimeError("no loopback address in 127.53.0.0/16 with port 53 free")


class _Milter:
    """A milter daemon in the foreground on an inet socket of 127.0.0.1, stopped by PID."""

    name = ""
    user = ""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_spec(self) -> str:
        """For ``smtpd_milters``."""
        return f"inet:127.0.0.1:{self.port}"

    def config(self) -> str:
        raise NotImplementedError

    def command(self, conf: Path) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> _Milter:
        conf = self.dir / f"{self.name}.conf"
        conf.write_text(self.config())
        shutil.chown(self.dir, user=self.user)
        with open(self.dir / "out.log", "ab") as out:
            self.proc = subprocess.Popen(self.command(conf), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        try:
            wait_ready(self.proc, self._listening, timeout, f"{self.name} on 127.0.0.1:{self.port}",
                       self.output)  # fmt: skip
        except RuntimeError:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        return True

    def output(self) -> str:
        """What the daemon printed (with ``-f`` and no syslog, its complaints)."""
        path = self.dir / "out.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the PID we started."""
        stop_process(self.proc, timeout)

    def __enter__(self) -> _Milter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OpenDkim(_Milter):
    """OpenDKIM 2.11 verifying only (``Mode v``), asking ``nameserver`` (``host@port``,
    libunbound's syntax) for keys."""

    name = "opendkim"
    user = "opendkim"
    AUTHSERV_ID = "dkim.peer.test"

    def __init__(self, nameserver: str, workdir: Path) -> None:
        super().__init__(workdir)
        self.nameserver = nameserver

    def config(self) -> str:
        # libunbound's own defaults refuse both what the test needs: a server on loopback
        # (do-not-query-localhost) and names under .test (a local zone, RFC 6761)
        (self.dir / "unbound.conf").write_text("\n".join([
            "server:", '    local-zone: "test." nodefault', "    do-not-query-localhost: no",
            "forward-zone:", '    name: "."', f"    forward-addr: {self.nameserver}",
        ]) + "\n")  # fmt: skip
        return "\n".join([
            "Mode v", f"Socket inet:{self.port}@127.0.0.1", f"AuthservID {self.AUTHSERV_ID}",
            f"ResolverConfiguration {self.dir / 'unbound.conf'}", f"InternalHosts csl:{NOBODY}",
            f"PeerList csl:{NOBODY}",
            # a verdict for every message, and never a refusal: the test reads the verdicts
            "AlwaysAddARHeader yes", "On-Default accept", "Syslog no", f"UserID {self.user}",
        ]) + "\n"  # fmt: skip

    def command(self, conf: Path) -> list[str]:
        return ["/usr/sbin/opendkim", "-f", "-x", str(conf)]


class OpenDmarc(_Milter):
    """OpenDMARC 1.4 taking DKIM results from OpenDKIM's Authentication-Results, checking
    SPF itself (``SPFSelfValidate``), with resolv.conf naming ``nameserver`` (port 53).
    With ``reject`` it acts on the policy: refuses what p=reject refuses
    (``RejectFailures``), holds what p=quarantine quarantines (``HoldQuarantinedMessages``,
    Postfix's hold queue); otherwise it only writes its verdict."""

    name = "opendmarc"
    user = "opendmarc"
    AUTHSERV_ID = "dmarc.peer.test"

    def __init__(self, nameserver: str, workdir: Path, reject: bool = False) -> None:
        super().__init__(workdir)
        self.nameserver = nameserver
        self.reject = reject

    def config(self) -> str:
        (self.dir / "ignore.hosts").write_text(NOBODY + "\n")
        (self.dir / "resolv.conf").write_text(f"nameserver {self.nameserver}\noptions attempts:1 timeout:2\n")
        return "\n".join([
            f"Socket inet:{self.port}@[127.0.0.1]", f"AuthservID {self.AUTHSERV_ID}",
            f"TrustedAuthservIDs {OpenDkim.AUTHSERV_ID}", "IgnoreAuthenticatedClients true",
            f"IgnoreHosts {self.dir / 'ignore.hosts'}", "SPFSelfValidate true", "SPFIgnoreResults true",
            f"PublicSuffixList {PUBLIC_SUFFIX_LIST}", f"RejectFailures {str(self.reject).lower()}",
            f"HoldQuarantinedMessages {str(self.reject).lower()}", "FailureReports false",
            "Syslog false", f"UserID {self.user}",
        ]) + "\n"  # fmt: skip

    def command(self, conf: Path) -> list[str]:
        # the bind mount lives and dies with this namespace; exec keeps our PID opendmarc's
        script = 'mount --bind "$0" /etc/resolv.conf && exec /usr/sbin/opendmarc -f -c "$1"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                str(self.dir / "resolv.conf"), str(conf)]  # fmt: skip
