"""The quarantine store (atomic layout) and ``defang quarantine list|show|release|delete``."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from test_mime_rewrite import crlf, inline_filter, rebuilt, run, runner_for

from defang.cli import main as cli
from defang.core import config
from defang.workers.stores import quarantine as qmod
from defang.workers.stores.quarantine import ID_RE, QuarantineError, QuarantineStore

MESSAGE = crlf("""
    Received: from client.example (client.example [192.0.2.1]) by mx.example
    From: Alice <alice@example.com>
    To: bob@example.org
    Subject: =?utf-8?q?Rechnung_f=C3=BCr_Bob?=
    Content-Type: multipart/mixed; boundary="b"

    --b
    Content-Type: text/plain

    Please pay.
    --b
    Content-Type: application/x-msdownload; name="invoice.pdf.exe"
    Content-Disposition: attachment; filename="invoice.pdf.exe"
    Content-Transfer-Encoding: base64

    TVqQAAMAAAAEAAAA
    --b--
    """)

QUARANTINING = """
    IDS = []
    def filter_part(msg, part):
        if part.has_extension(["exe"]):
            IDS.append(part.quarantine(f"executable {part.safe_filename}"))
            part.replace("removed", filename="removed.txt")
    def filter_end(msg):
        if msg.quarantine_id:
            IDS.append(msg.quarantine("whole message kept too"))
    """


def make_config(tmp_path: Path, **quarantine: object) -> Path:
    lines = ["[quarantine]", f'dir = "{tmp_path / "q"}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in quarantine.items()]
    path = tmp_path / "defang.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def quarantine_one(tmp_path: Path, code: str = QUARANTINING) -> tuple[dict, QuarantineStore, object]:
    cfg = config.load(make_config(tmp_path), runtime_dir=str(tmp_path / "run"))
    runner = runner_for(inline_filter(tmp_path, code), config=cfg)
    rcpts = ("bob@example.org", "carol@example.org")
    reply = run(runner, MESSAGE, tmp_path, queue_id="4QID1", recipients=rcpts)
    return reply, runner.quarantine_store, runner.loaded.module


def test_layout_and_metadata(tmp_path: Path) -> None:
    reply, store, module = quarantine_one(tmp_path)
    assert "error" not in reply and rebuilt(reply, tmp_path) is not None
    qid = module.IDS[0]
    assert module.IDS == [qid, qid], "one message, one entry"
    assert ID_RE.match(qid)
    entry = tmp_path / "q" / qid[:4] / qid[4:6] / qid[6:8] / qid
    assert sorted(os.listdir(entry)) == ["message.eml", "meta.json", "part-2.bin"]
    assert not [n for n in os.listdir(entry.parent) if n.startswith(".")], "no temporary left"
    spooled = (tmp_path / "spool" / "message").read_bytes()
    assert (entry / "message.eml").read_bytes() == spooled, "the original, not the rewritten message"
    assert (entry / "part-2.bin").read_bytes() == bytes.fromhex("4d5a90000300000004000000")
    meta = json.loads((entry / "meta.json").read_text())
    assert meta == store.get(qid)
    assert meta["id"] == qid and meta["queue_id"] == "4QID1" and meta["version"] == 1
    assert meta["sender"] == "alice@example.com"
    assert meta["recipients"] == ["bob@example.org", "carol@example.org"]
    assert meta["conn"] == {"id": 7, "ip": "192.0.2.1", "hostname": "client.example", "port": 40000,
                            "helo": "client.example"}  # fmt: skip
    assert meta["reasons"] == ["part 2: executable invoice.pdf.exe", "whole message kept too"]
    assert meta["whole_message"] is True and meta["subject"] == "Rechnung für Bob"
    assert meta["message"] == {"file": "message.eml", "size": len(spooled),
                               "sha256": hashlib.sha256(spooled).hexdigest()}  # fmt: skip
    assert meta["parts"] == [{"index": 2, "file": "part-2.bin", "content_type": "application/x-msdownload",
                              "filename": "invoice.pdf.exe", "size": 12,
                              "sha256": hashlib.sha256(bytes.fromhex("4d5a90000300000004000000")).hexdigest(),
                              "reason": "executable invoice.pdf.exe"}]  # fmt: skip
    assert ["Subject", "=?utf-8?q?Rechnung_f=C3=BCr_Bob?="] in meta["headers"]
    assert meta["time"].startswith(qid[:4] + "-" + qid[4:6]) and meta["releases"] == []
    # owner and group only
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700  # they hold mail: the daemons' user only
    assert stat.S_IMODE((entry / "message.eml").stat().st_mode) == 0o600


def test_nothing_is_written_when_the_filter_fails(tmp_path: Path) -> None:
    failing = QUARANTINING + "\n    def filter_end(msg):\n        raise RuntimeError('late')\n"
    reply, store, _ = quarantine_one(tmp_path, failing)
    assert reply["verdict"]["code"] == "451" and "late" in reply["error"]
    assert store.ids() == [], "the sender retries; a second entry would be a duplicate"


def test_a_failed_write_leaves_no_entry_and_tempfails(tmp_path: Path, monkeypatch) -> None:
    real = qmod._write_file

    def failing(path, chunks):
        if path.name == "meta.json":
            raise OSError(28, "No space left on device")
        return real(path, chunks)

    monkeypatch.setattr(qmod, "_write_file", failing)
    reply, store, _ = quarantine_one(tmp_path)
    assert reply["verdict"]["action"] == "tempfail" and reply["actions"] == []
    assert "No space left on device" in reply["error"]
    assert store.ids() == []
    day_dirs = [d for d in (tmp_path / "q").rglob("*") if d.is_dir()]
    assert all(not d.name.startswith(".tmp-") for d in day_dirs), "the temporary directory is removed"


def test_a_leftover_temporary_is_not_an_entry(tmp_path: Path) -> None:
    _, store, module = quarantine_one(tmp_path)
    qid = module.IDS[0]
    (store.entry_dir(qid).parent / f".tmp-{qid[:-1]}0").mkdir()  # what a crash would leave
    assert store.ids() == [qid]


def test_ids_never_name_paths_outside_the_store(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path)
    for bad in ("../../etc/passwd", "20261121T132001Z-ab12cd/../x", "", "20261121T132001Z-AB12CD"):
        with pytest.raises(QuarantineError, match="is not a quarantine ID"):
            store.entry_dir(bad)


# --- the command line -------------------------------------------------------------------------


def fake_sendmail(tmp_path: Path, exit_code: int = 0) -> Path:
    script = tmp_path / "sendmail"
    script.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > "{tmp_path}/sendmail.argv"
cat > "{tmp_path}/sendmail.stdin"
echo "sendmail: simulated status {exit_code}" >&2
exit {exit_code}
""")
    script.chmod(0o755)
    return script


def defang(tmp_path: Path, capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["quarantine", *args, "--config", str(tmp_path / "defang.toml"),
                   "--runtime-dir", str(tmp_path / "run")])  # fmt: skip
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_list_show_release_delete(tmp_path: Path, capsys) -> None:
    _, store, module = quarantine_one(tmp_path)
    qid = module.IDS[0]
    make_config(tmp_path, sendmail_path=str(fake_sendmail(tmp_path)))

    rc, out, _ = defang(tmp_path, capsys, "list")
    assert rc == 0 and qid in out and "alice@example.com" in out and "part 2: executable" in out
    rc, out, _ = defang(tmp_path, capsys, "list", "--json")
    assert rc == 0 and [e["id"] for e in json.loads(out)] == [qid]

    rc, out, _ = defang(tmp_path, capsys, "show", qid)
    assert rc == 0 and "queue id:   4QID1" in out and "client:     client.example [192.0.2.1]" in out
    assert "part:       part-2.bin application/x-msdownload 'invoice.pdf.exe' (12 bytes)" in out
    rc, out, _ = defang(tmp_path, capsys, "show", qid, "--json")
    assert json.loads(out) == store.get(qid)

    rc, out, _ = defang(tmp_path, capsys, "release", qid)
    assert rc == 0 and out.startswith(f"released {qid} via {tmp_path / 'sendmail'} to bob@example.org")
    argv = (tmp_path / "sendmail.argv").read_text().splitlines()
    assert argv == ["-i", "-f", "alice@example.com", "--", "bob@example.org", "carol@example.org"]
    assert (tmp_path / "sendmail.stdin").read_bytes() == store.message_path(qid).read_bytes()

    rc, out, _ = defang(tmp_path, capsys, "release", qid, "--to", "admin@example.org", "--to=-x@y", "--json")
    assert rc == 0 and json.loads(out)["released"]["recipients"] == ["admin@example.org", "-x@y"]
    assert (tmp_path / "sendmail.argv").read_text().splitlines()[-3:] == ["--", "admin@example.org", "-x@y"]
    assert len(store.get(qid)["releases"]) == 2
    rc, out, _ = defang(tmp_path, capsys, "show", qid)
    assert "released:   " in out and "to admin@example.org, -x@y" in out

    rc, out, _ = defang(tmp_path, capsys, "delete", qid, "--json")
    assert rc == 0 and json.loads(out) == {"id": qid, "deleted": True}
    assert store.ids() == [] and not store.entry_dir(qid).exists()
    rc, out, err = defang(tmp_path, capsys, "delete", qid)
    assert rc == 1 and "no quarantine entry" in err
    rc, out, _ = defang(tmp_path, capsys, "list")
    assert rc == 0 and out.startswith("no quarantined messages in")


def test_cli_release_failure_is_reported_and_not_recorded(tmp_path: Path, capsys) -> None:
    _, store, module = quarantine_one(tmp_path)
    qid = module.IDS[0]
    make_config(tmp_path, sendmail_path=str(fake_sendmail(tmp_path, exit_code=75)))
    rc, _, err = defang(tmp_path, capsys, "release", qid)
    assert rc == 1 and "exited 75: sendmail: simulated status 75" in err
    rc, out, _ = defang(tmp_path, capsys, "release", qid, "--json")
    assert rc == 1 and "exited 75" in json.loads(out)["error"]
    assert store.get(qid)["releases"] == []
    rc, _, err = defang(tmp_path, capsys, "show", "not-an-id")
    assert rc == 1 and "is not a quarantine ID" in err


class TinySMTP(threading.Thread):
    """Just enough SMTP to receive one message."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.envelope: list[str] = []
        self.data = b""

    def run(self) -> None:
        conn, _ = self.sock.accept()
        f = conn.makefile("rwb")
        f.write(b"220 tiny ESMTP\r\n")
        f.flush()
        while line := f.readline():
            cmd = line.decode().strip()
            if cmd.upper().startswith("EHLO"):
                f.write(b"250-tiny\r\n250 8BITMIME\r\n")
            elif cmd.upper() == "DATA":
                f.write(b"354 go\r\n")
                f.flush()
                chunks = []
                while (chunk := f.readline()) != b".\r\n":
                    chunks.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                self.data = b"".join(chunks)
                f.write(b"250 queued\r\n")
            elif cmd.upper() == "QUIT":
                f.write(b"221 bye\r\n")
                f.flush()
                break
            else:
                self.envelope.append(cmd)
                f.write(b"250 ok\r\n")
            f.flush()
        conn.close()
        self.sock.close()


def test_release_over_smtp(tmp_path: Path, capsys) -> None:
    _, store, module = quarantine_one(tmp_path)
    qid = module.IDS[0]
    server = TinySMTP()
    server.start()
    make_config(tmp_path, release_method="smtp", smtp_host="127.0.0.1", smtp_port=server.port)
    rc, out, err = defang(tmp_path, capsys, "release", qid)
    server.join(10)
    assert rc == 0, err
    via = f"smtp:127.0.0.1:{server.port}"
    assert out.strip() == f"released {qid} via {via} to bob@example.org, carol@example.org"
    assert [c.upper() for c in server.envelope] == [
        "MAIL FROM:<ALICE@EXAMPLE.COM>", "RCPT TO:<BOB@EXAMPLE.ORG>", "RCPT TO:<CAROL@EXAMPLE.ORG>",
    ]
    assert server.data == store.message_path(qid).read_bytes()


def test_null_sender_is_released_as_null_sender(tmp_path: Path, capsys) -> None:
    cfg = config.load(make_config(tmp_path, sendmail_path=str(fake_sendmail(tmp_path))),
                      runtime_dir=str(tmp_path / "run"))  # fmt: skip
    runner = runner_for(inline_filter(tmp_path, "def filter_end(msg):\n    msg.quarantine('bounce')\n"),
                        config=cfg)  # fmt: skip
    spool = tmp_path / "spool"
    reply = run(runner, MESSAGE, tmp_path)
    assert "error" not in reply and spool.exists()
    (qid,) = runner.quarantine_store.ids()
    meta_path = runner.quarantine_store.entry_dir(qid) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sender"] = ""
    meta_path.write_text(json.dumps(meta))
    rc, _, err = defang(tmp_path, capsys, "release", qid)
    assert rc == 0, err
    assert (tmp_path / "sendmail.argv").read_text().splitlines()[:3] == ["-i", "-f", "<>"]


def many_exes(n: int) -> bytes:
    parts = "".join(f"""--b
    Content-Type: application/x-msdownload; name="f{i}.exe"
    Content-Disposition: attachment; filename="f{i}.exe"
    Content-Transfer-Encoding: base64

    TVqQAAMAAAAEAAAA
    """ for i in range(n))
    return crlf(f"""
    From: Alice <alice@example.com>
    To: bob@example.org
    Subject: many
    Content-Type: multipart/mixed; boundary="b"

    {parts}--b--
    """.replace("\n    ", "\n").replace("\n" + " " * 4, "\n"))


def test_one_entry_is_capped_in_files_and_the_message_is_kept_whole(tmp_path: Path, caplog) -> None:
    cfg = config.load(make_config(tmp_path, max_files=4), runtime_dir=str(tmp_path / "run"))
    runner = runner_for(inline_filter(tmp_path, QUARANTINING), config=cfg)
    with caplog.at_level("WARNING", logger="defang.worker"):
        reply = run(runner, many_exes(5), tmp_path, queue_id="4QCAP")
    assert "error" not in reply and reply["verdict"]["action"] == "continue"
    assert rebuilt(reply, tmp_path).count(b"removed.txt") == 5 * 2, "every part replaced all the same"
    [qid] = runner.quarantine_store.ids()
    entry = runner.quarantine_store.entry_dir(qid)
    assert sorted(os.listdir(entry)) == ["message.eml", "meta.json", "part-1.bin", "part-2.bin"]
    assert (entry / "message.eml").read_bytes() == (tmp_path / "spool" / "message").read_bytes()
    meta = runner.quarantine_store.get(qid)
    assert [p["index"] for p in meta["parts"]] == [1, 2]
    assert meta["left_out"]["parts"] == 3 and meta["left_out"]["indexes"] == [3, 4, 5]
    assert meta["left_out"]["max_files"] == 4
    assert len(meta["reasons"]) == 6, "every reason is kept"
    [line] = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert line.startswith(f"4QCAP: quarantine entry {qid}: 3 of 5 part files left out")


def test_one_entry_is_capped_in_bytes_never_cutting_the_message(tmp_path: Path) -> None:
    raw = many_exes(3)
    # room for the message and one 12-byte part file, not two
    cfg = config.load(make_config(tmp_path, max_bytes=len(raw) + 20), runtime_dir=str(tmp_path / "run"))
    runner = runner_for(inline_filter(tmp_path, QUARANTINING), config=cfg)
    run(runner, raw, tmp_path)
    [qid] = runner.quarantine_store.ids()
    meta = runner.quarantine_store.get(qid)
    assert [p["index"] for p in meta["parts"]] == [1] and meta["left_out"]["indexes"] == [2, 3]
    # a message bigger than max_bytes is still kept whole (it is what a release sends)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    cfg = config.load(make_config(tiny, max_bytes=10), runtime_dir=str(tiny / "run"))
    runner = runner_for(inline_filter(tiny, QUARANTINING), config=cfg)
    run(runner, raw, tiny)
    [qid] = runner.quarantine_store.ids()
    assert runner.quarantine_store.message_path(qid).read_bytes() == (tiny / "spool" / "message").read_bytes()
    assert runner.quarantine_store.get(qid)["left_out"]["parts"] == 3


def test_an_entry_within_its_caps_says_nothing_left_out(tmp_path: Path) -> None:
    _reply, store, module = quarantine_one(tmp_path)
    assert store.get(module.IDS[0])["left_out"] is None


def test_an_entry_cap_below_the_message_and_its_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"max_files = 1: expected 0 .* or at least 2"):
        config.load(make_config(tmp_path, max_files=1))
