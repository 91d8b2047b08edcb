"""``defang replay``: many messages as ``defang test`` runs one, --compare, the sources,
the quarantine store with its envelopes, --release-accepted."""

from __future__ import annotations

import json
import mailbox
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from paths import CORPUS, REPO
from test_quarantine import fake_sendmail, make_config, quarantine_one

from defang.cli import main as cli

MODULAR = REPO / "filters" / "examples" / "modular"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not found")


def defang(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # rich's tables: no cell folded
    argv = [sys.executable, "-m", "defang", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO, input=stdin, env=env)


def replay(*args: str) -> tuple[int, dict]:
    r = defang("replay", "--json", *args)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


EXAMPLES = ["filters/filter.py", *(str(p.relative_to(REPO)) for p in sorted(
    [*(REPO / "filters" / "examples").glob("*.py"), *(REPO / "filters" / "examples").glob("*/filter.py"),
     *(REPO / "filters" / "examples").glob("mimedefang/*.py")]))]
#: Examples whose answer to a message depends, by design, on the messages before it and on
#: the clock: greylisting's first attempt and its "try again in N seconds (after HH:MM:SS)".
#: A replay of the corpus and a `defang test` of each message cannot answer alike; what they
#: do is tested in test_examples.py (each attempt, against its own state).
ORDER_DEPENDENT = {"filters/examples/greylisting.py"}


@needs_corpus
@pytest.mark.parametrize("filter_path", sorted(set(EXAMPLES) - ORDER_DEPENDENT))  # the default, every example
def test_replay_gives_each_corpus_message_what_defang_test_gives_it(filter_path, capsys, dns_config):
    # dns_config: the examples that use defang.auth ask the test DNS server, never the system's
    rc, out = replay(str(CORPUS), "--filter", filter_path, "--jobs", "2", "--config", str(dns_config))
    assert rc == 0, out["summary"]["filters"][0]["errors"]
    replayed = {m["name"]: m["results"][0] for m in out["messages"]}
    assert len(replayed) == len(list(CORPUS.glob("*.eml"))) == out["summary"]["messages"]
    tested = {}
    for eml in sorted(CORPUS.glob("*.eml")):
        code = cli.main(["test", str(eml), "--json", "--filter", filter_path, "--config", str(dns_config)])
        result = json.loads(capsys.readouterr().out)
        assert code == result["exit"]
        tested[str(eml)] = result
    for name, result in tested.items():
        assert (replayed[name]["outcome"], replayed[name]["actions"], replayed[name]["exit"]) == (
            result["outcome"], result["actions"], result["exit"]), name
        # what is compared carries no resolver timing (seconds waited, a server's port): the
        # same lookup answers the same text however long it took (the test NSD answers
        # every query: response rate limiting off, defang.testbed.dns)
        said = json.dumps([result["outcome"], result["actions"]])
        assert not re.search(r"seconds|lifetime expired|@\d+ answered", said), (name, said)
    by_outcome = Counter(r["outcome"]["action"] for r in tested.values())
    assert out["summary"]["filters"][0]["outcomes"] == dict(by_outcome)
    assert out["summary"]["skipped_files"] == 2  # INDEX.tsv, README.md


@needs_corpus
def test_compare_finds_exactly_the_messages_one_rule_hits(tmp_path):
    other = tmp_path / "modular"
    shutil.copytree(MODULAR, other)
    source = (other / "filter.py").read_text()
    (other / "filter.py").write_text(source.replace('    "charset_block",', ""))
    assert '"charset_block",' not in (other / "filter.py").read_text()
    both = ["--filter", str(MODULAR / "filter.py"), "--compare", str(other / "filter.py")]
    rc, out = replay(str(CORPUS), *both)
    hit = [m["name"] for m in out["messages"] if "charset_block" in m["results"][0]["tags"]]
    assert hit, "the corpus has euc-kr mail"
    assert out["summary"]["differ"] == hit and rc == 1
    r = defang("replay", str(CORPUS), *both)
    assert r.returncode == 1 and f"{len(hit)} of {out['summary']['messages']} messages differ" in r.stdout
    table = r.stdout.split("messages differ", 1)[1]
    for name in hit:  # a row each: the name, then the first filter's reply beside the second's outcome
        (row,) = [line for line in table.splitlines() if name in line]
        assert "reject 554 5.7.1 Mail in the charset" in row and "continue" in row.split("reject 554")[1]


def test_mbox_and_maildir_and_files(tmp_path):
    box = mailbox.mbox(tmp_path / "box")
    for i in range(3):
        box.add(f"From: a{i}@example.org\nSubject: {i}\n\nbody {i}\n".encode())
    box.close()
    md = mailbox.Maildir(tmp_path / "Maildir")
    md.add(b"From: m@example.org\nSubject: x\n\nexe\n")
    f = tmp_path / "one.eml"
    f.write_bytes(b"From: f@example.org\r\n\r\nhi\r\n")
    rc, out = replay(str(tmp_path / "box"), str(tmp_path / "Maildir"), str(f))
    names = [m["name"] for m in out["messages"]]
    assert rc == 0 and names[:3] == [f"{tmp_path / 'box'}:{i}" for i in (1, 2, 3)]
    assert names[3].startswith(str(tmp_path / "Maildir" / "new")) and names[4] == str(f)


def test_errors_are_listed_with_their_file_and_exit_4(tmp_path):
    (tmp_path / "ok.eml").write_bytes(b"Subject: fine\r\n\r\nx\r\n")
    (tmp_path / "bad.eml").write_bytes(b"Subject: boom\r\n\r\nx\r\n")
    f = tmp_path / "f.py"
    f.write_text("def filter_end(msg):\n    if msg.subject == 'boom':\n        raise KeyError('nope')\n")
    rc, out = replay(str(tmp_path), "--filter", str(f))
    (error,) = out["summary"]["filters"][0]["errors"]
    assert rc == 4 and error == {"name": str(tmp_path / "bad.eml"),
                                 "error": "filter error in filter_end: KeyError: 'nope'"}  # fmt: skip
    r = defang("replay", str(tmp_path), "--filter", str(f))
    assert f"{tmp_path / 'bad.eml'}: filter error in filter_end: KeyError: 'nope'" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, code, line", [
    ([], 2, "defang replay: no PATH given and no --quarantine\n"),
    (["/nonexistent/x"], 4, "/nonexistent/x: No such file or directory\n"),
    (["--jobs", "0", "x"], 2, None),
])  # fmt: skip
def test_bad_input_is_one_line(args, code, line):
    r = defang("replay", *args)
    assert r.returncode == code and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    if line:
        assert r.stderr == line


def test_a_directory_without_messages_and_a_filter_that_does_not_load(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    r = defang("replay", str(tmp_path))
    assert r.returncode == 4 and r.stderr.startswith(f"{tmp_path}: no messages (no *.eml file")
    (tmp_path / "m.eml").write_bytes(b"Subject: x\r\n\r\nx\r\n")
    (tmp_path / "f.py").write_text("def filter_end(msg):\n  return (\n")
    r = defang("replay", str(tmp_path), "--filter", str(tmp_path / "f.py"))
    assert r.returncode == 4 and r.stderr == f"{tmp_path / 'f.py'}:2: SyntaxError: '(' was never closed\n"


SENDER_RULE = """\
from defang import reject
def filter_sender(conn, sender):
    if sender == "alice@example.com" and conn.ip == "{ip}":
        return reject("alice is blocked", "550", "5.7.1")
def filter_end(msg):
    msg.add_header("X-Rcpts", ",".join(msg.recipients))
"""


def test_a_quarantine_replay_uses_each_entry_s_saved_envelope_and_releases_what_passes(tmp_path):
    _, store, module = quarantine_one(tmp_path)
    qid = module.IDS[0]
    meta = store.get(qid)
    config = make_config(tmp_path, sendmail_path=str(fake_sendmail(tmp_path)))
    base = ["--config", str(config), "--quarantine"]
    blocking = tmp_path / "blocking.py"
    blocking.write_text(SENDER_RULE.format(ip=meta["conn"]["ip"]))
    rc, out = replay(*base, "--filter", str(blocking))
    (result,) = out["messages"]
    assert result["name"] == qid and result["qid"] == qid
    assert result["results"][0]["outcome"]["text"] == "alice is blocked"
    passing = tmp_path / "passing.py"
    passing.write_text(SENDER_RULE.format(ip="203.0.113.99"))
    rc, out = replay(*base, "--filter", str(passing))
    (result,) = out["messages"]
    assert result["results"][0]["actions"] == [["add_header", "X-Rcpts", "bob@example.org,carol@example.org"]]

    r = defang("replay", *base, "--filter", str(passing), "--release-accepted", stdin="")
    assert r.returncode == 1 and "release them with --yes (no terminal to ask on)" in r.stderr
    assert not (tmp_path / "sendmail.argv").exists() and store.get(qid)["releases"] == []
    r = defang("replay", *base, "--filter", str(blocking), "--release-accepted", "--yes")
    assert "nothing to release" in r.stderr and not (tmp_path / "sendmail.argv").exists()
    r = defang("replay", *base, "--filter", str(passing), "--release-accepted", "--yes")
    assert r.returncode == 0 and f"released {qid} via {tmp_path / 'sendmail'} to bob@example.org" in r.stdout
    argv = (tmp_path / "sendmail.argv").read_text().splitlines()
    assert argv == ["-i", "-f", "alice@example.com", "--", "bob@example.org", "carol@example.org"]
    assert len(store.get(qid)["releases"]) == 1
