"""[mime] limits on parts, depth and decoded size: a verdict and a log line, not a crash."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_mime_rewrite import crlf, inline_filter, run, runner_for

from defang.core import config
from defang.workers.mime.limits import MimeLimitError, MimeLimits
from defang.workers.mime.walk import walk

WALKER = """
    SEEN = []
    def filter_begin(msg):
        SEEN.clear()
    def filter_part(msg, part):
        SEEN.append(part.index)
        part.drop()
    """


def many_parts(n: int) -> bytes:
    body = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n" for i in range(n))
    return crlf("""
        From: a@example.com
        Content-Type: multipart/mixed; boundary="b"

        """) + body.encode() + b"--b--\r\n"


def nested(depth: int) -> bytes:
    level = b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n"
    head = b"".join(level % (i, i) for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"From: a@example.com\r\n" + head + b"Content-Type: text/plain\r\n\r\ndeep" + tail


def cfg_with(tmp_path: Path, **kw) -> config.Config:
    return config.finish(config.Config(runtime_dir=tmp_path, **kw))


@pytest.mark.parametrize(
    ("raw", "setting", "limit", "text"),
    [
        (many_parts(30), {"mime_max_parts": 20}, "max_parts", "max_parts exceeded: 21 > 20"),
        (nested(12), {"mime_max_depth": 10}, "max_depth", "max_depth exceeded: 11 > 10"),
        (many_parts(10), {"mime_max_decoded_size": 50}, "max_decoded_size", "max_decoded_size exceeded"),
    ],
)
def test_a_limit_ends_the_walk_with_on_limit(raw, setting, limit, text, tmp_path: Path, caplog) -> None:
    on_limit = config.ReplySpec("552", "5.3.4", "Too complex")
    cfg = cfg_with(tmp_path, mime_on_limit=on_limit, **setting)
    runner = runner_for(inline_filter(tmp_path, WALKER), config=cfg)
    with caplog.at_level(logging.WARNING, logger="defang.worker"):
        reply = run(runner, raw, tmp_path, queue_id="QLIM")
    assert reply["verdict"] == {"action": "reject", "code": "552", "dsn": "5.3.4", "text": "Too complex"}
    assert reply["actions"] == [] and "error" not in reply
    assert runner.loaded.module.SEEN == [], "the walk ends before any filter_part"
    assert f"QLIM: conn 7: message passed a MIME limit in part walk: {text}" in caplog.text
    assert not (tmp_path / "spool" / "message.new").exists()


def test_a_tempfail_on_limit_and_limits_switched_off(tmp_path: Path) -> None:
    soft = config.ReplySpec("451", "4.7.0", "Later")
    cfg = cfg_with(tmp_path, mime_max_parts=5, mime_on_limit=soft)
    runner = runner_for(inline_filter(tmp_path, WALKER), config=cfg)
    assert run(runner, many_parts(10), tmp_path)["verdict"]["action"] == "tempfail"
    off = cfg_with(tmp_path, mime_max_parts=0, mime_max_depth=0, mime_max_decoded_size=0)
    runner = runner_for(inline_filter(tmp_path, WALKER), config=off)
    reply = run(runner, many_parts(10), tmp_path)
    assert reply["verdict"]["action"] == "continue" and reply["actions"][-1][0] == "replace_body"


def test_nesting_too_deep_for_the_stdlib_parser_is_a_limit(tmp_path: Path) -> None:
    runner = runner_for(inline_filter(tmp_path, WALKER), config=cfg_with(tmp_path, mime_max_depth=0))
    reply = run(runner, nested(1200), tmp_path)
    assert reply["verdict"]["code"] == "554" and "error" not in reply


def test_the_filter_may_catch_the_limit(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        from defang import MimeLimitError
        def filter_begin(msg):
            try:
                msg.parts
            except MimeLimitError as exc:
                msg.quarantine(str(exc))
                msg.discard()
        def filter_end(msg):
            pass
        """)
    runner = runner_for(f, config=cfg_with(tmp_path, mime_max_parts=3))
    reply = run(runner, many_parts(5), tmp_path)
    assert reply["verdict"]["action"] == "discard"
    (entry,) = runner.quarantine_store.entries()
    assert entry["reasons"] == ["max_parts exceeded: 4 > 3"]


def test_walk_limits_directly() -> None:
    from email import message_from_bytes, policy

    msg = message_from_bytes(many_parts(3), policy=policy.default)
    assert len(list(walk(msg, MimeLimits(max_parts=3)))) == 4  # the message and its 3 parts
    with pytest.raises(MimeLimitError, match="max_parts exceeded: 3 > 2"):
        list(walk(msg, MimeLimits(max_parts=2)))


@pytest.mark.parametrize("limit", [1, 5000])
def test_max_parts_counts_the_parts_below_the_message(limit: int, tmp_path: Path) -> None:
    """max_parts = N: a multipart/mixed of N parts passes, of N + 1 gets on_limit (the
    message itself is not a part: etc/defang.toml)."""
    cfg = cfg_with(tmp_path, mime_max_parts=limit)
    runner = runner_for(inline_filter(tmp_path, "def filter_part(msg, part):\n    pass\n"), config=cfg)
    assert run(runner, many_parts(limit), tmp_path)["verdict"]["action"] == "continue"
    reply = run(runner, many_parts(limit + 1), tmp_path)
    assert reply["verdict"]["code"] == "554" and reply["verdict"]["dsn"] == "5.6.0"


def test_max_parts_counts_containers_and_files_found_in_text(tmp_path: Path) -> None:
    """Nested containers count, and so do files hidden in a text part (uuencode)."""
    inner = crlf("""
        --b
        Content-Type: multipart/alternative; boundary=c

        --c
        Content-Type: text/plain

        plain
        --c
        Content-Type: text/plain

        begin 644 a.exe
        #35H`
        `
        end
        --c--
        --b--
        """)  # fmt: skip
    raw = crlf("""
        From: a@example.com
        Content-Type: multipart/mixed; boundary="b"

        """) + inner
    # parts: the multipart/alternative, its two text parts, the uuencoded a.exe = 4
    for limit, action in ((4, "continue"), (3, "reject")):
        cfg = cfg_with(tmp_path, mime_max_parts=limit)
        runner = runner_for(inline_filter(tmp_path, "def filter_part(msg, part):\n    pass\n"), config=cfg)
        assert run(runner, raw, tmp_path)["verdict"]["action"] == action, limit


def test_config_sections(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[mime]\nmax_parts = 7\non_limit = { code = "552", dsn = "5.3.4", text = "no" }\n'
                 '[quarantine]\ndir = "q"\nrelease_method = "smtp"\nsmtp_port = 10026\n')  # fmt: skip
    cfg = config.load(p, runtime_dir=str(tmp_path))
    assert cfg.mime_max_parts == 7 and cfg.mime_on_limit.code == "552"
    assert cfg.quarantine_dir == tmp_path / "q"  # relative to the config file
    assert cfg.quarantine_release_method == "smtp" and cfg.quarantine_smtp_port == 10026
    from defang.workers.stores.quarantine import quarantine_dir

    assert quarantine_dir(cfg) == tmp_path / "q"
    assert quarantine_dir(config.load(None, runtime_dir=str(tmp_path))) == tmp_path / "quarantine"
    p.write_text('[quarantine]\nrelease_method = "carrier pigeon"\n')
    with pytest.raises(config.ConfigError, match=r"\[quarantine\] release_method"):
        config.load(p)
    p.write_text("[quarantine]\nsmtp_port = 70000\n")
    with pytest.raises(config.ConfigError, match="smtp_port"):
        config.load(p)
