"""The example filters an admin can copy (filters/examples/) do what they say, by ``defang test``.

Every example is also replayed over the corpus in test_replay.py; this file checks what
each one promises on messages made for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from paths import CORPUS, REPO

EXAMPLES = REPO / "filters" / "examples"
MODULAR = EXAMPLES / "modular" / "filter.py"


def example_filters() -> list[Path]:
    return sorted([*EXAMPLES.glob("*.py"), *EXAMPLES.glob("*/filter.py"), *EXAMPLES.glob("mimedefang/*.py")])


def trial(msg: bytes, tmp_path: Path, *args: str, filter_path: Path = MODULAR) -> dict:
    eml = tmp_path / "m.eml"
    eml.write_bytes(msg)
    argv = [sys.executable, "-m", "defang", "test", str(eml), "--json", "--filter", str(filter_path), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    result = json.loads(r.stdout)
    assert r.returncode == result["exit"], r.stderr
    return result


@pytest.mark.parametrize("path", example_filters(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_loads_without_a_warning(path):
    r = subprocess.run([sys.executable, "-m", "defang", "check", "--strict", "--filter", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr


PLAIN = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
EXE = (b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
       b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
       b"Content-Type: application/octet-stream; name=invoice.pdf.exe\r\n\r\nMZ\r\n--b--\r\n")  # fmt: skip


def test_modular_passes_plain_mail(tmp_path):
    assert trial(PLAIN, tmp_path)["outcome"]["action"] == "continue"


def test_modular_allow_list_by_client_and_by_sender_skips_everything(tmp_path):
    r = trial(EXE, tmp_path, "--ip", "198.51.100.7")
    assert (r["outcome"]["action"], r["ended"], r["actions"]) == ("accept", "connect", [])
    r = trial(EXE, tmp_path, "--sender", "anyone@monitoring.example.org")
    assert (r["outcome"]["action"], r["ended"]) == ("accept", "mail")
    r = trial(EXE, tmp_path)
    assert r["outcome"]["text"] == "Executable attachments are not accepted (invoice.pdf.exe)"


def test_modular_helo_claiming_our_name(tmp_path):
    r = trial(PLAIN, tmp_path, "--helo", "MX.example.com.", "--ip", "203.0.113.9")
    assert r["ended"] == "helo" and r["outcome"]["text"] == "You are not mx.example.com" and r["exit"] == 1
    assert trial(PLAIN, tmp_path, "--helo", "[10.20.0.1]", "--ip", "203.0.113.9")["exit"] == 1
    assert trial(PLAIN, tmp_path, "--helo", "mx.example.com", "--ip", "10.20.3.4")["exit"] == 0


def test_modular_wildcard_addresses_go_to_first_last_with_the_original_stamped(tmp_path):
    r = trial(PLAIN, tmp_path, "--rcpt", "john.smith.shopname@Example.COM", "--rcpt", "jane.doe@example.com",
             "--rcpt", "john.smith.x@elsewhere.org")  # fmt: skip
    assert r["actions"] == [
        ["delete_recipient", "john.smith.shopname@Example.COM"],
        ["add_recipient", "john.smith@Example.COM", None],
        ["add_header", "X-Original-Recipient", "john.smith.shopname@Example.COM"],
    ]


def test_modular_header_characters(tmp_path):
    raw8 = "From: Jörg <j@example.org>\r\nSubject: x\r\n\r\nhi\r\n".encode()
    r = trial(raw8, tmp_path)
    assert r["outcome"]["text"] == "Header From has unencoded 8-bit characters"
    assert r["tags"] == ["header_chars"]
    assert trial(raw8, tmp_path, "--mail-arg", "SMTPUTF8")["exit"] == 0
    r = trial(b"From: a@example.org\r\nSubject: a\x1bb\r\n\r\nhi\r\n", tmp_path)
    assert r["outcome"]["text"] == "Header Subject has a control character (0x1b)"


def test_modular_charset_block_in_headers_and_parts(tmp_path):
    r = trial(b"From: a@example.org\r\nSubject: =?EUC-KR?B?x5GxuQ==?=\r\n\r\nhi\r\n", tmp_path)
    assert r["outcome"]["text"] == "Mail in the charset euc-kr is not accepted here"
    r = trial(b"Content-Type: text/plain; charset=ks_c_5601-1987\r\n\r\nhi\r\n", tmp_path)
    assert r["outcome"]["text"] == "Mail in the charset ks_c_5601-1987 is not accepted here"


@pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not found")
def test_modular_bad_filename_inside_an_archive():
    eml = CORPUS / "constructed-eicar-inside-zip.eml"
    argv = [sys.executable, "-m", "defang", "test", str(eml), "--filter", str(MODULAR)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    reply = "reject 554 5.7.1 Executable attachments are not accepted (eicar.com in documents.zip)"
    assert f"outcome: {reply}" in r.stdout


def test_modular_a_rule_switched_to_monitor_in_the_config(tmp_path):
    config = tmp_path / "defang.toml"
    config.write_text('[filter]\nmonitor_rules = ["bad_filename"]\n')
    r = trial(EXE, tmp_path, "--config", str(config))
    assert r["outcome"]["action"] == "continue" and r["tags"] == ["bad_filename:monitor"]
    entry = ("reject 554 5.7.1 Executable attachments are not accepted (invoice.pdf.exe) "
             "(filter_part, part 2, rule bad_filename)")
    assert r["would"] == [entry] and ["add_header", "X-Defang-Would", entry] in r["actions"]


# --- the scanner examples, with real spamd and clamd -----------------------------------------

SCANNERS_MISSING = __import__("defang.testbed.scanners", fromlist=["x"]).scanners_available()


@pytest.fixture(scope="module")
def scanner_config(tmp_path_factory):
    from defang.testbed.scanners import Clamd, Spamd

    spamd, clamd = Spamd().start(), Clamd().start()
    config = tmp_path_factory.mktemp("cfg") / "defang.toml"
    config.write_text(f'[spamassassin]\naddress = "{spamd.inet}"\n[clamav]\naddress = "{clamd.unix}"\n'
                      '[notify]\nadministrator = "admin@example.net"\n')  # fmt: skip
    yield config
    spamd.stop()
    clamd.stop()


needs_scanners = pytest.mark.skipif(SCANNERS_MISSING is not None, reason=str(SCANNERS_MISSING))


@needs_scanners
def test_spam_score_example(scanner_config, tmp_path):
    from scanmail import CLEAN, SPAM

    spam = EXAMPLES / "spam_score.py"
    r = trial(SPAM, tmp_path, "--config", str(scanner_config), filter_path=spam)
    assert r["exit"] == 1 and r["outcome"]["text"].startswith("Message looks like spam (score 10")
    r = trial(CLEAN, tmp_path, "--config", str(scanner_config), filter_path=spam)
    status = {a[1]: a[2] for a in r["actions"]}["X-Spam-Status"]
    assert r["exit"] == 0 and status.startswith("No, score=")
    r = trial(SPAM, tmp_path, "--config", str(scanner_config), "--sender", "alerts@partner.example",
              filter_path=spam)  # fmt: skip
    assert (r["outcome"]["action"], r["ended"]) == ("accept", "mail")


@needs_scanners
def test_virus_notify_example(scanner_config, tmp_path):
    from scanmail import CLEAN, VIRUS_ZIP

    virus = EXAMPLES / "virus_notify.py"
    r = trial(VIRUS_ZIP, tmp_path, "--config", str(scanner_config), filter_path=virus)
    assert r["exit"] == 1 and r["outcome"]["text"] == "Virus found: Test.EICAR.NDB.UNOFFICIAL"
    assert r["notices"] == ["notice to admin@example.net: Virus refused: Test.EICAR.NDB.UNOFFICIAL"]
    dead = tmp_path / "dead.toml"
    dead.write_text('[clamav]\naddress = "unix:/nonexistent/clamd.sock"\n')
    r = trial(CLEAN, tmp_path, "--config", str(dead), filter_path=virus)
    assert r["exit"] == 2 and r["outcome"]["text"] == "Virus scan unavailable, try again later"


@needs_scanners
def test_check_address_example(scanner_config, tmp_path):
    from scanmail import CLEAN

    check = EXAMPLES / "check_address.py"
    args = ("--config", str(scanner_config), "--ip", "203.0.113.7", "--helo", "client.example.net")
    r = trial(CLEAN, tmp_path, *args, "--sender", "alice@example.org", "--rcpt", "email-check@example.com",
              filter_path=check)  # fmt: skip
    assert r["exit"] == 3 and r["notices"] == ["notice to alice@example.org: Re: Lunch on Thursday"]
    r = trial(CLEAN, tmp_path, *args, "--sender", "alice@example.org", "--rcpt", "email-check@example.com",
              "--rcpt", "bob@example.com", filter_path=check)  # fmt: skip
    assert r["exit"] == 0 and r["actions"] == [["delete_recipient", "email-check@example.com"]]


# --- the sender-authentication examples, against the test DNS server (NSD) ----------------------

AUTH_MESSAGE = (b"From: Alice <alice@%s>\r\nTo: bob@relay.test\r\nSubject: Figures\r\n"
                b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <f1@example.test>\r\n\r\n"
                b"Hello\r\n")  # fmt: skip


def with_lists(tmp_path: Path, example: str, zones: list[str]) -> Path:
    """The example with its blocklists set to the test server's."""
    source = (EXAMPLES / example).read_text()
    line = next(x for x in source.splitlines() if x.startswith("BLOCKLISTS = "))
    copy = tmp_path / example
    copy.write_text(source.replace(line, f"BLOCKLISTS = {zones!r}"))
    return copy


def test_spf_policy_example(dns_config, tmp_path):
    spf = with_lists(tmp_path, "spf_policy.py", ["bl.test"])
    base = ("--config", str(dns_config))

    def outcome(sender: str, ip: str) -> tuple[str, str | None, str | None]:
        args = ("--sender", sender, "--ip", ip)
        r = trial(AUTH_MESSAGE % b"example.test", tmp_path, *base, *args, filter_path=spf)
        return r["outcome"]["action"], r["outcome"].get("code"), r["ended"]

    assert outcome("alice@example.test", "192.0.2.5") == ("accept", None, "mail")
    assert outcome("alice@example.test", "198.51.100.7") == ("reject", "550", "mail")
    assert outcome("a@soft.example.test", "192.0.2.99") == ("reject", "554", "mail")  # softfail, listed
    assert outcome("a@soft.example.test", "198.51.100.7") == ("continue", None, "end of message")
    assert outcome("a@broken.example.test", "192.0.2.5") == ("tempfail", "451", "mail")
    r = trial(AUTH_MESSAGE % b"example.test", tmp_path, *base, "--sender", "a@soft.example.test", "--ip",
              "192.0.2.99", filter_path=spf)  # fmt: skip
    assert r["outcome"]["text"] == "192.0.2.99 is listed by bl.test: 192.0.2.99 is a spam source, see bl.test"


def test_dnsbl_monitor_example(dns_config, tmp_path):
    monitor = with_lists(tmp_path, "dnsbl_monitor.py", ["bl.test"])
    r = trial(AUTH_MESSAGE % b"example.test", tmp_path, "--config", str(dns_config), "--ip", "192.0.2.99",
              filter_path=monitor)  # fmt: skip
    assert r["exit"] == 0 and r["tags"] == ["dnsbl:bl.test"]
    assert r["would"] == ["reject 554 5.7.1 192.0.2.99 is listed by bl.test (filter_relay)"]


def test_dmarc_reject_example(dns_config, tmp_path):
    dmarc = EXAMPLES / "dmarc_reject.py"
    base = ("--config", str(dns_config), "--ip", "198.51.100.7", "--sender")
    r = trial(AUTH_MESSAGE % b"example.test", tmp_path, *base, "alice@example.test", filter_path=dmarc)
    assert r["outcome"]["text"] == "DMARC policy of example.test rejects this message" and r["exit"] == 1
    quiet = AUTH_MESSAGE % b"quiet.example.test"
    r = trial(quiet, tmp_path, *base, "a@quiet.example.test", filter_path=dmarc)
    assert ["change_header", "Subject", "[DMARC] Figures", 1] in r["actions"] and r["exit"] == 0
    r = trial(AUTH_MESSAGE % b"example.test", tmp_path, *base, "bounce@lists.example.org", filter_path=dmarc)
    assert r["exit"] == 0, "the allow list is honoured first"
    inserted = {a[2]: a[3] for a in r["actions"] if a[0] == "insert_header"}
    assert inserted["Authentication-Results"].startswith("mx.relay.test;\n\tspf=")


def test_dkim_sign_example(dns_config, tmp_path):
    source = (EXAMPLES / "dkim_sign.py").read_text().replace('OUR_DOMAINS = {"example.com"}',
                                                              'OUR_DOMAINS = {"relay.test"}')  # fmt: skip
    (tmp_path / "dkim_sign.py").write_text(source)
    r = trial(AUTH_MESSAGE % b"relay.test", tmp_path, "--config", str(dns_config), "--ip", "127.0.0.1",
              filter_path=tmp_path / "dkim_sign.py")  # fmt: skip
    (signature,) = [a for a in r["actions"] if a[0] == "insert_header"]
    assert signature[2] == "DKIM-Signature" and "d=relay.test" in signature[3] and "s=s2026" in signature[3]
    r = trial(AUTH_MESSAGE % b"relay.test", tmp_path, "--config", str(dns_config), "--ip", "198.51.100.7",
              filter_path=tmp_path / "dkim_sign.py")  # fmt: skip
    assert r["actions"] == [], "not ours: not signed"


# --- the shared-state examples (greylisting, rate limit, lists), on a SQLite file --------------

GREYLIST = EXAMPLES / "greylisting.py"
RATELIMIT = EXAMPLES / "ratelimit_auth.py"
LISTS = EXAMPLES / "recipient_lists.py"


def state_config(tmp_path: Path, delay: int = 0) -> Path:
    config = tmp_path / "state.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path / "run"}"\nuser = "root"\n'
                      f"[greylist]\ndelay = {delay}\n")  # fmt: skip
    return config


def lists_cmd(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "defang", "lists", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip


def test_greylisting_first_attempt_retries_then_passes(tmp_path):
    config = state_config(tmp_path)
    envelope = ("--config", str(config), "--ip", "203.0.113.5", "--sender", "a@example.org",
                "--rcpt", "b@example.com")  # fmt: skip
    first = trial(PLAIN, tmp_path, *envelope, filter_path=GREYLIST)["rcpt"]["b@example.com"]
    assert (first["action"], first["code"], first["dsn"]) == ("tempfail", "451", "4.7.1")
    assert first["text"].startswith("Greylisted, try again in ")
    assert trial(PLAIN, tmp_path, *envelope, filter_path=GREYLIST)["exit"] == 0
    # another client network, another triplet: delayed
    other = trial(PLAIN, tmp_path, *envelope, "--ip", "198.51.100.5", filter_path=GREYLIST)
    assert other["rcpt"]["b@example.com"]["code"] == "451"


def test_greylisting_exemptions(tmp_path):
    config = state_config(tmp_path, delay=3600)
    base = ("--config", str(config), "--sender", "a@example.org", "--rcpt", "b@example.com")
    assert trial(PLAIN, tmp_path, *base, "--ip", "192.168.1.2", filter_path=GREYLIST)["exit"] == 0
    assert trial(PLAIN, tmp_path, *base, "--ip", "203.0.113.5", "--macro", "{auth_authen}=alice",
                 filter_path=GREYLIST)["exit"] == 0  # fmt: skip
    assert trial(PLAIN, tmp_path, "--config", str(config), "--sender", "x@mail.bank.example", "--rcpt",
                 "b@example.com", "--ip", "203.0.113.5", filter_path=GREYLIST)["exit"] == 0  # fmt: skip
    assert trial(PLAIN, tmp_path, *base, "--ip", "203.0.113.5", filter_path=GREYLIST)["exit"] == 2  # deferred
    assert lists_cmd(config, "add", "allow", "203.0.113.0/24").returncode == 0  # no reload: next message
    assert trial(PLAIN, tmp_path, *base, "--ip", "203.0.113.5", filter_path=GREYLIST)["exit"] == 0


def test_ratelimit_per_authenticated_user(tmp_path):
    config = state_config(tmp_path)
    args = ("--config", str(config), "--ip", "203.0.113.5", "--macro", "{auth_authen}=alice")
    rcpts = [a for n in range(25) for a in ("--rcpt", f"r{n}@example.com")]
    r = trial(PLAIN, tmp_path, *args, *rcpts, filter_path=RATELIMIT)
    refused = [rcpt for rcpt, outcome in r["rcpt"].items() if outcome["action"] != "continue"]
    assert refused == [f"r{n}@example.com" for n in range(20, 25)]
    assert {r["rcpt"][x]["code"] for x in refused} == {"451"} and len(r["recipients"]) == 20
    bob = trial(PLAIN, tmp_path, "--config", str(config), "--macro", "{auth_authen}=bob", "--rcpt",
                "x@example.com", filter_path=RATELIMIT)  # fmt: skip
    assert bob["exit"] == 0


def test_recipient_lists_allow_before_block_and_scores(tmp_path):
    config = state_config(tmp_path)
    assert lists_cmd(config, "add", "block", "spam.example").returncode == 0
    r = lists_cmd(config, "add", "allow", "news@spam.example", "--scope", "alice@example.org")
    assert r.returncode == 0
    spammy = PLAIN.replace(b"Subject: hi", b"Subject: cheap viagra")
    base = ("--config", str(config), "--sender", "news@spam.example")
    r = trial(spammy, tmp_path, *base, "--rcpt", "alice@example.org", filter_path=LISTS)
    assert (r["outcome"]["action"], r["tags"]) == ("accept", ["list_allow", "allow_listed"])  # no score ran
    r = trial(spammy, tmp_path, *base, "--rcpt", "bob@example.org", filter_path=LISTS)
    assert r["rcpt"]["bob@example.org"]["code"] == "550"
    r = trial(spammy, tmp_path, "--config", str(config), "--sender", "a@else.example", "--rcpt",
              "alice@example.org", filter_path=LISTS)  # fmt: skip
    assert r["outcome"]["text"] == "Looks like spam"


@needs_scanners
def test_per_user_spam_example_decides_each_threshold_group_alone(scanner_config, tmp_path):
    from scanmail import SPAM

    # the example beside a thresholds file of the test's: GTUBE scores about 1000
    example = tmp_path / "per_user_spam.py"
    example.write_text((EXAMPLES / "per_user_spam.py").read_text())
    thresholds = "ceo@example.com 4\n@lists.example.com 5000\nbad line\n"
    (tmp_path / "per_user_thresholds.txt").write_text(thresholds)
    args = ("--config", str(scanner_config))
    # ceo@ refuses from 4, the lists from 5000: two groups, the second gets 452
    r = trial(SPAM, tmp_path, *args, "--rcpt", "ceo@example.com", "--rcpt", "dev@lists.example.com",
              filter_path=example)  # fmt: skip
    assert r["rcpt"]["dev@lists.example.com"]["code"] == "452" and r["recipients"] == ["ceo@example.com"]
    assert r["exit"] == 1 and r["outcome"]["text"].startswith("Message looks like spam")
    # the MTA's next transaction: the lists' group alone, where the same message is tagged
    r = trial(SPAM, tmp_path, *args, "--rcpt", "dev@lists.example.com", "--rcpt", "ops@lists.example.com",
              "--rcpt", "ceo@example.com", filter_path=example)  # fmt: skip
    assert r["recipients"] == ["dev@lists.example.com", "ops@lists.example.com"]
    assert r["exit"] == 0 and {a[1]: a[2] for a in r["actions"]}["Subject"].startswith("[SPAM] ")
    # a recipient not listed: the default group and threshold (10): refused
    r = trial(SPAM, tmp_path, *args, "--rcpt", "bob@example.com", filter_path=example)
    assert r["exit"] == 1 and r["recipients"] == ["bob@example.com"]
