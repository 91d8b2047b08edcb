"""What the state back ends share: their error and their clock (kept apart from ``state``,
which imports the back ends, so that neither imports the other)."""

from __future__ import annotations

from collections.abc import Callable

#: seconds since the epoch: the wall clock (``time.time``) or a test's
Clock = Callable[[], float]
#: a timeout or a time to live in seconds; None: the default timeout, or no expiry
Secs = float | None


class StateError(Exception):
    """The state back end did not answer: unreachable, too slow, locked past its timeout."""
