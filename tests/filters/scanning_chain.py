"""The scanner examples as one filter: virus_notify first, then spam_score (defang.Chain)."""

from pathlib import Path

from defang import Chain

EXAMPLES = Path(__file__).resolve().parents[2] / "filters" / "examples"
chain = Chain.from_directory(EXAMPLES, ["virus_notify", "spam_score"])
globals().update(chain.hooks)
