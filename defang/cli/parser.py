"""``defang``'s command line: each command with only the options that apply to it.

No command's code is imported here: ``defang milter`` parses its arguments without
loading the workers' MIME engine.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from defang.cli.lists import add_parser as add_lists_parser
from defang.cli.quarantine import add_parser as add_quarantine_parser
from defang.core.version import VERSION

# Which of the shared options each command takes.
CONFIG, FILTER, SOCKET, RUNTIME = "config", "filter", "socket", "runtime_dir"
OPTIONS = {
    "run": (CONFIG, FILTER, SOCKET, RUNTIME),
    "milter": (CONFIG, FILTER, SOCKET, RUNTIME),
    "multiplexor": (CONFIG, FILTER, RUNTIME),
    "check": (CONFIG, FILTER),
    "test": (CONFIG, FILTER),
    "replay": (CONFIG, FILTER),
    "quarantine": (CONFIG, RUNTIME),
    "lists": (CONFIG, RUNTIME),
}
#: Commands that work on the files of a running defang (its quarantine, its state) rather
#: than being one: with no runtime dir given, theirs is the one a defang runs in
#: (``config.running_runtime_dir``), so that the defang user and its group reach root's.
CLIENTS = frozenset({"quarantine", "lists"})
HELP = {
    CONFIG: "config file (default: the etc/defang.toml that comes with defang)",
    FILTER: "filter.py to run (overrides [daemon] filter)",
    SOCKET: "milter socket: unix:/path or inet:PORT@HOST (overrides [milter] socket)",
    RUNTIME: "sockets and spool (overrides [daemon] runtime_dir)",
}


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (when it has one worth showing);
    descriptions kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, [], "", argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line, ``defang test: --ip: ...``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}\n")


def options(command: str):  # noqa: ANN201 (returns a function for add_quarantine_parser)
    def add(p: argparse.ArgumentParser) -> None:
        for name in OPTIONS[command]:
            p.add_argument(f"--{name.replace('_', '-')}", help=HELP[name])

    return add


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="defang", description=MAIN, formatter_class=Formatter)
    ap.add_argument("--version", action="version", version=f"defang {VERSION}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, helptext: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, description=description or helptext,
                           formatter_class=Formatter)  # fmt: skip
        options(name)(p)
        return p

    command("run", "multiplexor, workers and milter front end, in the foreground")
    for name, helptext in (("milter", "the milter front end alone"),
                           ("multiplexor", "the multiplexor and its workers alone")):  # fmt: skip
        command(name, helptext).add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p = command("check", "load filter.py and report its hooks, or why it does not load")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on any warning too (a misspelt hook, a deprecated import)")  # fmt: skip
    p = command("test", "what defang would do with one message, stage by stage", TEST)
    p.add_argument("message", help="the message file (.eml); - reads standard input")
    envelope_arguments(p)
    p.add_argument("--body-out", metavar="FILE", help="write the rewritten message body here, if the "
                   "filter changes it")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    send_mail_argument(p)
    p = command("replay", "run many messages through the filter (or two filters), with a summary", REPLAY)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="a .eml file, a directory of .eml files, an mbox, a Maildir, or a quarantine store")
    p.add_argument("--quarantine", action="store_true",
                   help="replay the configured quarantine store, each entry with its saved envelope")
    p.add_argument("--compare", metavar="OTHER_FILTER",
                   help="run this filter too and list the messages whose outcome or actions differ")
    p.add_argument("--jobs", type=_positive, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--slowest", type=_positive, default=5, help="how many of the slowest messages to list")
    p.add_argument("--json", action="store_true", help="one JSON document: every message, the summary")
    p.add_argument("--release-accepted", action="store_true",
                   help="release the quarantined messages the filter now accepts (asks first)")
    p.add_argument("--yes", action="store_true", help="release without asking")
    send_mail_argument(p)
    envelope_arguments(p, "for a message with no saved envelope: ")
    add_quarantine_parser(sub, options("quarantine"))
    add_lists_parser(sub, options("lists"))
    return ap




def send_mail_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--send-mail", action="store_true",
                   help="send the notices the filter asks for, as the worker would after its reply "
                   "(without it they are listed, not sent; msg.trial is True either way)")  # fmt: skip


def envelope_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """What the MTA would tell the filter about the message, for ``test`` and ``replay``."""
    p.add_argument("--sender", default="sender@example.org", help=prefix + "envelope sender (MAIL FROM)")
    p.add_argument("--rcpt", action="append", metavar="ADDR",
                   help=prefix + "envelope recipient, repeatable (default: postmaster@example.org)")
    p.add_argument("--ip", type=_ip, default="192.0.2.1", help=prefix + "client IP address")
    p.add_argument("--hostname", default="",
                   help=prefix + "client host name as the MTA resolved it (default: [IP], unresolved)")
    p.add_argument("--helo", default="client.example.org", help=prefix + "HELO/EHLO name")
    p.add_argument("--macro", action="append", metavar="NAME=VALUE", type=_macro, default=[],
                   help="a milter macro, repeatable: j=mx.example.org, {auth_authen}=alice")
    p.add_argument("--mail-arg", action="append", metavar="ARG", default=[],
                   help="an ESMTP MAIL FROM argument, repeatable: BODY=8BITMIME, SIZE=2048")
    p.add_argument("--rcpt-arg", action="append", metavar="ARG", default=[],
                   help="an ESMTP RCPT TO argument, repeatable: NOTIFY=NEVER")
    p.add_argument("--queue-id", default="TEST", help="the queue ID (macro i)")


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _macro(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: a macro is NAME=VALUE, e.g. {{auth_authen}}=alice")
    return name, value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


MAIN = """\
defang: a mail filter in Python for Postfix and Sendmail (milter).

Run the daemons (run), or check, try and replay a filter without an MTA (check, test,
replay), or look after the quarantine.  `defang COMMAND --help` for each command."""

TEST = """\
What defang would do with one message, without an MTA.

The filter is asked at each SMTP stage as the milter would ask it (only for the hooks
it defines), and the trial stops where the MTA would stop: accept() before the end of
message accepts without further filtering; a reject or tempfail at connect or HELO ends
the connection, at MAIL FROM the transaction; a refused recipient is not in
msg.recipients, and with none left there is no DATA; discard() throws the message away.
The front end's limits ([milter] max_*) apply with their configured replies.

exit status: 0 continue or accept, 1 reject, 2 tempfail, 3 discard,
             4 error (the file, the filter, or the filter raised)"""

REPLAY = """\
Run many messages through the filter, each exactly as `defang test` would, in a pool of
processes, and summarise: counts by outcome and by action, the slowest messages, the
errors with their file names.  A quarantine store's entries are replayed with their
saved envelope (sender, recipients, client); other messages with the envelope options.

With --compare, both filters run and every message whose outcome or actions differ is
listed side by side.  With --release-accepted (a quarantine replay), the entries the
filter now accepts are released through the MTA, as `defang quarantine release` does.

exit status: 0 done, 1 some messages differ (--compare) or a release failed,
             4 a message or the filter gave an error, 2 bad usage"""
