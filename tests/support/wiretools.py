"""Decision requests as the front end sends them, through a runner as a worker runs them.

Tests write a request as the JSON object the wire carries; ``handle`` encodes it,
lets the runner decode and answer it (``FilterRunner.handle_body``, as the worker
process does), and reads the reply back from its JSON: what a test asserts is what
would cross the wire.
"""

from __future__ import annotations

import json
from typing import Any

from defang.core import wire


def body_of(request: Any) -> bytes:
    """The frame body of a request object (``v`` added when it is a dict)."""
    if isinstance(request, dict):
        request = {"v": wire.VERSION, **request}
    return json.dumps(request).encode()


def handle(runner: Any, request: Any) -> dict[str, Any]:
    """The runner's reply to ``request``, as the JSON object it sends."""
    reply = runner.handle_body(body_of(request))
    return json.loads(wire.encode_body(reply))


def read(request: Any) -> Any:
    """The typed request a worker reads from ``request`` (a dict as the wire carries it)."""
    return wire.decode(body_of(request), wire.REQUESTS)
