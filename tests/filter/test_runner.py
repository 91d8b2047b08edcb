"""The worker side of a decision: loading filter.py, the hooks, msg, parts, replies."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from paths import FILTERS
from wiretools import handle, read

from defang.core.verdicts import Verdict, tempfail
from defang.core.wire import ACTIONS, verdict_to_wire
from defang.workers.api import headers as headers_mod
from defang.workers.api.conn import Connection
from defang.workers.api.headers import parse_header_section, read_header_section
from defang.workers.api.message import Message
from defang.workers.loader import HOOK_NAMES, FilterLoadError, check_filter, load_filter
from defang.workers.mime.part import Part
from defang.workers.mime.text import decode_words, raw_param
from defang.workers.runner import BAD_REQUEST, FilterRunner

ON_ERROR = tempfail("Filter error, try again later", "451", "4.3.0")
CONN = {
    "id": 17,
    "ip": "203.0.113.5",
    "hostname": "mx.example.net",
    "port": 40000,
    "helo": "mx.example.net",
    "macros": {"{auth_authen}": "alice", "j": "mx.local"},
    "notes": {},
}


def runner_for(name: str, **kw: Any) -> FilterRunner:
    return FilterRunner(load_filter(str(FILTERS / name)), on_filter_error=ON_ERROR, **kw)


def spool(
    tmp_path: Path, headers: list[tuple[str, str]] | bytes, body: bytes = b"Hello\r\n", name: str = "msg"
) -> Path:
    """Write a message in spool form: header lines, CRLF, body."""
    if isinstance(headers, bytes):
        head = headers
    else:
        head = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    path = tmp_path / name
    path.write_bytes(head + b"\r\n" + body)
    return path


def req(op: str, conn: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"op": op, "conn": conn or CONN, **fields}


def eom(path: Path, conn: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    base = {
        "sender": "alice@example.com",
        "sender_args": ["SIZE=100", "BODY=8BITMIME"],
        "recipients": ["bob@example.org", "carol@example.org"],
        "queue_id": "ABC123",
        "spool": str(path),
        "size": path.stat().st_size,
    }
    base.update(fields)
    return req("eom", conn, **base)


def handled(runner: FilterRunner, request: dict[str, Any]) -> dict[str, Any]:
    reply = handle(runner, request)  # through the wire both ways: every reply must be encodable
    assert set(reply) >= {"verdict", "actions", "notes", "gen"} and reply["op"] == "reply"
    for action in reply["actions"]:
        assert action[0] in ACTIONS and len(action) == ACTIONS[action[0]] + 1, action
    return reply


def action_of(reply: dict[str, Any]) -> str:
    return reply["verdict"]["action"]


def is_filter_error(reply: dict[str, Any]) -> bool:
    return reply["verdict"] == verdict_to_wire(ON_ERROR) and reply["actions"] == [] and "error" in reply


MSG = [
    ("Received", "from a by b; Mon, 1 Jan 2024 00:00:00 +0000"),
    ("Received", "from c by d; Mon, 1 Jan 2024 00:00:01 +0000"),
    ("From", "Alice <alice@example.com>"),
    ("To", "bob@example.org"),
    ("Subject", "=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin"),
    ("X-Test", "headers"),
]


# --- loading -----------------------------------------------------------------------


def test_load_resolves_hooks_and_registers_module() -> None:
    loaded = load_filter(str(FILTERS / "envelope.py"))
    assert set(loaded.hooks) == {"filter_relay", "filter_helo", "filter_sender", "filter_recipient"}
    assert sys.modules["defang_filter"] is loaded.module
    assert loaded.path == str(FILTERS / "envelope.py")
    assert set(loaded.hooks) <= set(HOOK_NAMES)
    assert runner_for("envelope.py").hooks == frozenset(loaded.hooks)


def test_filter_imports_its_own_helper_and_lifecycle_hooks(tmp_path: Path, caplog) -> None:
    runner = runner_for("uses_helper.py")
    runner.initialize()
    assert runner.loaded.module.READY is True
    reply = handled(runner, eom(spool(tmp_path, MSG)))
    assert reply["actions"] == [["add_header", "X-Tag", "helped"]]
    with caplog.at_level(logging.ERROR, logger="defang.worker"):
        runner.cleanup()  # raises inside: logged, swallowed
    assert "filter error in filter_cleanup" in caplog.text
    assert "cleanup failed" in caplog.text


def test_initialize_exception_propagates(tmp_path: Path) -> None:
    path = tmp_path / "boom.py"
    path.write_text("def filter_initialize():\n    raise OSError('no database')\n")
    runner = FilterRunner(load_filter(str(path)), on_filter_error=ON_ERROR)
    with pytest.raises(OSError, match="no database"):
        runner.initialize()


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "filter.py"
    path.write_text('"""doc"""\n\n\ndef filter_end(msg)\n    return None\n')
    with pytest.raises(FilterLoadError) as info:
        load_filter(str(path))
    assert str(info.value) == f"{path}:4: SyntaxError: expected ':'"
    assert check_filter(str(path)) == str(info.value)
    assert "defang_filter" not in sys.modules or sys.modules["defang_filter"].__file__ != str(path)


def test_syntax_error_in_helper_points_at_helper(tmp_path: Path) -> None:
    (tmp_path / "myhelper.py").write_text("x = (\n")
    path = tmp_path / "filter.py"
    path.write_text("import myhelper\n")
    text = check_filter(str(path))
    assert text is not None and text.startswith(f"{tmp_path / 'myhelper.py'}:1: SyntaxError:")


def test_missing_module_points_at_the_import_line() -> None:
    path = FILTERS / "missing_module.py"
    assert check_filter(str(path)) == (
        f"{path}:5: ModuleNotFoundError: No module named 'defang_no_such_module_xyz'"
    )


def test_exception_at_import_uses_deepest_frame_in_filter() -> None:
    path = FILTERS / "raises_at_import.py"
    assert check_filter(str(path)) == f"{path}:7: KeyError: 'missing'"


def test_not_callable_hook_is_a_load_error() -> None:
    path = FILTERS / "not_callable.py"
    assert check_filter(str(path)) == (
        f"{path}:4: TypeError: filter_end is defined but not callable (it is int)"
    )


def test_hook_with_wrong_arity_is_a_load_error() -> None:
    text = check_filter(str(FILTERS / "bad_signature.py"))
    assert text is not None
    assert text.startswith(f"{FILTERS / 'bad_signature.py'}:4: TypeError: filter_sender(conn)")


def test_async_hook_and_missing_file_are_load_errors(tmp_path: Path) -> None:
    path = tmp_path / "filter.py"
    path.write_text("async def filter_end(msg):\n    return None\n")
    assert check_filter(str(path)) == (f"{path}:1: TypeError: filter_end must be a plain def, not async def")
    missing = tmp_path / "nope.py"
    assert check_filter(str(missing)) == f"{missing}: FileNotFoundError: no such filter file"
    assert check_filter(str(FILTERS / "envelope.py")) is None


def test_sys_exit_at_import_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "filter.py"
    path.write_text("import sys\nsys.exit('bye')\n")
    assert check_filter(str(path)) == f"{path}:2: SystemExit: bye"


# --- envelope hooks -------------------------------------------------------------------


def test_envelope_hooks_verdicts_and_notes() -> None:
    runner = runner_for("envelope.py")
    reply = handled(runner, req("connect"))
    assert action_of(reply) == "continue"
    assert reply["actions"] == []
    assert reply["notes"]["relay"] == ["203.0.113.5", "mx.example.net", 40000]

    conn = dict(CONN, notes=reply["notes"], ip="192.0.2.66")
    reply = handled(runner, req("connect", conn))
    assert reply["verdict"] == {"action": "reject", "code": "554", "dsn": "5.7.1", "text": "No mail from you"}

    conn = dict(CONN, helo="bad.example")
    assert handled(runner, req("helo", conn))["verdict"] == {
        "action": "tempfail",
        "code": "451",
        "dsn": "4.7.1",
        "text": "Slow down",
    }

    reply = handled(runner, req("mail", sender="spammer@example.com", args=["SIZE=10"]))
    assert action_of(reply) == "reject"
    assert reply["notes"]["esmtp"] == ["SIZE=10"]
    assert reply["notes"]["auth"] == "alice"
    assert action_of(handled(runner, req("mail", sender="friend@example.com"))) == "accept"
    reply = handled(runner, req("mail", sender="", args=None))
    assert action_of(reply) == "continue" and reply["notes"]["sender"] == ""

    notes = {"rcpts": ["a@example.org"]}
    reply = handled(
        runner,
        req(
            "rcpt",
            dict(CONN, notes=notes),
            sender="x@example.com",
            recipient="nobody@example.org",
            args=["NOTIFY=NEVER"],
        ),
    )
    assert reply["verdict"]["code"] == "550" and reply["verdict"]["dsn"] == "5.1.1"
    assert reply["notes"]["rcpts"] == ["a@example.org", "nobody@example.org"]
    assert reply["notes"]["rcpt_args"] == ["NOTIFY=NEVER"]
    assert action_of(handled(runner, req("rcpt", recipient="trash@example.org"))) == "discard"


def test_undefined_hook_answers_continue_and_echoes_notes(tmp_path: Path) -> None:
    runner = runner_for("end_only.py")
    conn = dict(CONN, notes={"kept": [1, 2]})
    for op in ("connect", "helo", "mail", "rcpt"):
        reply = handled(runner, req(op, conn, sender="a@b", recipient="c@d"))
        assert reply["verdict"] == {"action": "continue", "code": None, "dsn": None, "text": None}
        assert reply["notes"] == {"kept": [1, 2]}


def test_connection_from_request() -> None:
    conn = Connection.from_request(read(req("eom", sender_args=["BODY=8BITMIME"], spool="x")))
    assert (conn.id, conn.ip, conn.hostname, conn.port, conn.helo) == (
        17,
        "203.0.113.5",
        "mx.example.net",
        40000,
        "mx.example.net",
    )
    assert conn.macros["j"] == "mx.local"
    assert conn.esmtp_args == ["BODY=8BITMIME"]
    assert Connection.from_request(read({"op": "connect", "conn": {}})).notes == {}


# --- message hooks and actions ------------------------------------------------------


def test_header_actions(tmp_path: Path) -> None:
    reply = handled(runner_for("actions.py"), eom(spool(tmp_path, MSG)))
    assert action_of(reply) == "continue"
    assert reply["actions"] == [
        ["add_header", "X-Added", "yes"],
        ["insert_header", 0, "X-First", "top"],
        ["change_header", "Subject", "[tagged] Grüße aus Berlin", 1],
        ["delete_header", "Received", 2],
        ["delete_header", "Received", 1],
        ["add_header", "X-Utf8", "Grüße"],
        ["add_header", "X-Folded", "one\r\n\ttwo"],
    ]


def test_envelope_actions(tmp_path: Path) -> None:
    path = spool(tmp_path, [("Subject", "x"), ("X-Test", "envelope")])
    reply = handled(runner_for("actions.py"), eom(path))
    assert reply["actions"] == [
        ["add_recipient", "archive@example.org", None],
        ["add_recipient", "bcc@example.org", "NOTIFY=NEVER"],
        ["delete_recipient", "bob@example.org"],
        ["change_sender", "bounces@example.com", None],
        ["hold", "needs a look"],
    ]
    path = spool(tmp_path, [("X-Test", "null-sender")])
    assert handled(runner_for("actions.py"), eom(path))["actions"] == [["change_sender", "", None]]


@pytest.mark.parametrize(
    ("test", "verdict"),
    [
        ("reject-method", {"action": "reject", "code": "554", "dsn": "5.7.0", "text": "No thanks"}),
        ("tempfail-method", {"action": "tempfail", "code": "451", "dsn": "4.7.1", "text": "Later"}),
        ("discard-method", {"action": "discard", "code": None, "dsn": None, "text": None}),
        ("first-stands", {"action": "reject", "code": "550", "dsn": "5.7.1", "text": "first"}),
        ("return-verdict", {"action": "reject", "code": "550", "dsn": "5.7.1", "text": "Returned"}),
    ],
)
def test_message_verdicts(tmp_path: Path, test: str, verdict: dict[str, Any]) -> None:
    reply = handled(runner_for("actions.py"), eom(spool(tmp_path, [("X-Test", test)])))
    assert reply["verdict"] == verdict


def test_message_fields(tmp_path: Path) -> None:
    path = spool(tmp_path, MSG[:3] + [("X-Test", "info")])
    reply = handled(runner_for("actions.py"), eom(path))
    size = path.stat().st_size
    assert reply["actions"] == [
        ["add_header", "X-Info", f"alice@example.com|bob@example.org,carol@example.org|{size}"],
        ["add_header", "X-Esmtp", "SIZE=100 BODY=8BITMIME"],
        ["add_header", "X-Count", "2"],
    ]


def test_notes_travel_through_message_hooks(tmp_path: Path) -> None:
    path = spool(tmp_path, [("X-Test", "notes")])
    reply = handled(runner_for("actions.py"), eom(path, dict(CONN, notes={"from_relay": 7})))
    assert reply["actions"] == [["add_header", "X-Notes", "7"]]
    assert reply["notes"] == {"from_relay": 7, "from_end": True}


@pytest.mark.parametrize(
    ("test", "complaint"),
    [
        ("bracket-address", "pass the address without angle brackets"),
        ("bad-index", "ValueError: header index must be >= 1, got 0"),
    ],
)
def test_bad_action_arguments_fail_in_the_call(tmp_path: Path, caplog, test: str, complaint: str) -> None:
    with caplog.at_level(logging.ERROR, logger="defang.worker"):
        reply = handled(runner_for("actions.py"), eom(spool(tmp_path, [("X-Test", test)])))
    assert is_filter_error(reply)
    assert complaint in reply["error"]
    assert "actions.py" in caplog.text  # the traceback shows the admin's call


@pytest.mark.parametrize(("test", "action"), [
    ("bad-header-name", ["add_header", "Bad-Name", "x"]),
    ("bad-header-value", ["add_header", "X-Bad", "a\r\n b"]),
])  # fmt: skip
def test_odd_header_text_is_cleaned_not_a_filter_error(tmp_path: Path, caplog, test: str,
                                                       action: list[str]) -> None:  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="defang.filter"):
        reply = handled(runner_for("actions.py"), eom(spool(tmp_path, [("X-Test", test)])))
    assert action_of(reply) == "continue" and "error" not in reply
    assert reply["actions"] == [action]
    assert "header" in caplog.text  # one WARNING says what was cleaned


def test_action_argument_checks() -> None:
    msg = Message(Connection(), sender="", recipients=[], queue_id=None, path="/nonexistent")
    for bad, used in (("", "X-Defang-Unnamed"), ("X:Y", "X-Y"), ("X Y", "X-Y"), ("Ünï", "-n-"),
                      ("X\r\n", "X--")):  # fmt: skip
        msg.add_header(bad, "v")
        assert msg.actions.pop() == ["add_header", used, "v"]
    for bad, folded in (("a\rb", "a\r\n b"), ("a\r\nb", "a\r\n b"), ("a\0b", "ab"), ("a\n", "a"),
                        ("one\n\n\ntwo\r\n\tthree", "one\r\n two\r\n\tthree")):  # fmt: skip
        msg.add_header("X-A", bad)
        assert msg.actions.pop() == ["add_header", "X-A", folded]
    msg.hold("two\nlines")
    assert msg.actions.pop() == ["hold", "two lines"]
    with pytest.raises(TypeError):
        msg.add_header("X-A", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        msg.insert_header(-1, "X-A", "v")
    with pytest.raises(TypeError):
        msg.insert_header(True, "X-A", "v")  # type: ignore[arg-type]
    for bad in ("", "<a@b>", "a@b\r\n", "a\0@b"):
        with pytest.raises(ValueError):
            msg.add_recipient(bad)
    with pytest.raises(ValueError):
        msg.delete_recipient("<a@b>")
    with pytest.raises(ValueError):
        msg.change_sender("<>")
    with pytest.raises(ValueError):
        msg.add_recipient("a@b", "NOTIFY=NEVER\r\nRCPT TO:<c@d>")
    with pytest.raises(ValueError):
        msg.reject("x", code="450")
    msg.add_header("X-A", "folded\r\n continued and ünïcode")
    msg.insert_header(0, "X-B", "")
    assert msg.actions == [
        ["add_header", "X-A", "folded\r\n continued and ünïcode"],
        ["insert_header", 0, "X-B", ""],
    ]


# --- errors in admin code ------------------------------------------------------------


def test_exception_in_hook_gives_on_filter_error_and_logs(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="defang.worker"):
        reply = handled(runner_for("errors.py"), eom(spool(tmp_path, MSG)))
    assert is_filter_error(reply)
    assert reply["error"] == "filter error in filter_end: ZeroDivisionError: division by zero"
    record = caplog.records[-1]
    assert record.name == "defang.worker" and record.levelno == logging.ERROR
    text = record.getMessage()
    assert text.startswith("filter error in filter_end (queue ABC123, conn 17): Traceback")
    assert "errors.py" in text and "1 / 0" in text
    assert "runner.py" not in text  # only the admin's frames


def test_exception_in_envelope_hook_logs_without_queue(caplog) -> None:
    conn = dict(CONN, ip="198.51.100.5", notes={"before": 1})
    with caplog.at_level(logging.ERROR, logger="defang.worker"):
        reply = handled(runner_for("errors.py"), req("connect", conn))
    assert is_filter_error(reply)
    assert reply["notes"] == {"before": 1}  # the half-done edit is dropped
    assert "filter error in filter_relay (conn 17): Traceback" in caplog.text
    conn = dict(CONN, macros={"i": "QID9"})
    with caplog.at_level(logging.ERROR, logger="defang.worker"):
        handled(runner_for("errors.py"), req("rcpt", conn, recipient="x@y"))
    assert "filter error in filter_recipient (queue QID9, conn 17)" in caplog.text


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("helo", "filter_helo returned True; expected a verdict (accept(), reject(...)"),
        ("mail", "filter_sender returned 42; expected a verdict (accept(), reject(...)"),
        ("rcpt", "SystemExit: 3"),
    ],
)
def test_bad_return_or_exit(op: str, message: str) -> None:
    reply = handled(runner_for("errors.py"), req(op, sender="a@b", recipient="c@d"))
    assert is_filter_error(reply)
    assert message in reply["error"]


def test_message_hook_returning_garbage(tmp_path: Path) -> None:
    reply = handled(runner_for("errors.py"), eom(spool(tmp_path, [("X-Test", "return-string")])))
    assert is_filter_error(reply)
    assert reply["error"] == (
        "filter error in filter_end: filter_end returned 'reject'; "
        "expected a verdict (accept(), reject(...), tempfail(...), "
        "discard()) or None"
    )


@pytest.mark.parametrize(
    ("ip", "message"),
    [
        ("198.51.100.1", "conn.notes is not JSON-safe"),
        ("198.51.100.2", "conn.notes is 100016 bytes as JSON; the limit is 65536"),
        ("198.51.100.3", "conn.notes is not JSON-safe: Out of range float values"),
        ("198.51.100.4", "conn.notes must be a dict, not list"),
    ],
)
def test_unserialisable_notes(ip: str, message: str) -> None:
    conn = dict(CONN, ip=ip, notes={"x": 1})
    reply = handled(runner_for("errors.py"), req("connect", conn))
    assert is_filter_error(reply)
    assert message in reply["error"]
    assert reply["notes"] == {"x": 1}


def test_notes_limit_is_configurable() -> None:
    conn = dict(CONN, ip="198.51.100.2")
    reply = handled(runner_for("errors.py", max_notes_bytes=200_000), req("connect", conn))
    assert action_of(reply) == "continue" and len(reply["notes"]["big"]) == 100_000


def test_bad_requests_get_a_tempfail_not_an_exception() -> None:
    runner = runner_for("actions.py")
    for request in ({"op": "eom", "conn": CONN}, {"op": "bogus"}, {}, "garbage", {"op": "hello"}):
        reply = handle(runner, request)
        assert reply["verdict"] == verdict_to_wire(BAD_REQUEST)
        assert reply["error"].startswith("bad request")


def test_missing_spool_is_a_filter_error_in_the_hook(tmp_path: Path) -> None:
    reply = handled(runner_for("actions.py"), eom(spool(tmp_path, MSG), spool=str(tmp_path / "x")))
    assert is_filter_error(reply) and "FileNotFoundError" in reply["error"]


def test_on_filter_error_must_be_a_verdict() -> None:
    with pytest.raises(TypeError):
        FilterRunner(load_filter(str(FILTERS / "end_only.py")), on_filter_error="tempfail")  # type: ignore[arg-type]
    runner = FilterRunner(load_filter(str(FILTERS / "errors.py")), on_filter_error=Verdict("accept"))
    assert action_of(handle(runner, req("mail", sender="a@b"))) == "accept"


# --- headers --------------------------------------------------------------------------


def test_headers_unfolded_and_decoded(tmp_path: Path) -> None:
    head = (
        b"Subject: =?iso-8859-1?q?Gr=FC=DFe?=\r\n =?utf-8?b?w6TDtsO8?= end\r\n"
        b"X-Folded: one\r\n\ttwo\r\n  three  \r\n"
        b"X-Latin1: Fr\xf6sche\r\n"
        b"X-Utf8: Gr\xc3\xbc\xc3\x9fe\r\n"
        b"x-folded: second\r\n"
        b"Empty:\r\n"
        b"Obsolete : spaced\r\n"
    )
    path = spool(tmp_path, head, b"body\r\n\r\nmore\r\n")
    msg = Message(Connection(), sender="", recipients=[], queue_id="Q", path=str(path))
    assert msg.headers == [
        ("Subject", "=?iso-8859-1?q?Gr=FC=DFe?= =?utf-8?b?w6TDtsO8?= end"),
        ("X-Folded", "one\ttwo  three"),
        ("X-Latin1", "Frösche"),
        ("X-Utf8", "Grüße"),
        ("x-folded", "second"),
        ("Empty", ""),
        ("Obsolete", "spaced"),
    ]
    assert msg.subject == "Grüßeäöü end"
    assert msg.get_header("X-FOLDED") == "one\ttwo  three"
    assert msg.get_all_headers("x-folded") == ["one\ttwo  three", "second"]
    assert msg.get_header("Missing") is None and msg.get_header("Missing", "d") == "d"
    assert msg.raw_headers[1] == ("X-Folded", b"one\r\n\ttwo\r\n  three  ")
    assert msg.size == path.stat().st_size
    assert msg.email["X-Utf8"] == "Grüße"


def test_subject_absent_and_header_section_edge_cases(tmp_path: Path) -> None:
    path = spool(tmp_path, b"")
    msg = Message(Connection(), sender="", recipients=[], queue_id=None, path=str(path))
    assert msg.headers == [] and msg.subject == ""
    path.write_bytes(b"A: 1\nB: 2\n\nbody\n")  # LF-only is accepted
    assert read_header_section(str(path)) == b"A: 1\nB: 2"
    headers, defects = parse_header_section(b" orphan\r\nno colon here\r\nA: 1")
    assert headers == [("A", b"1")] and len(defects) == 2


def test_reading_headers_reads_only_the_header_section(tmp_path: Path, monkeypatch) -> None:
    big = spool(tmp_path, MSG, b"x" * 5_000_000 + b"\r\n")
    read: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            data = self.f.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(headers_mod, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    reply = handled(runner_for("end_only.py"), eom(big))
    assert reply["actions"] == [["add_header", "X-Filtered-By", "defang"]]
    assert 0 < sum(read) <= 64 * 1024


def test_header_section_longer_than_one_read(tmp_path: Path) -> None:
    head = b"".join(b"X-Long-%d: %s\r\n" % (i, b"v" * 200) for i in range(200))
    path = spool(tmp_path, head, b"body")
    assert read_header_section(str(path)) == head[:-2]


def test_no_part_hooks_no_parse(tmp_path: Path, monkeypatch) -> None:
    def boom(self: Message) -> None:
        raise AssertionError("the message was parsed")

    monkeypatch.setattr(Message, "email", property(boom))
    reply = handled(runner_for("end_only.py"), eom(spool(tmp_path, [("Subject", "Viagra!")])))
    assert action_of(reply) == "reject"


# --- parts ------------------------------------------------------------------------------

MIXED = b"""Content-Type: multipart/mixed; boundary="outer"\r
Subject: parts\r
\r
preamble\r
--outer\r
Content-Type: multipart/alternative; boundary="inner"\r
\r
--inner\r
Content-Type: text/plain; charset=ISO-8859-1\r
Content-Transfer-Encoding: quoted-printable\r
\r
Gr=FC=DFe\r
--inner\r
Content-Type: text/html; charset=utf-8\r
\r
<p>hi</p>\r
--inner--\r
--outer\r
Content-Type: application/octet-stream; name="=?utf-8?b?UmVjaG51bmdfTcOkcnouZXhl?="\r
Content-Disposition: attachment\r
Content-Transfer-Encoding: base64\r
\r
TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAA\r
--outer\r
Content-Type: message/rfc822\r
\r
Subject: inner\r
Content-Type: text/plain\r
Content-Disposition: attachment; filename*=utf-8''na%C3%AFve.txt\r
\r
inner body\r
--outer--\r
"""


def _split(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n", body


def test_part_walk_order_and_fields(tmp_path: Path) -> None:
    head, body = _split(MIXED)
    runner = runner_for("parts_record.py")
    reply = handled(runner, eom(spool(tmp_path, head, body)))
    calls = runner.loaded.module.CALLS
    kinds = [(kind, p.content_type, p.depth) if p else (kind,) for kind, p in calls]
    assert kinds == [
        ("begin",),
        ("multipart", "multipart/mixed", 0),
        ("multipart", "multipart/alternative", 1),
        ("part", "text/plain", 2),
        ("part", "text/html", 2),
        ("part", "application/octet-stream", 1),
        ("multipart", "message/rfc822", 1),
        ("part", "text/plain", 2),
        ("end",),
    ]
    parts: list[Part] = [p for _, p in calls if p is not None]
    text, html, exe, inner = parts[2], parts[3], parts[4], parts[6]
    assert (text.charset, text.payload, text.size, text.filename) == (
        "iso-8859-1",
        "Grüße".encode("latin-1"),
        5,
        None,
    )
    assert html.payload == b"<p>hi</p>" and html.disposition is None
    assert exe.filename == "Rechnung_März.exe" and exe.disposition == "attachment"
    assert exe.payload.startswith(b"MZ")
    assert inner.filename == "naïve.txt" and inner.payload == b"inner body"
    assert parts[0].is_multipart and parts[0].payload == b"" and parts[0].size == 0
    assert reply["verdict"]["action"] == "reject"
    assert reply["verdict"]["text"] == "No executables (Rechnung_März.exe)"


def test_walk_decodes_no_attachment_unless_asked(tmp_path: Path, monkeypatch) -> None:
    decoded: list[Part] = []
    real = Part._decode

    def counting(self: Part) -> bytes:
        decoded.append(self)
        return real(self)

    monkeypatch.setattr(Part, "_decode", counting)
    head, body = _split(MIXED)
    runner = runner_for("names_only.py")
    handled(runner, eom(spool(tmp_path, head, body)))
    # only the inline text/plain body, searched for files hidden in it (mime.embedded)
    assert [(p.content_type, p.is_attachment) for p in decoded] == [("text/plain", False)]
    assert ("application/octet-stream", "Rechnung_März.exe", "attachment") in runner.loaded.module.NAMES


def test_single_part_message_is_one_leaf(tmp_path: Path) -> None:
    runner = runner_for("parts_record.py")
    handled(runner, eom(spool(tmp_path, [("Subject", "plain")], b"just text\r\n")))
    calls = runner.loaded.module.CALLS
    assert [k for k, _ in calls] == ["begin", "part", "end"]
    assert calls[1][1].content_type == "text/plain" and calls[1][1].depth == 0


HIDDEN = b"""Content-Type: multipart/mixed; boundary="B"\r
\r
--B\r
Content-Type: multipart/alternative; boundary="B"\r
\r
--B\r
Content-Type: text/plain\r
\r
hello\r
--B--\r
\r
--B\r
Content-Type: application/zip; name="invoice.zip"\r
Content-Transfer-Encoding: base64\r
\r
UEsDBAo=\r
--B--\r
"""

UNQUOTED = b"""Content-Type: text/plain; charset="US-ASCII"; name==?koi8-r?B?89DJ08/LLmRvYw==?=\r
Content-Disposition: attachment; filename==?koi8-r?B?89DJ08/LLmRvYw==?=\r
\r
text\r
"""

B64_RFC822 = b"""Content-Type: multipart/mixed; boundary="b"\r
\r
--b\r
Content-Type: message/rfc822\r
Content-Transfer-Encoding: base64\r
\r
U3ViamVjdDogaGlkZGVuDQpDb250ZW50LVR5cGU6IGFwcGxpY2F0aW9uL29jdGV0LXN0cmVhbTsg\r
bmFtZT0ic2V0dXAuZXhlIg0KDQpNWg0K\r
--b--\r
"""


def test_part_hidden_in_epilogue_is_walked(tmp_path: Path) -> None:
    runner = runner_for("parts_record.py")
    head, body = _split(HIDDEN)
    handled(runner, eom(spool(tmp_path, head, body)))
    leaves = [p for k, p in runner.loaded.module.CALLS if k == "part"]
    # the stdlib closes the inner multipart at once: it is an empty leaf, its parts
    # become siblings, and the zip after the shared close delimiter is in the epilogue
    assert [p.content_type for p in leaves] == ["multipart/alternative", "text/plain", "application/zip"]
    zip_part = leaves[2]
    assert zip_part.filename == "invoice.zip" and zip_part.payload.startswith(b"PK")
    assert any("close delimiter" in d for d in zip_part.defects)


def test_unquoted_encoded_word_filename(tmp_path: Path) -> None:
    runner = runner_for("parts_record.py")
    head, body = _split(UNQUOTED)
    handled(runner, eom(spool(tmp_path, head, body)))
    part = runner.loaded.module.CALLS[1][1]
    assert part.filename == "Список.doc"
    assert any("lenient parser" in d for d in part.defects)


def test_base64_encoded_rfc822_is_decoded_and_walked(tmp_path: Path) -> None:
    runner = runner_for("parts_record.py")
    head, body = _split(B64_RFC822)
    reply = handled(runner, eom(spool(tmp_path, head, body)))
    calls = [(k, p.content_type, p.filename) for k, p in runner.loaded.module.CALLS if p]
    assert calls[-1] == ("part", "application/octet-stream", "setup.exe")
    assert reply["verdict"]["text"] == "No executables (setup.exe)"
    container = runner.loaded.module.CALLS[2][1]
    assert container.content_type == "message/rfc822"
    assert any("decoded and walked" in d for d in container.defects)


def test_bad_base64_and_unknown_charset_never_raise(tmp_path: Path) -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain; charset=fakescii\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename*=fakescii''a%E9.txt\r\n\r\n"
        b"aGVsbG8*gd29ybGQ\r\n--b--\r\n"
    )
    runner = runner_for("every_hook.py")
    head, body = _split(raw)
    reply = handled(runner, eom(spool(tmp_path, head, body)))
    assert action_of(reply) == "continue"
    seen = runner.loaded.module.SEEN[-1]
    assert seen[1:4] == ("text/plain", "aé.txt", len(seen[4]))
    assert seen[4].startswith(b"hello")
    assert seen[5] == "fakescii" and seen[6] == "attachment"


def test_content_type_without_semicolon(tmp_path: Path) -> None:
    raw = (
        b'Content-Type: application/PDF name="Invoice_3.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"
    )
    runner = runner_for("parts_record.py")
    head, body = _split(raw)
    handled(runner, eom(spool(tmp_path, head, body)))
    part = runner.loaded.module.CALLS[1][1]
    assert (part.content_type, part.filename, part.payload) == ("application/pdf", "Invoice_3.pdf", b"%PDF-")
    assert any("read as 'application/pdf'" in d for d in part.defects)


def test_filename_helpers() -> None:
    assert raw_param('attachment; filename="a \\"b\\".txt"', "filename") == 'a "b".txt'
    assert raw_param("attachment; filename*0*=utf-8''%C3%A4; filename*1=b.txt", "filename") == "äb.txt"
    assert raw_param("attachment; filename=plain.txt; size=3", "filename") == "plain.txt"
    assert raw_param("attachment; filename=\udcf6.txt", "filename") == "ö.txt"
    assert raw_param("inline", "filename") is None
    assert decode_words("=?utf-8?b?w6Q?= =?utf-8?b?w7Y=?=") == "äö"  # split, bad padding
    assert decode_words("=?utf-8?B?4oI=?= =?utf-8?B?rA==?=") == "€"  # one char in two words
    assert decode_words("=?x-nonexistent?q?caf=E9?=") == "café"
    assert decode_words("a =?utf-8?q?b?= c") == "a b c"
    assert decode_words("not =? an encoded word") == "not =? an encoded word"


# --- the helpers' old address ------------------------------------------------------------


def test_the_old_helpers_import_works_and_warns_at_the_filter_s_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "workers.helpers", raising=False)  # as in a fresh zygote
    loaded = load_filter(str(FILTERS / "old_helpers_import.py"))
    import defang

    assert loaded.module.DANGEROUS_EXTENSIONS is defang.DANGEROUS_EXTENSIONS
    (warning,) = loaded.warnings
    where = FILTERS / "old_helpers_import.py"
    assert warning.startswith(f"{where}:3: DeprecationWarning: workers.helpers is deprecated")
    assert "from defang import DANGEROUS_EXTENSIONS" in warning
    head = [("MIME-Version", "1.0"), ("Content-Type", "multipart/mixed; boundary=b")]
    body = b"--b\r\nContent-Type: application/octet-stream; name=x.exe\r\n\r\nMZ\r\n--b--\r\n"
    reply = handled(runner_for("old_helpers_import.py"), eom(spool(tmp_path, head, body)))
    assert action_of(reply) == "reject"


def test_other_old_worker_modules_are_a_clear_load_error(tmp_path: Path) -> None:
    f = tmp_path / "filter.py"
    f.write_text("from workers.parts import Part\n")
    error = check_filter(str(f))
    assert error is not None and error.startswith(f"{f}:1: ImportError: no module named 'workers.parts'")
    assert "a filter imports what it needs from defang" in error


# --- which verdict wins, monitor mode, tags -------------------------------------------------

DECIDING = '''
from defang import accept, reject
SEEN = []

def filter_begin(msg):
    SEEN.clear()
    SEEN.append("begin")
    if msg.get_header("X-Begin") == "accept":
        msg.add_header("X-Before", "1")
        msg.accept()
        msg.add_header("X-After-Accept", "1")  # the same hook goes on: kept

def filter_part(msg, part):
    SEEN.append(f"part {part.index}")
    what = msg.get_header("X-Part")
    if what == "reject" and part.index == 1:
        msg.reject("bad part")
        return accept()  # ignored: the first decision stands
    if what == "monitor":
        msg.reject(f"would reject part {part.index}", monitor=True)
        part.drop(monitor=True)
        msg.tag("part_rule")

def filter_end(msg):
    SEEN.append("end")
    msg.add_header("X-End", "1")
'''
MULTI = (b"--b\r\nContent-Type: text/plain\r\n\r\none\r\n"
         b"--b\r\nContent-Type: text/plain\r\n\r\ntwo\r\n--b--\r\n")
MULTI_HEAD = [("MIME-Version", "1.0"), ("Content-Type", "multipart/mixed; boundary=b")]


def deciding(tmp_path: Path, **kw: Any) -> FilterRunner:
    f = tmp_path / "deciding.py"
    f.write_text(DECIDING)
    return FilterRunner(load_filter(str(f)), on_filter_error=ON_ERROR, **kw)


def test_the_first_decision_stands_and_no_later_hook_runs(tmp_path: Path, caplog) -> None:
    runner = deciding(tmp_path)
    reply = handled(runner, eom(spool(tmp_path, [*MULTI_HEAD, ("X-Part", "reject")], MULTI)))
    assert reply["verdict"]["text"] == "bad part" and reply["actions"] == []
    assert runner.loaded.module.SEEN == ["begin", "part 1"]  # part 2 and filter_end never ran
    assert ("filter_part, part 1: accept ignored: the message was decided already (reject 550 5.7.1 "
            "bad part in filter_part, part 1)") in caplog.text


def test_accept_ends_the_filtering_and_keeps_the_actions(tmp_path: Path) -> None:
    runner = deciding(tmp_path)
    reply = handled(runner, eom(spool(tmp_path, [*MULTI_HEAD, ("X-Begin", "accept")], MULTI)))
    assert action_of(reply) == "accept"
    assert reply["actions"] == [["add_header", "X-Before", "1"], ["add_header", "X-After-Accept", "1"]]
    assert runner.loaded.module.SEEN == ["begin"]


def test_monitored_refusals_are_noted_not_carried_out(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="defang.filter")
    runner = deciding(tmp_path)
    reply = handled(runner, eom(spool(tmp_path, [*MULTI_HEAD, ("X-Part", "monitor")], MULTI)))
    assert action_of(reply) == "continue" and reply["actions"] == [["add_header", "X-End", "1"]]
    assert reply["would"] == ["reject 550 5.7.1 would reject part 1 (filter_part, part 1)",
                              "drop part 1 - (filter_part, part 1)",
                              "reject 550 5.7.1 would reject part 2 (filter_part, part 2)",
                              "drop part 2 - (filter_part, part 2)"]  # fmt: skip
    assert reply["tags"] == ["part_rule"]
    assert "ABC123: monitor: would drop part 2 - (filter_part, part 2)" in caplog.text


def test_mode_monitor_notes_every_refusal(tmp_path: Path) -> None:
    from defang.core import config

    cfg = config.finish(config.Config(runtime_dir=tmp_path, filter_mode="monitor"))
    runner = FilterRunner(load_filter(str(FILTERS / "envelope.py")), on_filter_error=ON_ERROR, config=cfg)
    reply = handled(runner, req("connect", dict(CONN, ip="192.0.2.66")))
    assert action_of(reply) == "continue"
    assert reply["would"] == ["reject 554 5.7.1 No mail from you (filter_relay)"]
    runner = deciding(tmp_path, config=cfg)
    reply = handled(runner, eom(spool(tmp_path, [*MULTI_HEAD, ("X-Part", "reject")], MULTI)))
    # the reject only noted, the accept() the hook returned after it decides
    assert reply["would"] == ["reject 550 5.7.1 bad part (filter_part, part 1)"]
    assert action_of(reply) == "accept" and runner.loaded.module.SEEN == ["begin", "part 1"]


def test_reply_text_with_cr_or_nul_is_cleaned_not_a_filter_error(caplog) -> None:
    from defang import reject as make_reject

    v = make_reject("Subject was: hi\r\n250 OK\0" + "x" * 1000)
    assert "\r" not in v.text and "\0" not in v.text and len(v.text.split("\n")[0]) <= 400
    assert "reply text cleaned" in caplog.text


def test_delete_recipient_matches_the_domain_without_case(tmp_path: Path, caplog) -> None:
    f = tmp_path / "f.py"
    f.write_text("def filter_end(msg):\n    msg.delete_recipient('Bob@EXAMPLE.org')\n"
                 "    msg.delete_recipient('nobody@example.org')\n")  # fmt: skip
    reply = handled(FilterRunner(load_filter(str(f)), on_filter_error=ON_ERROR), eom(spool(tmp_path, MSG)))
    assert reply["actions"] == []  # the local part is exact: Bob is not bob
    f.write_text("def filter_end(msg):\n    msg.delete_recipient('bob@EXAMPLE.ORG')\n")
    reply = handled(FilterRunner(load_filter(str(f)), on_filter_error=ON_ERROR), eom(spool(tmp_path, MSG)))
    assert reply["actions"] == [["delete_recipient", "bob@example.org"]]  # the envelope's spelling
    assert "delete_recipient('nobody@example.org'): no such recipient in the envelope" in caplog.text
