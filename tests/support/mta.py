"""A private Postfix (or Sendmail) relaying to a capturing sink, with defang as its milter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon import REPO, Defang, traversable_dir

from defang.testbed.ports import free_port
from defang.testbed.postfix import PrivatePostfix, postfix_available
from defang.testbed.sendmail import PrivateSendmail, sendmail_available
from defang.testbed.sink import Sink
from defang.testbed.smtpclient import SendResult, send

needs_postfix = pytest.mark.skipif(
    os.geteuid() != 0 or not postfix_available(),
    reason="integration tests need root and Postfix (scripts/bootstrap installs it)",
)
needs_sendmail = pytest.mark.skipif(
    os.geteuid() != 0 or not sendmail_available(),
    reason="Sendmail tests need root and Sendmail unpacked (scripts/bootstrap: /opt/defang-sendmail)",
)


class Stack:
    """Sink + Postfix (milter_default_action = tempfail) + the defang daemons."""

    def __init__(self, filter_path: Path | str, settings: dict | None = None,
                 postfix_extra: dict | None = None, sink_port: int | None = None) -> None:  # fmt: skip
        self.dir = traversable_dir("defang-mta-")
        self.sink = Sink(self.dir / "sink", sink_port or free_port())
        self.defang = Defang(filter_path, settings=settings)
        self.postfix = PrivatePostfix(self.dir / "postfix", free_port(), self.sink.port,
                                      milter=self.defang.socket_spec,
                                      extra=postfix_extra)  # fmt: skip
        self.mta: PrivatePostfix | PrivateSendmail = self.postfix

    def start(self) -> Stack:
        try:
            self.sink.start()
            self.defang.start()
            self.mta.start()
        except BaseException:  # a stack half started would outlive the test
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for part in (self.mta, self.defang, self.sink):
            try:
                part.stop()
            except Exception:  # keep stopping the others
                pass
        self.defang.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, data: bytes, sender: str = "alice@example.org",
             rcpts: tuple[str, ...] = ("bob@example.org",), **kw) -> SendResult:  # fmt: skip
        return send("127.0.0.1", self.mta.smtp_port, sender, list(rcpts), data, **kw)

    def arrived(self, marker: bytes, timeout: float = 20.0):  # noqa: ANN201 (a SinkMessage)
        """The first message at the sink that contains ``marker``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.sink.messages():
                if marker in m.raw:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no message with {marker!r} reached the sink")

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SendmailStack(Stack):
    """Sink + Sendmail (the milter lines of etc/sendmail.mc.snippet: F=T) + the defang daemons.

    defang's runtime directory (and so its milter socket) is under /run, as in production:
    Sendmail refuses a milter socket below a world-writable directory such as /tmp
    ("local socket name ... unsafe: World writable directory"), sticky bit or not.
    """

    def __init__(self, filter_path: Path | str, settings: dict | None = None,
                 milter_flags: str = "F=T") -> None:  # fmt: skip
        self.dir = traversable_dir("defang-mta-")
        self.sink = Sink(self.dir / "sink", free_port())
        self.rundir = Path(tempfile.mkdtemp(prefix="defang-sendmail-", dir="/run"))
        self.rundir.chmod(0o755)
        self.defang = Defang(filter_path, settings=settings, socket=f"unix:{self.rundir / 'run/milter.sock'}")
        self.defang.runtime = self.rundir / "run"
        self.sendmail = PrivateSendmail(self.dir / "sendmail", free_port(), self.sink.port,
                                        milter=self.defang.socket_spec,
                                        milter_flags=milter_flags)  # fmt: skip
        self.mta = self.sendmail

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.rundir, ignore_errors=True)


def message(tag: str, **headers: str) -> tuple[bytes, str]:
    """A small message with a unique Message-ID and the given control headers."""
    mid = f"{tag}.{time.monotonic_ns()}@pool.test"
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    data = (f"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: {tag}\r\n"
            f"Message-ID: <{mid}>\r\n{extra}\r\nHello from the pool tests.\r\n").encode()  # fmt: skip
    return data, mid


def wait_for(what: str, pred: Callable[[], Any], timeout: float = 15.0, every: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; fail saying ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def delivered(stack: Stack, mid: str) -> list:
    """Messages at the sink carrying Message-ID ``mid``."""
    needle = f"Message-ID: <{mid}>".encode()
    return [m for m in stack.sink.messages() if needle in m.raw]


def send_in_thread(stack: Stack, data: bytes) -> tuple[threading.Thread, dict]:
    """Send ``data`` in a thread; the dict gets ``result`` and ``waited`` (seconds)."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = stack.send(data)
        except Exception as exc:  # reported by the test through out["error"]
            out["error"] = exc
        out["waited"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def shared_dir(prefix: str) -> Path:
    """A dir the test (root) and the workers (the unprivileged defang user) both write in."""
    d = traversable_dir(prefix)
    d.chmod(0o1777)
    return d


def hold_message(stack: Stack, tag: str) -> tuple[Path, bytes, str, threading.Thread, dict, int]:
    """Send a message that the worker holds (pool_control's X-Hold-While) until released."""
    hold = shared_dir("defang-hold-") / "hold"
    hold.touch()
    data, mid = message(tag, X_Hold_While=str(hold))
    th, out = send_in_thread(stack, data)
    pid = int(wait_for("the worker to hold the message", lambda: _read(Path(f"{hold}.pid"))))
    return hold, data, mid, th, out, pid


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def resend_until_accepted(stack: Stack, data: bytes):  # noqa: ANN201 (a SendResult)
    """The sending MTA's retries: the same bytes until a 250 (each 4xx is not delivered).
    Sendmail with F=T refuses at MAIL FROM while the milter is not back (no ``data``)."""
    return wait_for("the retry accepted", lambda: (r := stack.send(data)).accepted and r, timeout=30)


def headers_of(raw: bytes) -> list[tuple[str, str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    out = []
    for line in head.split("\r\n"):
        if line[:1] in " \t":
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            out.append((name, value.strip()))
    return out


def quarantine_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    """``defang quarantine ARGS`` against the stack's daemons."""
    return subprocess.run([sys.executable, "-m", "defang", "quarantine", *args, "--config",
                           str(stack.defang.config), "--runtime-dir", str(stack.defang.runtime)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
