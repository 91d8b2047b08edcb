"""defang.Chain: rules asked in order until one decides, per-rule monitor, tags, load errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from paths import REPO

from defang import Chain
from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.workers.api.chain import RuleLoadError

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
FILTER = """
from pathlib import Path
from defang import Chain
chain = Chain.from_directory(Path(__file__).parent / "rules", {names!r})
globals().update(chain.hooks)
"""
RULES = {
    "first": """
        CALLS = []
        def filter_end(msg):
            CALLS.append("first")
            msg.add_header("X-First", "yes")
        """,
    "blocker": """
        from defang import reject
        CALLS = []
        def filter_end(msg):
            CALLS.append("blocker")
            return reject("blocked by rule", "554", "5.7.1")
        """,
    "later": """
        CALLS = []
        def filter_end(msg):
            CALLS.append("later")
            msg.reject("later says no")
        def filter_sender(conn, sender):
            return None
        """,
}


def chain_filter(tmp_path: Path, names: list[str], rules: dict[str, str] = RULES) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    for name, code in rules.items():
        (tmp_path / "rules" / f"{name}.py").write_text(textwrap.dedent(code))
    path = tmp_path / "filter.py"
    path.write_text(FILTER.format(names=names))
    return path


def run(path: Path, **cfg_changes):
    t = Trial(replace(configmod.load(None, filter_path=str(path)), **cfg_changes))
    try:
        return t.run(MESSAGE, Envelope()), t.runner.loaded.module
    finally:
        t.close()


def calls(module) -> list[str]:
    return [c for rule in module.chain.rules for c in sys.modules[f"defang_rule_{rule.name}"].CALLS]


def test_rules_are_asked_in_order_until_one_decides(tmp_path):
    result, module = run(chain_filter(tmp_path, ["first", "blocker", "later"]))
    assert calls(module) == ["first", "blocker"]
    assert result.outcome["text"] == "blocked by rule" and result.tags == ["blocker"]
    assert result.actions == [["add_header", "X-First", "yes"]]  # recorded before (not applied: refused)


def test_a_rule_in_monitor_mode_is_noted_and_the_next_rule_is_asked(tmp_path):
    result, module = run(chain_filter(tmp_path, ["first", "blocker", "later"]), monitor_rules=("blocker",))
    assert calls(module) == ["first", "blocker", "later"]
    assert result.outcome["text"] == "later says no"
    assert result.would == ["reject 554 5.7.1 blocked by rule (filter_end, rule blocker)"]
    assert result.tags == ["blocker:monitor", "later"]


def test_the_filter_has_only_the_hooks_some_rule_has(tmp_path):
    module = run(chain_filter(tmp_path, ["first", "later"]))[1]
    assert sorted(module.chain.hooks) == ["filter_end", "filter_sender"]
    assert module.chain.names == ["first", "later"]


def test_an_unknown_monitor_rule_name_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "defang.filter"):
        run(chain_filter(tmp_path, ["first"]), monitor_rules=("frist",))
    assert "monitor_rules names frist, which the chain does not have (its rules: first)" in caplog.text


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "defang", "check", "--strict", "--filter", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip


def test_a_misspelt_hook_in_a_rule_is_a_warning_naming_the_rule(tmp_path):
    typo = {**RULES, "typo": "def filter_prat(msg, part):\n    pass\n"}
    path = chain_filter(tmp_path, ["first", "typo"], typo)
    r = check(path)
    assert r.returncode == 1
    assert f"{tmp_path}/rules/typo.py:1: RuleWarning: rule typo: filter_prat is not a hook defang calls; " \
           "the closest is filter_part" in r.stderr  # fmt: skip


@pytest.mark.parametrize("rules, names, expected", [
    ({"bad": "def filter_end(msg):\n  return (\n"}, ["bad"], "bad.py:2: SyntaxError: '(' was never closed"),
    ({"bad": "x = 1\nimport no_such_mod\n"}, ["bad"], "rules/bad.py:2: ModuleNotFoundError: No module named"),
    ({}, ["missing"], "rules/missing.py: no such rule file"),
    ({"a": ""}, ["a", "a"], "the chain has the rule a twice"),
    ({"a": "def filter_end():\n  pass\n"}, ["a"], "rule a: filter_end() cannot be called with 1 argument"),
])  # fmt: skip
def test_a_rule_that_cannot_be_used_is_one_line(tmp_path, rules, names, expected):
    r = check(chain_filter(tmp_path, names, rules))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "RuleLoadError: " in r.stderr
    assert expected in r.stderr


def test_cleanup_runs_every_rule_s_in_reverse_and_raises_the_first_error():
    order = []

    class R:
        def __init__(self, name, fail=False):
            self.NAME, self.fail = name, fail

        def filter_cleanup(self):
            order.append(self.NAME)
            if self.fail:
                raise RuntimeError(self.NAME)

    chain = Chain([R("a", fail=True), R("b", fail=True), R("c")])
    with pytest.raises(RuntimeError, match="b"):
        chain.hooks["filter_cleanup"]()
    assert order == ["c", "b", "a"]
    with pytest.raises(RuleLoadError, match="rule name 'no spaces'"):
        Chain([R("no spaces")])
