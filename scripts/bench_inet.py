"""``scripts/bench --inet``: why a milter on an inet socket is slower than on a Unix one.

The first measurements gave ~87 ms end-of-DATA at one connection over ``inet:`` on
loopback against ~0.9 ms over ``unix:``, CPU idle.  Suspect: Nagle's algorithm plus delayed ACK
on the small back-to-back writes of the milter protocol (libmilter sets no TCP_NODELAY).
This mode finds out with evidence and measures the fixes:

1. a packet capture (tcpdump on lo, when installed) of a few messages on one connection
   to the do-nothing milter over inet, listing every gap over 20 ms with the packets on
   both sides of it;
2. an strace of the milter's writes and setsockopt calls for the same (no TCP_NODELAY
   anywhere, and the writes that wait);
3. end-of-DATA latency at one connection and msg/s at 20 connections for: Unix socket;
   inet; inet with TCP_NODELAY on the milter's accepted sockets (LD_PRELOAD shim
   bench/nodelay_shim.c, compiled here); on Postfix's side (the same shim in smtpd via
   import_environment); on both; and for defang, the Python-only fix
   (bench/nodelay_site: TCP_NODELAY on the listening socket, inherited by accept()).

Writes ``bench/results/<date>-<host>-inet.md`` (and .json) with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    BENCH,
    PROFILES,
    Bed,
    DefangStack,
    MessageFactory,
    NullMilterStack,
    Stack,
    free_port,
    machine_info,
    percentile,
    send_load,
    tree,
)

SHIM_SRC = BENCH / "nodelay_shim.c"


def compile_shim(workdir: Path) -> Path:
    """gcc the LD_PRELOAD shim into ``workdir`` (world-readable: smtpd loads it)."""
    out = workdir / "nodelay_shim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SHIM_SRC), "-ldl"],
                   check=True)  # fmt: skip
    out.chmod(0o755)
    return out


def milter_port(stack: Stack) -> int:
    assert stack.milter_spec and stack.milter_spec.startswith("inet:")
    return int(stack.milter_spec.rsplit(":", 1)[1])


def postfix_shim_env(shim: Path, port: int) -> dict[str, str]:
    """main.cf overrides that preload the shim into every Postfix daemon (smtpd matters)."""
    return {"import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE "
            f"POSTLOG_HOSTNAME LD_PRELOAD={shim} NODELAY_PORT={port}"}  # fmt: skip


def measure(bed: Bed, stack: Stack, pf_extra: Callable[[Stack], dict[str, str]] | None,
            single: int, multi: int, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """One-connection latency and 20-connection throughput through ``stack``."""
    factory = MessageFactory(PROFILES["2k"])
    stack.start()
    try:
        with bed.postfix(stack, pf_extra(stack) if pf_extra else None) as pf:
            bed.sink.clear()
            send_load(pf.smtp_port, factory, 20, 5, "warm")
            res1, wall1 = send_load(pf.smtp_port, factory, single, 1, f"one.{time.time_ns()}")
            bed.wait_drained(pf, 20 + sum(r.status == "accepted" for r in res1))
            bed.sink.clear()
            res20, wall20 = send_load(pf.smtp_port, factory, multi, 20, f"twenty.{time.time_ns()}")
            bed.wait_drained(pf, sum(r.status == "accepted" for r in res20))
    finally:
        stack.stop()
    eod1 = [r.eod for r in res1 if r.eod is not None]
    eod20 = [r.eod for r in res20 if r.eod is not None]
    out = {
        "one_conn": {"msgs_per_s": round(len(res1) / wall1, 1),
                     **{f"eod_p{p}_ms": round(percentile(eod1, p) * 1000, 2) for p in (50, 95, 99)}},
        "twenty_conns": {"msgs_per_s": round(len(res20) / wall20, 1),
                         **{f"eod_p{p}_ms": round(percentile(eod20, p) * 1000, 2) for p in (50, 95, 99)}},
        "failed": sum(r.status != "accepted" for r in res1 + res20),
    }  # fmt: skip
    log(f"  {stack.label:52} 1 conn: EOD p50 {out['one_conn']['eod_p50_ms']:7.2f} ms, "
        f"{out['one_conn']['msgs_per_s']:6.1f} msg/s | "
        f"20 conns: {out['twenty_conns']['msgs_per_s']:6.1f} msg/s, "
        f"p50 {out['twenty_conns']['eod_p50_ms']:.1f} ms | failed {out['failed']}")  # fmt: skip
    return out


def capture(bed: Bed, stack: Stack, log: Callable[[str], None], n: int = 5) -> dict[str, Any]:
    """tcpdump (+ strace of the milter's process tree) of ``n`` messages on one
    connection through ``stack`` over inet; the pauses, decoded to milter commands."""
    evidence: dict[str, Any] = {"stack": stack.label or stack.name}
    stack.start()
    port = milter_port(stack)
    work = Path(tempfile.mkdtemp(prefix="inet-evidence-", dir="/tmp"))
    tcpdump, strace = shutil.which("tcpdump"), shutil.which("strace")
    procs: list[subprocess.Popen] = []
    try:
        with bed.postfix(stack) as pf:
            factory = MessageFactory(PROFILES["2k"])
            send_load(pf.smtp_port, factory, 3, 1, "warm")
            pcap = work / "milter.pcap"
            if tcpdump:
                argv = [tcpdump, "-i", "lo", "-nn", "-s", "4096", "-U", "-w", str(pcap), f"tcp port {port}"]
                procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
            trace = work / "strace.txt"
            if strace:
                pids = tree(stack.roots())
                procs.append(subprocess.Popen([strace, "-f", "-tt", "-o", str(trace), "-e",
                                               "trace=write,writev,sendto,sendmsg,setsockopt",
                                               *[a for p in pids for a in ("-p", str(p))]],
                                              stderr=subprocess.DEVNULL))  # fmt: skip
            time.sleep(1.5)
            res, _ = send_load(pf.smtp_port, factory, n, 1, f"cap.{time.time_ns()}")
            time.sleep(0.5)
            for p in procs:
                p.terminate()
                p.wait(10)
            evidence["eod_ms"] = [round(r.eod * 1000, 2) for r in res if r.eod is not None]
            if pcap.exists():
                pkts = read_pcap(pcap.read_bytes(), port)
                evidence["packets"] = len(pkts)
                evidence["gaps"] = gaps(pkts)
                evidence["one_message"] = one_message(pkts)
            if trace.exists():
                evidence["strace"] = strace_summary(trace.read_text(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    return evidence


MILTER_CMDS = {"O": "OPTNEG", "D": "MACRO", "C": "CONNECT", "H": "HELO", "M": "MAIL", "R": "RCPT",
               "T": "DATA", "L": "HEADER", "N": "EOH", "B": "BODY", "E": "EOB", "A": "ABORT", "Q": "QUIT",
               "K": "QUIT_NC", "U": "UNKNOWN"}  # fmt: skip
MILTER_REPLIES = {"c": "CONTINUE", "a": "ACCEPT", "h": "ADDHEADER", "i": "INSHEADER", "m": "CHGHEADER",
                  "r": "REJECT", "t": "TEMPFAIL", "y": "REPLYCODE", "d": "DISCARD", "O": "OPTNEG",
                  "b": "REPLBODY", "+": "ADDRCPT", "-": "DELRCPT", "e": "CHGFROM", "p": "PROGRESS",
                  "q": "QUARANTINE", "s": "SKIP"}  # fmt: skip


def read_pcap(blob: bytes, port: int) -> list[tuple[float, str, str, int, str]]:
    """(time, side, TCP flags, payload length, milter packets in it) per TCP segment.

    A classic pcap file of Ethernet frames (tcpdump -i lo); IPv4 only.  The payload is
    split into milter packets (4-byte length, 1-byte command) as far as it reaches.
    """
    import struct

    magic = struct.unpack("<I", blob[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    linktype = struct.unpack(endian + "I", blob[20:24])[0]
    pos, out = 24, []
    while pos + 16 <= len(blob):
        sec, frac, incl, _orig = struct.unpack(endian + "IIII", blob[pos : pos + 16])
        frame = blob[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        t = sec + frac / (1e9 if nano else 1e6)
        ip = frame[14:] if linktype == 1 else frame[16:] if linktype == 113 else frame
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        ihl = (ip[0] & 15) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:]
        sport, dport = struct.unpack(">HH", tcp[:4])
        off = (tcp[12] >> 4) * 4
        flags = tcp[13]
        plen = total - ihl - off
        payload = tcp[off:]
        side = "milter" if sport == port else "postfix"
        names = "FSRPAU"
        fl = "".join(n for i, n in enumerate(names) if flags & (1 << i))
        out.append((t, side, fl, plen, _milter_packets(payload[: max(plen, 0)], side)))
    return out


def _milter_packets(payload: bytes, side: str) -> str:
    table = MILTER_REPLIES if side == "milter" else MILTER_CMDS
    names, i = [], 0
    while i + 5 <= len(payload):
        length = int.from_bytes(payload[i : i + 4], "big")
        cmd = chr(payload[i + 4])
        name = table.get(cmd, repr(cmd))
        if name == "MACRO" and i + 5 < len(payload):
            name += f"({table.get(chr(payload[i + 5]), '?')})"
        names.append(name)
        i += 4 + length
    return " ".join(names)


def gaps(pkts: list[tuple[float, str, str, int, str]], threshold: float = 0.020) -> list[dict[str, Any]]:
    """Every pause over ``threshold`` between consecutive segments on the milter connection,
    with the segment before and after it (sender, flags, payload, milter packets)."""
    out = []
    for a, b in zip(pkts, pkts[1:], strict=False):
        if b[0] - a[0] >= threshold:
            out.append({"gap_ms": round((b[0] - a[0]) * 1000, 1), "before": _seg(a), "after": _seg(b)})
    return out


def _seg(p: tuple[float, str, str, int, str]) -> str:
    return f"{p[1]} [{p[2]}] {p[3]} B {p[4]}".strip()


def one_message(pkts: list[tuple[float, str, str, int, str]]) -> list[str]:
    """The segments of one whole milter connection (Postfix opens one per SMTP session,
    so one message): from the second-to-last SYN to the next one, each with the time
    since the previous segment -- the timeline of one message."""
    syns = [i for i, p in enumerate(pkts) if p[1] == "postfix" and p[2] == "S"]
    if len(syns) < 2:
        return []
    i0, i1 = syns[-2], syns[-1]
    lines, prev = [], pkts[i0][0]
    for p in pkts[i0:i1]:
        lines.append(f"+{(p[0] - prev) * 1000:7.2f} ms  {_seg(p)}")
        prev = p[0]
    return lines


def strace_summary(text: str) -> dict[str, Any]:
    """What the strace shows: setsockopt calls (TCP_NODELAY or not) and the write
    pattern at end of message (small back-to-back writes on the milter socket)."""
    setsockopt = [line for line in text.splitlines() if "setsockopt" in line]
    writes = [line for line in text.splitlines() if re.search(r"\b(write|writev|sendto|sendmsg)\(", line)]
    return {"setsockopt_calls": setsockopt[:10],
            "tcp_nodelay_set": any("TCP_NODELAY" in s for s in setsockopt),
            "write_calls": len(writes), "write_sample": writes[:24]}  # fmt: skip


def main_inet(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """The investigation; prints a table and, with --out, writes <out>-inet.md/.json."""
    work = Path(tempfile.mkdtemp(prefix="bench-inet-", dir="/tmp"))
    work.chmod(0o755)
    shim = compile_shim(work)
    single, multi = max(20, int(200 * args.scale)), max(40, int(1000 * args.scale))
    bed = Bed(work)
    results: dict[str, Any] = {}
    machine = machine_info()
    log(f"bench --inet: {single} messages on 1 connection, {multi} on 20; "
        f"load {machine['loadavg_start'][0]:.2f}")

    def shim_milter(stack: Stack, quickack: bool = False, nodelay: bool = True) -> Stack:
        stack.port = free_port()
        stack.env_extra = {"LD_PRELOAD": str(shim), "NODELAY_PORT": str(stack.port)}
        if quickack:
            stack.env_extra["NODELAY_QUICKACK"] = "1"
        if not nodelay:
            stack.env_extra["NODELAY_OFF"] = "1"
        return stack

    def variants() -> list[tuple[str, Callable[[], Stack], Callable[[Stack], dict[str, str]] | None]]:
        pf_shim = lambda s: postfix_shim_env(shim, milter_port(s))  # noqa: E731
        return [
            ("nullmilter unix", lambda: NullMilterStack(), None),
            ("nullmilter inet", lambda: NullMilterStack(inet=True), None),
            ("nullmilter inet, NODELAY milter side (shim)",
             lambda: shim_milter(NullMilterStack(inet=True)), None),
            ("nullmilter inet, NODELAY Postfix side (shim)", lambda: NullMilterStack(inet=True), pf_shim),
            ("nullmilter inet, NODELAY both sides (shim)", lambda: shim_milter(NullMilterStack(inet=True)),
             pf_shim),
            ("nullmilter inet, QUICKACK milter side (shim)",
             lambda: shim_milter(NullMilterStack(inet=True), quickack=True, nodelay=False), None),
            ("nullmilter inet, NODELAY + QUICKACK milter side (shim)",
             lambda: shim_milter(NullMilterStack(inet=True), quickack=True), None),
            ("nullmilter reply-all unix (every stage answered)",
             lambda: NullMilterStack(reply_all=True), None),
            ("nullmilter reply-all inet (every stage answered)",
             lambda: NullMilterStack(inet=True, reply_all=True), None),
            ("defang-minimal unix", lambda: DefangStack("minimal"), None),
            ("defang-minimal inet", lambda: DefangStack("minimal", inet=True), None),
            ("defang-minimal inet, NODELAY Python listener fix",
             lambda: DefangStack("minimal", inet=True, nodelay=True), None),
            ("defang-minimal inet, NODELAY Postfix side (shim)", lambda: DefangStack("minimal", inet=True),
             pf_shim),
            ("defang-minimal inet, Postfix milter_data_macros = (empty)",
             lambda: DefangStack("minimal", inet=True), lambda s: {"milter_data_macros": ""}),
            ("defang-minimal inet, NODELAY + QUICKACK milter side (shim)",
             lambda: shim_milter(DefangStack("minimal", inet=True), quickack=True), None),
            ("defang-headers unix", lambda: DefangStack("headers"), None),
            ("defang-headers inet", lambda: DefangStack("headers", inet=True), None),
            ("defang-headers inet, NODELAY Python listener fix",
             lambda: DefangStack("headers", inet=True, nodelay=True), None),
            ("defang-headers inet, NODELAY Postfix side (shim)", lambda: DefangStack("headers", inet=True),
             pf_shim),
            ("defang-headers inet, Python fix + Postfix shim",
             lambda: DefangStack("headers", inet=True, nodelay=True), pf_shim),
            ("defang-headers inet, NODELAY + QUICKACK milter side (shim)",
             lambda: shim_milter(DefangStack("headers", inet=True), quickack=True), None),
        ]  # fmt: skip

    try:
        results["evidence"] = []
        for stack in (NullMilterStack(inet=True), DefangStack("minimal", inet=True),
                      DefangStack("headers", inet=True)):  # fmt: skip
            log(f"evidence: tcpdump and strace of 5 messages on one connection, {stack.name}")
            ev = capture(bed, stack, log)
            results["evidence"].append(ev)
            log(f"  EOD ms {ev.get('eod_ms')}; {ev.get('packets')} segments")
            for g in ev.get("gaps", [])[:6]:
                log(f"  gap {g['gap_ms']:6.1f} ms: after {g['before']}  ->  {g['after']}")
            st = ev.get("strace", {})
            log(f"  strace: TCP_NODELAY set: {st.get('tcp_nodelay_set')}; writes: {st.get('write_calls')}")
        results["variants"] = {}
        for label, make, pf_extra in variants():
            stack = make()
            stack.label = label
            results["variants"][label] = measure(bed, stack, pf_extra, single, multi, log)
    finally:
        bed.close()
        shutil.rmtree(work, ignore_errors=True)
    doc = {"machine": machine, "single": single, "multi": multi, **results}
    if args.out:
        out = Path(args.out.replace("<date>", time.strftime("%Y-%m-%d")).replace("<host>", machine["host"]))
        out = out.with_name(out.stem + "-inet.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        out.write_text(render(doc))
        log(f"bench --inet: wrote {out} and {out.with_suffix('.json')}")
    return 0


def render(doc: dict[str, Any]) -> str:
    """The investigation as Markdown: evidence per stack, then the with/without table."""
    m = doc["machine"]
    lines = [f"# inet milter socket investigation, {m['date']}", "",
             f"host `{m['host']}`, {m['nproc']} CPUs, kernel {m['kernel']}, Postfix {m['postfix']}, "
             f"pymilter {m['pymilter']}, defang `{m['defang_commit']}`; load at start "
             f"{m['loadavg_start'][0]:.2f}", ""]  # fmt: skip
    for ev in doc.get("evidence", []):
        st = ev.get("strace") or {}
        lines += [f"## Evidence: {ev['stack']}, 5 messages on one connection", "",
                  f"End-of-DATA latencies: {ev.get('eod_ms')} ms. strace of the milter's processes: "
                  f"TCP_NODELAY set: **{st.get('tcp_nodelay_set')}**.", "",
                  "Pauses over 20 ms between TCP segments on the milter connection (tcpdump on lo; "
                  "the milter packets in each segment decoded):", "",
                  "| gap ms | segment before the pause | segment after it |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {g['gap_ms']} | {g['before']} | {g['after']} |" for g in ev.get("gaps", [])]
        lines += ["", "One message, segment by segment (time since the previous segment):", "", "```"]
        lines += ev.get("one_message", [])
        lines += ["```", ""]
    lines += [f"## With and without TCP_NODELAY ({doc['single']} messages on 1 connection, "
              f"{doc['multi']} on 20)", "",
              "| variant | 1 conn EOD p50 / p99 ms | 1 conn msg/s | 20 conns msg/s | 20 conns EOD p50 ms |",
              "|---|---|---|---|---|"]  # fmt: skip
    for label, v in doc.get("variants", {}).items():
        o, t = v["one_conn"], v["twenty_conns"]
        lines.append(f"| {label} | {o['eod_p50_ms']:.2f} / {o['eod_p99_ms']:.2f} | {o['msgs_per_s']:.1f} | "
                     f"{t['msgs_per_s']:.1f} | {t['eod_p50_ms']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    bench_py = str(Path(__file__).with_name("bench.py"))
    os.execv(sys.executable, [sys.executable, bench_py, "--inet", *sys.argv[1:]])
