"""The three filters MIMEDefang ships, ported (filters/examples/mimedefang/), on real
messages of the corpus, by ``defang test`` (real spamd and clamd where they scan).

Each is also replayed over the whole corpus in test_replay.py, with the other examples."""

from __future__ import annotations

import email.policy
import re
from email.parser import BytesParser
from pathlib import Path

import pytest
from paths import CORPUS, REPO
from test_examples import needs_scanners, trial

PORTS = REPO / "filters" / "examples" / "mimedefang"
SHIPPED = PORTS / "mimedefang_filter.py"
MINIMUM = PORTS / "suggested_minimum.py"
STREAM = PORTS / "stream_by_domain.py"
PARSER = BytesParser(policy=email.policy.default)
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not found")


@pytest.fixture(scope="module")
def scanner_config(tmp_path_factory):
    """A config with real spamd and clamd; clamd flags encrypted archives (AlertEncrypted),
    the "suspicious" category MIMEDefang's paranoid level acts on."""
    from defang.testbed.scanners import Clamd, Spamd

    spamd, clamd = Spamd().start(), Clamd(extra=("AlertEncrypted yes",)).start()
    base = tmp_path_factory.mktemp("cfg")
    config = base / "defang.toml"
    config.write_text(f'[spamassassin]\naddress = "{spamd.inet}"\n[clamav]\naddress = "{clamd.unix}"\n'
                      f'[notify]\nadministrator = "admin@example.net"\n[quarantine]\ndir = "{base / "q"}"\n')
    yield config
    spamd.stop()
    clamd.stop()


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def rebuilt_leaves(r: dict, tmp_path: Path, original: bytes) -> list[tuple[str, str | None]]:
    """The leaves of the message as the MTA passes it on: the original headers, with the
    Content-Type a header action gave it, and the new body."""
    ctype = PARSER.parsebytes(original)["Content-Type"]
    for action in r["actions"]:
        if action[0] in ("change_header", "insert_header") and "Content-Type" in action:
            ctype = action[-2] if action[0] == "change_header" else action[3]
    raw = b"Content-Type: " + str(ctype).encode() + b"\r\n\r\n" + (tmp_path / "body.out").read_bytes()
    return [(p.get_content_type(), p.get_filename()) for p in PARSER.parsebytes(raw).walk()
            if not p.is_multipart()]  # fmt: skip


# --- mimedefang-filter (the shipped default) ------------------------------------------------


@needs_corpus
def test_an_exe_is_dropped_with_the_warning_first(tmp_path: Path) -> None:
    raw = corpus("mimedefang-exe.eml")
    r = trial(raw, tmp_path, "--body-out", str(tmp_path / "body.out"), filter_path=SHIPPED)
    assert (r["exit"], r["tags"]) == (0, ["bad_filename", "mail_in"])
    assert rebuilt_leaves(r, tmp_path, raw) == [("text/plain", None), ("text/plain", None)]
    new = (tmp_path / "body.out").read_text()
    assert new.index("An attachment named test.exe was removed") < new.index("\nTest\n")
    assert "test.exe" not in new.replace("An attachment named test.exe", "")


@needs_corpus
def test_a_bad_name_inside_a_zip_is_dropped(tmp_path: Path) -> None:
    raw = corpus("constructed-eicar-inside-zip.eml")  # eicar.com inside documents.zip; no clamd here
    r = trial(raw, tmp_path, "--body-out", str(tmp_path / "body.out"), filter_path=SHIPPED)
    assert r["exit"] == 0 and "bad_filename" in r["tags"]
    assert "application/zip" not in [t for t, _ in rebuilt_leaves(r, tmp_path, raw)]


@needs_corpus
def test_harmless_attachments_pass_untouched(tmp_path: Path) -> None:
    for name in ("mimedefang-zip.eml", "mimedefang-tar.eml", "mimedefang-multipart.eml"):
        r = trial(corpus(name), tmp_path, filter_path=SHIPPED)
        assert (r["exit"], r["actions"], r["tags"]) == (0, [], ["mail_in"]), name


def test_message_partial_is_refused_with_mimedefangs_code(tmp_path: Path) -> None:
    partial = (b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n"
               b"\r\n"
               b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
               b"Content-Type: message/partial; id=\"x@y\"; number=1; total=2\r\n\r\nSubject: half\r\n\r\n"
               b"first half\r\n--b--\r\n")  # fmt: skip
    r = trial(partial, tmp_path, filter_path=SHIPPED)
    assert r["exit"] == 1 and r["outcome"] == {"action": "reject", "code": "554", "dsn": "5.7.1",
                                               "text": "MIME type message/partial not accepted here"}


def test_suspicious_header_characters_quarantine_and_discard(tmp_path: Path) -> None:
    raw = b"From: a@example.org\r\nSubject: =?\x00?= hello\r\n\r\nbody\r\n"
    config = tmp_path / "q.toml"
    config.write_text(f'[quarantine]\ndir = "{tmp_path / "quarantine"}"\n')
    r = trial(raw, tmp_path, "--config", str(config), filter_path=SHIPPED)
    assert (r["exit"], r["tags"]) == (3, ["suspicious_chars"])
    assert len(r["quarantine"]) == 1


@needs_scanners
@needs_corpus
def test_gtube_gets_the_spam_score_header_and_the_report(scanner_config, tmp_path: Path) -> None:
    raw = corpus("mimedefang-gtube.eml")
    r = trial(raw, tmp_path, "--config", str(scanner_config), "--body-out", str(tmp_path / "body.out"),
              filter_path=SHIPPED)  # fmt: skip
    (score,) = [a for a in r["actions"] if a[1] == "X-Spam-Score"]
    assert score[0] == "add_header"
    assert re.fullmatch(r"10\d\d\.\d \(\*{40}\) ([A-Z0-9_]+,)*GTUBE(,[A-Z0-9_]+)*", score[2]), score
    assert ("text/plain", "SpamAssassinReport.txt") in rebuilt_leaves(r, tmp_path, raw)
    assert r["tags"] == ["spam", "mail_in"]


@needs_scanners
def test_ham_loses_a_forged_spam_score(scanner_config, tmp_path: Path) -> None:
    from scanmail import CLEAN

    forged = CLEAN.replace(b"\r\n\r\n", b"\r\nX-Spam-Score: -5 (trust me)\r\n\r\n", 1)
    r = trial(forged, tmp_path, "--config", str(scanner_config), filter_path=SHIPPED)
    assert r["exit"] == 0 and r["actions"] == [["delete_header", "X-Spam-Score", 1]]


@needs_scanners
@needs_corpus
def test_a_virus_is_discarded_and_a_dead_scanner_is_a_tempfail(scanner_config, tmp_path: Path) -> None:
    r = trial(corpus("constructed-eicar-inside-zip.eml"), tmp_path, "--config", str(scanner_config),
              filter_path=SHIPPED)  # fmt: skip
    assert (r["exit"], r["tags"]) == (3, ["virus"])
    dead = tmp_path / "dead.toml"
    dead.write_text('[clamav]\naddress = "unix:/nonexistent/clamd.sock"\n')
    r = trial(corpus("mimedefang-exe.eml"), tmp_path, "--config", str(dead), filter_path=SHIPPED)
    assert r["exit"] == 2 and r["outcome"] == {"action": "tempfail", "code": "451", "dsn": "4.3.0",
                                               "text": "Problem running virus-scanner"}


# --- suggested-minimum, its options on -----------------------------------------------------


@needs_corpus
@pytest.mark.parametrize("name", ["mimedefang-multipart.eml", "mimedefang-zip.eml"])
def test_redundant_html_is_dropped_and_the_rest_kept(name: str, tmp_path: Path) -> None:
    raw = corpus(name)
    before = [(p.get_content_type(), p.get_filename()) for p in PARSER.parsebytes(raw).walk()
              if not p.is_multipart()]  # fmt: skip
    r = trial(raw, tmp_path, "--body-out", str(tmp_path / "body.out"), filter_path=MINIMUM)
    assert r["exit"] == 0
    assert rebuilt_leaves(r, tmp_path, raw) == [leaf for leaf in before if leaf[0] != "text/html"]
    assert ("text/html", None) in before


@needs_corpus
def test_rebuild_leaves_a_signed_message_as_it_came(tmp_path: Path) -> None:
    r = trial(corpus("enmime-mail-mime-signed.eml"), tmp_path, filter_path=MINIMUM)
    assert (r["exit"], r["actions"]) == (0, []), "rebuild() copies a signed message: nothing to send"


@needs_scanners
@needs_corpus
def test_a_password_protected_zip_is_suspicious_and_quarantined(scanner_config, tmp_path: Path) -> None:
    raw = corpus("sa-spam-olevbmacro-zippwmacro.eml")
    r = trial(raw, tmp_path, "--config", str(scanner_config), filter_path=MINIMUM)
    assert (r["exit"], r["tags"], len(r["quarantine"])) == (3, ["suspicious"], 1)
    assert r["notices"] == ["notice to admin@example.net: MIMEDefang Quarantine Report"]
    shipped = trial(raw, tmp_path, "--config", str(scanner_config), filter_path=SHIPPED)
    assert shipped["exit"] == 0, "the shipped filter's lower paranoia lets suspicious mail through"


# --- stream-by-domain -------------------------------------------------------------------------


def test_recipients_of_a_second_domain_are_told_to_come_back_in_their_own_transaction(tmp_path: Path) -> None:
    from scanmail import CLEAN

    r = trial(CLEAN, tmp_path, "--rcpt", "a@abc.com", "--rcpt", "b@xyz.com", "--rcpt", "c@ABC.com",
              filter_path=STREAM)  # fmt: skip
    assert r["rcpt"]["b@xyz.com"] == {"action": "tempfail", "code": "452", "dsn": "4.5.3",
                                      "text": "One domain per message please: send to xyz.com separately"}
    assert r["recipients"] == ["a@abc.com", "c@ABC.com"] and r["exit"] == 0


@needs_corpus
def test_each_domain_gets_its_own_rules(tmp_path: Path) -> None:
    raw = corpus("mimedefang-zip.eml")
    out = ("--body-out", str(tmp_path / "body.out"))
    r = trial(raw, tmp_path, "--rcpt", "a@abc.com", *out, filter_path=STREAM)
    assert "test.zip" not in [n for _, n in rebuilt_leaves(r, tmp_path, raw)]
    assert "An attachment named test.zip was removed: abc.com does not accept it." in \
        (tmp_path / "body.out").read_text()  # fmt: skip
    for rcpt in ("b@xyz.com", "c@elsewhere.org"):
        assert trial(raw, tmp_path, "--rcpt", rcpt, filter_path=STREAM)["actions"] == [], rcpt
