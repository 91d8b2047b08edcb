#!/usr/bin/env python3
"""How often defang and MIMEDefang get the same SpamAssassin verdict, both asking one spamd.

    .venv/bin/python scripts/spam_agreement.py [--corpus /work/shared/corpus] [--json FILE]

One private spamd (defang.testbed.scanners: Debian's, the stock rules, offline).  Every
corpus message that spamd would be given (at most 512000 bytes: defang's [spamassassin]
max_size and spamc's default) is judged three ways, with the same envelope (a remote
client 192.0.2.10 named mail.example.com, HELO mail.example.com, one sender, one
recipient, our host mx.example.net):

- defang: ``defang test``'s engine (the worker's own code: the message, its checks,
  ``msg.spamassassin()``), with ``[spamassassin] add_received`` on (the default);
- defang before: the same with ``add_received = false`` (what defang sent until now);
- MIMEDefang: what its SpamAssassin helper (``spam_assassin_mail``) gives SpamAssassin,
  ``Return-Path:`` and the ``Received:`` of ``synthesize_received_header`` from the
  Debian package's own Perl module (Mail::MIMEDefang::Utils, run by perl here), before the
  message, sent to the same spamd with ``spamc -R``.  (MIMEDefang's helper runs
  SpamAssassin in-process; here its header goes to the same spamd, so the rules, the
  configuration and the daemon are the same for both and only what each gives differs.)

Prints, per pair, how many messages get the same verdict (spam or not), the same rules,
and the largest score difference.  Needs spamc and Debian's mimedefang package
(``scripts/bench --with-mimedefang`` installs it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.testbed.scanners import Spamd

CLIENT = {"ip": "192.0.2.10", "hostname": "mail.example.com", "helo": "mail.example.com"}
SENDER, RCPT, HOST, MAX_SIZE = "sender@example.com", "rcpt@example.net", "mx.example.net", 512000
FILTER = '''
def filter_end(msg):
    s = msg.spamassassin()
    rules = ",".join(sorted(s.rules))
    msg.add_header("X-Agree", f"{s.score} {s.is_spam} {rules}" if s.scanned else f"error {s}")
'''
# MIMEDefang's own code: its globals set as mimedefang.pl sets them for this envelope
PERL = r'''
use Mail::MIMEDefang; use Mail::MIMEDefang::Utils; use Mail::MIMEDefang::Net;
($Helo, $RealRelayHostname, $RealRelayAddr, $Sender, $rcpt, $MsgID, $host) = @ARGV;
@Recipients = ($rcpt); %SendmailMacros = ("if_name" => $host);
print "Return-Path: $Sender\n", synthesize_received_header();
'''


Verdict = tuple[float, bool, list[str]]  # score, spam or not, the rules


def mimedefang_hop(queue_id: str) -> bytes:
    argv = ["perl", "-e", PERL, CLIENT["helo"], CLIENT["hostname"], CLIENT["ip"], f"<{SENDER}>", f"<{RCPT}>",
            queue_id, HOST]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=30)
    if done.returncode != 0:
        raise SystemExit(f"spam_agreement: MIMEDefang's Perl modules: {done.stderr.decode()[:300].strip()} "
                         "(scripts/bench --with-mimedefang installs Debian's mimedefang)")  # fmt: skip
    return done.stdout


def spamc(spamd: Spamd, data: bytes) -> Verdict:
    argv = ["spamc", "-x", "-R", "-d", "127.0.0.1", "-p", str(spamd.port), "-s", str(MAX_SIZE)]
    done = subprocess.run(argv, input=data, capture_output=True, timeout=120)
    if done.returncode not in (0, 1):
        raise SystemExit(f"spam_agreement: spamc exited {done.returncode}: {done.stderr.decode()[:200]}")
    text = done.stdout.decode("utf-8", "replace")
    first, _, report = text.partition("\n")
    score, required = (float(x) for x in first.split("/"))
    table = report[report.find("\n", report.find("pts rule name") + 1):] if "pts rule name" in report else ""
    rules = sorted({line.split()[1] for line in table.splitlines()[1:]
                    if len(line.split()) > 1 and line.split()[1].isupper()})  # fmt: skip
    return score, score >= required, rules


def defang_verdicts(spamd: Spamd, files: list[Path], add_received: bool) -> list[Verdict]:
    work = Path(tempfile.mkdtemp(prefix="spam-agree-"))
    (work / "filter.py").write_text(FILTER)
    cfg = replace(configmod.load(None, filter_path=str(work / "filter.py")), spamassassin_address=spamd.inet,
                  spamassassin_add_received=add_received, spamassassin_timeout=60)  # fmt: skip
    trial = Trial(cfg)
    out = []
    try:
        for i, path in enumerate(files):
            env = Envelope(sender=SENDER, recipients=[RCPT], queue_id=f"4QAgree{i}", macros={"j": HOST},
                           **CLIENT)  # fmt: skip
            actions = trial.run(path.read_bytes(), env).actions
            said = next(a[2] for a in actions if a[0] == "add_header" and a[1] == "X-Agree")
            if said.startswith("error"):
                raise SystemExit(f"spam_agreement: {path.name}: {said}")
            score, spam, rules = said.split(" ", 2)
            out.append((float(score), spam == "True", sorted(r for r in rules.split(",") if r)))
    finally:
        trial.close()
    return out


def compare(name: str, a: list, b: list, files: list[Path]) -> dict:
    same_verdict = sum(x[1] == y[1] for x, y in zip(a, b, strict=True))
    same_rules = sum(x[2] == y[2] for x, y in zip(a, b, strict=True))
    diff = [abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)]
    differ = [f.name for f, x, y in zip(files, a, b, strict=True) if x[1] != y[1]]
    return {"pair": name, "messages": len(files), "same_verdict": same_verdict, "same_rules": same_rules,
            "max_score_difference": round(max(diff), 2) if diff else 0.0,
            "verdict_differs": differ}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("/work/shared/corpus"))
    ap.add_argument("--json", type=Path, help="write the figures and the per-message verdicts here")
    args = ap.parse_args()
    files = sorted(p for p in args.corpus.glob("*.eml") if p.stat().st_size <= MAX_SIZE)
    if not files:
        print(f"spam_agreement: no message of at most {MAX_SIZE} bytes in {args.corpus}", file=sys.stderr)
        return 2
    spamd = Spamd(children=2).start()
    try:
        now = defang_verdicts(spamd, files, add_received=True)
        before = defang_verdicts(spamd, files, add_received=False)
        md = [spamc(spamd, mimedefang_hop(f"4QAgree{i}") + p.read_bytes()) for i, p in enumerate(files)]
    finally:
        spamd.stop()
    skipped = len(list(args.corpus.glob("*.eml"))) - len(files)
    pairs = [compare("defang vs MIMEDefang", now, md, files),
             compare("defang before (no hop) vs MIMEDefang", before, md, files)]  # fmt: skip
    for p in pairs:
        print(f"{p['pair']}: same verdict {p['same_verdict']}/{p['messages']}, same rules "
              f"{p['same_rules']}/{p['messages']}, largest score difference {p['max_score_difference']:g}; "
              f"verdict differs: {', '.join(p['verdict_differs']) or 'none'}")  # fmt: skip
    print(f"({skipped} corpus messages over {MAX_SIZE} bytes: neither sends them to spamd)")
    if args.json:
        verdicts = {f.name: {"defang": n, "defang_before": b, "mimedefang": m}
                    for f, n, b, m in zip(files, now, before, md, strict=True)}  # fmt: skip
        args.json.write_text(json.dumps({"pairs": pairs, "verdicts": verdicts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
