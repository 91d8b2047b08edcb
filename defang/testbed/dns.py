"""A private authoritative DNS server on loopback for tests and benchmarks: Debian's NSD.

Why NSD: a real authoritative server reading real zone files (what blocklists, SPF,
DKIM keys and DMARC records are served by), small, started in milliseconds, and it
runs unprivileged in the foreground on any port.  defang's resolver is pointed at it
directly (``[dns] servers = ["127.0.0.1:PORT"]``): it answers for its zones with
authority, and REFUSED for any other name, so a test can never reach a public server.

    with Nsd({"bl.test": ["2.0.0.127 A 127.0.0.2", ...]}) as ns:
        ns.port
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from defang.testbed.ports import free_port
from defang.testbed.procs import stop_process, wait_ready


def txt(value: str) -> str:
    """A TXT record's data: quoted strings of at most 255 characters (DKIM keys are longer)."""
    chunks = [value[i:i + 250] for i in range(0, len(value), 250)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


def zone_text(origin: str, records: list[str], ttl: int = 300) -> str:
    """A zone file: SOA and NS, then ``records`` (``"name TYPE data"``, names relative)."""
    lines = [f"$ORIGIN {origin}.", f"$TTL {ttl}",
             f"@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 {ttl}",
             f"@ IN NS ns.{origin}.", "ns IN A 127.0.0.1"]  # fmt: skip
    for record in records:
        name, kind, data = record.split(None, 2)
        lines.append(f"{name} IN {kind} {data}")
    return "\n".join(lines) + "\n"


class Nsd:
    """NSD serving ``zones`` (origin -> records) on ``host``:``port`` (UDP and TCP).

    ``host`` is a loopback address; another than 127.0.0.1 with port 53 serves a peer
    that can only be told a nameserver's address, not its port (defang.testbed.peers)."""

    def __init__(self, zones: dict[str, list[str]], port: int | None = None, host: str = "127.0.0.1") -> None:
        self.zones = zones
        self.host = host
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="defang-nsd-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        """For ``[dns] servers``."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> Nsd:
        d = self.dir
        conf = [
            "server:", f"    ip-address: {self.host}@{self.port}", f"    port: {self.port}",
            '    username: ""', '    chroot: ""', f"    zonesdir: {d}", f"    pidfile: {d / 'nsd.pid'}",
            f"    xfrdfile: {d / 'xfrd.state'}", f"    zonelistfile: {d / 'zone.list'}", '    database: ""',
            f"    logfile: {d / 'nsd.log'}", "    server-count: 1", "    verbosity: 1",
            "    hide-version: yes",
            # Debian builds NSD with response rate limiting, on by default (200 answers a
            # second per client block): a replay or a benchmark from 127.0.0.1 passes that,
            # and NSD then drops or truncates answers, so a lookup times out at random.  A
            # test server answers every query.
            "    rrl-ratelimit: 0", "    rrl-whitelist-ratelimit: 0",
            "remote-control:", "    control-enable: no",
        ]  # fmt: skip
        for origin, records in self.zones.items():
            (d / f"{origin}.zone").write_text(zone_text(origin, records))
            conf += ["zone:", f"    name: {origin}", f"    zonefile: {origin}.zone"]
        (d / "nsd.conf").write_text("\n".join(conf) + "\n")
        with open(d / "nsd.out", "ab") as out:
            self.proc = subprocess.Popen(["nsd", "-d", "-c", str(d / "nsd.conf")], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        origin = next(iter(self.zones))
        try:
            wait_ready(self.proc, lambda: self._answers(origin), timeout, "nsd",
                       lambda: "".join(p.read_text() for p in (d / "nsd.out", d / "nsd.log") if p.exists()))
        except RuntimeError:
            self.stop()
            raise
        return self

    def _answers(self, origin: str) -> bool:
        """A SOA query for ``origin`` gets an authoritative answer."""
        import dns.message
        import dns.query

        try:
            query = dns.message.make_query(origin, "SOA")
            reply = dns.query.udp(query, self.host, timeout=0.2, port=self.port)
        except (OSError, dns.exception.DNSException):
            return False
        return bool(reply.answer)

    def txt_lookup(self):  # noqa: ANN201
        """A ``dnsfunc`` for dkimpy (name -> TXT bytes or None) asking this server."""
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.port = [self.host], self.port

        def get(name: bytes, timeout: float = 5) -> bytes | None:
            try:
                return b"".join(r.resolve(name.decode().rstrip("."), "TXT")[0].strings)
            except dns.resolver.NXDOMAIN:
                return None

        return get

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the PID we started; our directory removed."""
        stop_process(self.proc, timeout)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Nsd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
