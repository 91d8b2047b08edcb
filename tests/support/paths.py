"""Where the tests find the repository, their filters and the shared corpus."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILTERS = REPO / "tests" / "filters"
#: 193 real-world messages from public test suites, beside the repository
CORPUS = REPO.parent / "shared" / "corpus"
