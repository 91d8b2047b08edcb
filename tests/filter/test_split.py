"""Split after accept (msg.split_by_recipient / split_by_domain, issue 30 approach 2): each
copy handed to a real program as the configured sendmail, the original discarded only once
every copy was taken, a 4xx for the original when one was not."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from test_mime_rewrite import crlf, inline_filter, run

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.workers.loader import load_filter
from defang.workers.runner import FilterRunner

MESSAGE = crlf("""
    From: Alice <alice@example.com>
    Subject: For the team

    Hello all.
    """)
SPLITTING = """
    from defang import reject
    def filter_begin(msg):
        msg.scratch["split"] = msg.split_by_{by}()
    def filter_end(msg):
        return reject("filter_end ran", "550", "5.7.1")
    """
RCPTS = ("a@one.example", "b@two.example", "c@one.example")


def sendmail(tmp_path: Path, fail_at: int = 0) -> Path:
    """A sendmail that keeps each call (argv, stdin) in calls/N.*; call ``fail_at`` exits 75."""
    (tmp_path / "calls").mkdir()
    script = tmp_path / "sendmail"
    script.write_text(f"""#!/bin/sh
n=$(( $(ls "{tmp_path}/calls" | wc -l) / 2 + 1 ))
printf '%s\\n' "$@" > "{tmp_path}/calls/$n.argv"
cat > "{tmp_path}/calls/$n.stdin"
if [ "$n" = "{fail_at}" ]; then echo "sendmail: queue file write error" >&2; exit 75; fi
""")
    script.chmod(0o755)
    return script


def calls(tmp_path: Path) -> list[tuple[list[str], bytes]]:
    d = tmp_path / "calls"
    return [((d / f"{n}.argv").read_text().splitlines(), (d / f"{n}.stdin").read_bytes())
            for n in range(1, len(list(d.glob("*.argv"))) + 1)]  # fmt: skip


def runner(tmp_path: Path, by: str, script: Path, **settings) -> FilterRunner:
    cfg = replace(configmod.load(None), split_sendmail_path=script, **settings)
    return FilterRunner.from_config(load_filter(str(inline_filter(tmp_path, SPLITTING.format(by=by)))), cfg)


def test_one_copy_per_recipient_then_the_original_is_discarded(tmp_path):
    reply = run(runner(tmp_path, "recipient", sendmail(tmp_path)), MESSAGE, tmp_path, recipients=RCPTS)
    assert reply["verdict"]["action"] == "discard"  # filter_end's reject never ran: the split decided
    made = calls(tmp_path)
    assert [argv for argv, _ in made] == [["-i", "-f", "alice@example.com", "--", r] for r in RCPTS]
    for i, (_, data) in enumerate(made, 1):
        assert data.startswith(f"X-Defang-Split: Q1 {i}/3\r\n".encode())
        assert data.endswith(b"Subject: For the team\r\n\r\nHello all.\r\n")


def test_one_copy_per_domain(tmp_path):
    run(runner(tmp_path, "domain", sendmail(tmp_path)), MESSAGE, tmp_path, recipients=RCPTS)
    made = [argv[4:] for argv, _ in calls(tmp_path)]
    assert made == [["a@one.example", "c@one.example"], ["b@two.example"]]


def test_one_recipient_is_not_split_and_the_hooks_go_on(tmp_path):
    r = runner(tmp_path, "recipient", sendmail(tmp_path))
    reply = run(r, MESSAGE, tmp_path, recipients=("a@x.example",))
    assert reply["verdict"]["text"] == "filter_end ran" and calls(tmp_path) == []


def test_a_copy_the_mta_does_not_take_means_451_for_the_original(tmp_path, caplog):
    r = runner(tmp_path, "recipient", sendmail(tmp_path, fail_at=2))
    with caplog.at_level(logging.ERROR, logger="defang.filter"):
        reply = run(r, MESSAGE, tmp_path, recipients=RCPTS)
    assert reply["verdict"] == {"action": "tempfail", "code": "451", "dsn": "4.3.0",
                                "text": "Temporary local problem, please try again later"}  # fmt: skip
    assert len(calls(tmp_path)) == 2  # the third copy was not tried
    assert "copy 2 of 3 (to b@two.example) not queued" in caplog.text
    assert "copies 1-1 were queued: the retry sends them again" in caplog.text


def test_a_trial_shows_the_copies_and_hands_over_none(tmp_path):
    script = sendmail(tmp_path)
    path = inline_filter(tmp_path, SPLITTING.format(by="recipient"))
    t = Trial(replace(configmod.load(None, filter_path=str(path)), split_sendmail_path=script))
    try:
        r = t.run(MESSAGE, Envelope(recipients=list(RCPTS)))
    finally:
        t.close()
    assert r.outcome["action"] == "discard" and calls(tmp_path) == []
    assert [a for a in r.actions if a[0] == "split"] == [["split", rcpt] for rcpt in RCPTS]


def test_more_copies_than_max_copies_is_no_split_and_the_filter_decides_as_a_whole(tmp_path, caplog):
    r = runner(tmp_path, "recipient", sendmail(tmp_path), split_max_copies=2)
    with caplog.at_level(logging.WARNING, logger="defang.filter"):
        reply = run(r, MESSAGE, tmp_path, recipients=RCPTS)
    assert reply["verdict"]["text"] == "filter_end ran" and calls(tmp_path) == []
    assert "not split: 3 copies (by recipient) would pass [split] max_copies 2" in caplog.text
    run(r, MESSAGE, tmp_path, recipients=RCPTS[:2])  # two: split
    assert len(calls(tmp_path)) == 2


def test_a_sender_s_forged_marker_changes_nothing(tmp_path):
    forged = b"X-Defang-Split: Q0 1/1\r\n" + MESSAGE
    reply = run(runner(tmp_path, "recipient", sendmail(tmp_path)), forged, tmp_path, recipients=RCPTS)
    assert reply["verdict"]["action"] == "discard" and len(calls(tmp_path)) == 3  # split all the same
    assert calls(tmp_path)[0][1].startswith(b"X-Defang-Split: Q1 1/3\r\nX-Defang-Split: Q0 1/1\r\n")
