"""A private Postfix, a capturing SMTP sink and an SMTP client, all on 127.0.0.1.

Used by defang's integration tests, ``scripts/demo`` and ``scripts/bench``::

    from defang.testbed import PrivatePostfix, Sink, free_port, send

    sink_port, smtp_port = free_port(), free_port()
    with Sink(workdir / "sink", sink_port) as sink, \\
         PrivatePostfix(workdir / "postfix", smtp_port, sink_port,
                        milter="unix:/run/defang/milter.sock") as pf:
        r = send("127.0.0.1", smtp_port, "a@example.com", ["b@example.net"], raw)
        [msg] = sink.wait_for(1)

Pure library code (no pytest).  Everything that starts a process needs root; nothing
binds anything but 127.0.0.1, and port 25 is refused.
"""

from defang.testbed.ports import free_port
from defang.testbed.postfix import (
    MAIN_CF_DEFAULTS,
    PrivatePostfix,
    TestbedError,
    expected_after_relay,
    postfix_available,
    socket_dir,
)
from defang.testbed.sink import Sink, SinkMessage, parse_dump
from defang.testbed.smtpclient import SendResult, normalize_for_smtp, send, send_many

__all__ = [
    "MAIN_CF_DEFAULTS",
    "PrivatePostfix",
    "SendResult",
    "Sink",
    "SinkMessage",
    "TestbedError",
    "expected_after_relay",
    "free_port",
    "normalize_for_smtp",
    "parse_dump",
    "postfix_available",
    "send",
    "send_many",
    "socket_dir",
]
