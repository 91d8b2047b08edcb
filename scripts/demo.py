"""defang filtering real mail: a private Postfix on loopback, defang with its defaults.

Starts a capturing sink, ``defang run`` with etc/defang.toml and the default
filters/filter.py, and a private Postfix (own config and queue, high ports, relaying
to the sink) whose smtpd_milters points at defang.  Sends a handful of messages,
prints what the sending client was told and what arrived, and stops everything it
started.  Run through scripts/demo, which sets things up first.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from defang.testbed.ports import free_port  # noqa: E402
from defang.testbed.postfix import PrivatePostfix  # noqa: E402
from defang.testbed.sink import Sink  # noqa: E402
from defang.testbed.smtpclient import send  # noqa: E402


def sample_messages() -> list[tuple[str, str, bytes]]:
    """(label, envelope sender, raw message) for each sample."""

    def base(subject: str) -> EmailMessage:
        m = EmailMessage()
        m["From"] = "Alice <alice@example.org>"
        m["To"] = "bob@example.net"
        m["Subject"] = subject
        m["Message-ID"] = f"<demo-{time.monotonic_ns()}@example.org>"
        return m

    clean = base("Lunch on Thursday?")
    clean.set_content("Hi Bob,\n\nnoon at the usual place?\n\nAlice\n")

    report = base("Quarterly report")
    report.set_content("The report is attached.\n")
    report.add_alternative("<p>The report is <b>attached</b>.</p>", subtype="html")
    report.add_attachment(b"%PDF-1.4\n% demo\n", maintype="application", subtype="pdf",
                          filename="report-Q3.pdf")  # fmt: skip

    exe = base("Invoice")
    exe.set_content("Please see the invoice.\n")
    exe.add_attachment(b"MZ\x90\x00" + b"\x00" * 60, maintype="application",
                       subtype="octet-stream", filename="invoice.pdf.exe")  # fmt: skip

    bad_sender = base("Hello from a broken address")
    bad_sender.set_content("This sender address is not valid.\n")

    return [
        ("plain text", "alice@example.org", clean.as_bytes()),
        ("HTML + PDF attachment", "alice@example.org", report.as_bytes()),
        ("invoice.pdf.exe attached", "alice@example.org", exe.as_bytes()),
        ("malformed sender", "alice..smith@example.org", bad_sender.as_bytes()),
    ]


def header_names(raw: bytes) -> list[str]:
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    return [line.split(":", 1)[0] for line in head.split("\n") if line and line[0] not in " \t"]


def added_headers(sent: bytes, arrived: bytes) -> list[str]:
    before = header_names(sent)
    out = []
    for line in arrived.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode().split("\n"):
        name = line.split(":", 1)[0]
        if line and line[0] not in " \t" and name not in before and name != "Received":
            out.append(line.strip())
    return out


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="defang-demo-", dir="/tmp"))
    work.chmod(0o755)
    runtime = work / "run"
    log_path = work / "defang.log"
    sink = Sink(work / "sink", free_port())
    postfix = PrivatePostfix(work / "postfix", free_port(), sink.port,
                             milter=f"unix:{runtime / 'milter.sock'}")  # fmt: skip
    defang = None
    try:
        sink.start()
        print(f"defang demo: sink on 127.0.0.1:{sink.port}, Postfix on 127.0.0.1:{postfix.smtp_port}, "
              f"defang with etc/defang.toml and filters/filter.py\n")  # fmt: skip
        with open(log_path, "wb") as log:
            defang = subprocess.Popen([sys.executable, "-m", "defang", "run", "--runtime-dir",
                                       str(runtime)], stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO)  # fmt: skip
        deadline = time.monotonic() + 60
        while "defang running" not in log_path.read_text(errors="replace"):
            if defang.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(errors="replace"), file=sys.stderr)
                return 1
            time.sleep(0.05)
        postfix.start()

        rows = []
        for label, sender, raw in sample_messages():
            sink.clear()
            r = send("127.0.0.1", postfix.smtp_port, sender, ["bob@example.net"], raw)
            reply = r.data if r.data is not None else r.mail
            added = "-"
            if r.data and r.data[0] == 250:
                got = sink.wait_for(1, timeout=30)[0]
                added = ", ".join(added_headers(raw, got.raw)) or "(none)"
            stage = "DATA" if r.data is not None else "MAIL FROM"
            rows.append((label, f"{reply[0]} {reply[1]}", stage, added))

        widths = [max(len(row[i]) for row in rows + [("message", "SMTP reply", "at", "")])
                  for i in range(3)]  # fmt: skip
        print(f"{'message'.ljust(widths[0])}  {'SMTP reply'.ljust(widths[1])}  "
              f"{'at'.ljust(widths[2])}  headers added")  # fmt: skip
        print("-" * (sum(widths) + 40))
        for label, reply, stage, added in rows:
            print(f"{label.ljust(widths[0])}  {reply.ljust(widths[1])}  {stage.ljust(widths[2])}  {added}")
        status = subprocess.run([sys.executable, "-m", "defang.cli.ctl", "--runtime-dir", str(runtime),
                                 "status"], capture_output=True, text=True, cwd=REPO)  # fmt: skip
        print("\n$ defangctl status\n" + status.stdout)
        return 0
    finally:
        postfix.stop()
        if defang is not None and defang.poll() is None:
            defang.send_signal(signal.SIGTERM)
            try:
                defang.wait(60)
            except subprocess.TimeoutExpired:
                defang.kill()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
