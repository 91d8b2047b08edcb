"""Pool test filter: the message says what the worker should do (header-driven).

Driven by headers so that one running pool can play every scenario and a *retried*
message (same bytes) can behave differently from its first attempt:

- ``X-Hold-While: PATH``: sleep while PATH exists (at most 60 s), after writing our
  PID to ``PATH.pid`` -- the test kills or watches exactly this worker, then removes
  PATH so the retry of the same message goes straight through;
- ``X-Sleep: SECONDS``: sleep that long (a hook slower than ``busy_timeout``);
- ``X-Ignore-Term: yes``: ignore SIGTERM from now on (a filter that does not stop when
  asked, so the multiplexor must KILL it);
- ``X-Verdict: accept | reject | continue``: the verdict of filter_end.

Every message gets ``X-Worker-Pid`` so the sink shows which worker served it.
"""

import os
import signal
import time

from defang import accept, reject


def filter_end(msg):
    msg.add_header("X-Worker-Pid", str(os.getpid()))
    hold = msg.get_header("X-Hold-While")
    if hold:
        hold = hold.strip()
        if os.path.exists(hold):
            tmp = f"{hold}.pid.{os.getpid()}"  # several workers may hold on one file
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))
            os.rename(tmp, hold + ".pid")
        deadline = time.monotonic() + 60
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.02)
    if (msg.get_header("X-Ignore-Term") or "").strip() == "yes":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seconds = msg.get_header("X-Sleep")
    if seconds:
        time.sleep(float(seconds))
    verdict = (msg.get_header("X-Verdict") or "continue").strip()
    if verdict == "accept":
        return accept()
    if verdict == "reject":
        return reject("Rejected by the pool test filter", code="550", dsn="5.7.1")
    return None
