"""A private Postfix relaying to a capturing sink, with defang as its milter."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from daemon import Defang, traversable_dir

from defang.testbed.ports import free_port
from defang.testbed.postfix import PrivatePostfix, postfix_available
from defang.testbed.sink import Sink
from defang.testbed.smtpclient import SendResult, send

needs_postfix = pytest.mark.skipif(
    os.geteuid() != 0 or not postfix_available(),
    reason="integration tests need root and Postfix (scripts/bootstrap installs it)",
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

    def start(self) -> Stack:
        self.sink.start()
        self.defang.start()
        self.postfix.start()
        return self

    def stop(self) -> None:
        for part in (self.postfix, self.defang, self.sink):
            try:
                part.stop()
            except Exception:  # keep stopping the others
                pass
        self.defang.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, data: bytes, sender: str = "alice@example.org",
             rcpts: tuple[str, ...] = ("bob@example.org",), **kw) -> SendResult:  # fmt: skip
        return send("127.0.0.1", self.postfix.smtp_port, sender, list(rcpts), data, **kw)

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
