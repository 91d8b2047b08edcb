"""Test levels, one folder each (see tests/README.md); helpers for all of them in support/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
