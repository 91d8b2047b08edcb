"""A process title carries text from the MTA, which may hold surrogates."""

from __future__ import annotations

import subprocess
import sys


def test_a_title_with_a_lone_surrogate_is_set_escaped_not_raised():
    code = (
        "from defang.core.proctitle import set_title\n"
        "set_title('defang-worker: Q\\udcff1 since now')\n"
        "import setproctitle; print(setproctitle.getproctitle())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "defang-worker: Q\\udcff1 since now"
