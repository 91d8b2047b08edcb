"""``defang.Chain``: a filter built from small rule modules, walked in order until one decides.

Admins who have run a content filter for years keep their policy as a list of small
rules (an allow list, a bad-filename rule, a charset block...), each switched on, off or
to monitor on its own.  A rule is a module with the same hooks as a ``filter.py``; the
chain gives the filter one hook for each hook any rule has, which asks the rules that
have it, in the chain's order, until one **decides** (returns or calls a verdict other
than continue: the first decision stands, as everywhere in defang).  Rules after it are
not asked; actions recorded before it (a rewritten recipient, an added header) stay.

Each rule has a name (its module's file name), and:

- ``[filter] monitor_rules = ["charset_block"]`` puts that rule in monitor mode: its
  refusals (and part drops) become ``X-Defang-Would`` entries naming the rule, and the
  chain goes on to the next rule;
- a rule that decides tags the message with its name, and one that would have, with
  ``<name>:monitor``: ``defangctl status`` counts tags, so these are per-rule counters.

``filter_initialize`` runs every rule's, in order; ``filter_cleanup`` every rule's in
reverse order, all of them even if one raises (the first exception is raised after).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from defang.core.hooks import BY_NAME, NAMES, misnamed, signature_problem

log = logging.getLogger("defang.filter")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,48}")  # a rule's name is part of a tag (see decision.MAX_TAG)


class RuleLoadError(Exception):
    """A rule cannot be used; the text is one ``file:line: what`` line."""


class RuleWarning(UserWarning):
    """A rule's likely mistake (a misspelt hook): ``defang check`` prints it."""


class Rule:
    """One rule: a name and the hooks its module defines."""

    __slots__ = ("name", "hooks", "source")

    def __init__(self, name: str, hooks: dict[str, Callable[..., Any]], source: str) -> None:
        self.name, self.hooks, self.source = name, hooks, source

    def __repr__(self) -> str:
        return f"<Rule {self.name} ({', '.join(self.hooks) or 'no hooks'})>"

    @classmethod
    def from_module(cls, module: ModuleType | Any, name: str | None = None) -> Rule:
        source = getattr(module, "__file__", None) or repr(module)
        name = name or getattr(module, "NAME", None) or getattr(module, "__name__", "").rpartition(".")[2]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RuleLoadError(f"{source}: rule name {name!r}: use 1-48 letters, digits, '_', '.' or '-'")
        hooks = {}
        for hook in NAMES:
            fn = getattr(module, hook, None)
            if fn is None:
                continue
            problem = signature_problem(hook, fn) if callable(fn) else f"{hook} is not callable"
            if problem:
                code = getattr(fn, "__code__", None)
                where = f"{code.co_filename}:{code.co_firstlineno}" if code else source
                raise RuleLoadError(f"{where}: rule {name}: {problem}")
            hooks[hook] = fn
        namespace = vars(module) if isinstance(module, ModuleType) else {}
        for line in misnamed(namespace, source):
            where, _, text = line.partition(": ")
            filename, _, lineno = where.rpartition(":")
            warnings.warn_explicit(f"rule {name}: {text}", RuleWarning, filename, int(lineno or 0))
        return cls(name, hooks, source)


class Chain:
    """Rules walked in order; ``hooks`` are the filter's (``globals().update(chain.hooks)``)."""

    def __init__(self, rules: Iterable[ModuleType | Rule | Any]) -> None:
        self.rules = [r if isinstance(r, Rule) else Rule.from_module(r) for r in rules]
        names = [r.name for r in self.rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RuleLoadError(f"the chain has the rule {twice[0]} twice")
        self._checked_monitor = False

    @classmethod
    def from_directory(cls, directory: str | Path, names: Iterable[str]) -> Chain:
        """The rules ``<directory>/<name>.py``, in the order of ``names``.

        Each is imported by path under its own module name (``defang_rule_<name>``), so
        two filters' ``rules/`` folders never meet in ``sys.modules``.
        """
        directory = Path(directory)
        return cls(Rule.from_module(_import(directory / f"{name}.py", name), name) for name in names)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    @property
    def hooks(self) -> dict[str, Callable[..., Any]]:
        """One function per hook some rule defines (a hook no rule has stays undefined,
        so the MTA is not asked to wait at that stage)."""
        have = {hook for rule in self.rules for hook in rule.hooks}
        made: dict[str, Callable[..., Any]] = {}
        if "filter_initialize" in have:
            made["filter_initialize"] = self._initialize
        if "filter_cleanup" in have:
            made["filter_cleanup"] = self._cleanup
        for hook in have - {"filter_initialize", "filter_cleanup"}:
            made[hook] = self._hook(hook)
        return made

    def _hook(self, hook: str) -> Callable[..., Any]:
        rules = [(r.name, r.hooks[hook]) for r in self.rules if hook in r.hooks]
        walk = self._walk
        if BY_NAME[hook].arity == 1:

            def one(target: Any) -> None:
                walk(hook, rules, (target,))

            one.__qualname__ = one.__name__ = hook
            return one

        def two(target: Any, argument: Any) -> None:
            walk(hook, rules, (target, argument))

        two.__qualname__ = two.__name__ = hook
        return two

    def _walk(self, hook: str, rules: list[tuple[str, Callable[..., Any]]], args: tuple[Any, ...]) -> None:
        decision = args[0].decision  # conn or msg: the runner set it for this hook
        if not self._checked_monitor:
            self._check_monitor(decision.monitor_rules)
        for name, fn in rules:
            would = len(decision.would)
            decision.rule = name
            try:
                decision.take_result(f"{hook} of rule {name}", fn(*args))
            finally:
                decision.rule = ""
            if len(decision.would) > would:
                decision.tag(f"{name}:monitor")
            if decision.decided:
                if decision.by.endswith(f"rule {name}"):
                    decision.tag(name)
                return

    def _check_monitor(self, monitor_rules: frozenset[str]) -> None:
        self._checked_monitor = True
        unknown = sorted(set(monitor_rules) - set(self.names))
        if unknown:
            log.warning("[filter] monitor_rules names %s, which the chain does not have (its rules: %s)",
                        ", ".join(unknown), ", ".join(self.names))  # fmt: skip

    def _initialize(self) -> None:
        for rule in self.rules:
            fn = rule.hooks.get("filter_initialize")
            if fn is not None:
                fn()

    def _cleanup(self) -> None:
        first: BaseException | None = None
        for rule in reversed(self.rules):
            fn = rule.hooks.get("filter_cleanup")
            if fn is None:
                continue
            try:
                fn()
            except Exception as exc:
                log.error("rule %s: filter_cleanup raised %s: %s", rule.name, type(exc).__name__, exc)
                first = first or exc
        if first is not None:
            raise first


def _import(path: Path, name: str) -> ModuleType:
    if not _NAME.fullmatch(name):
        raise RuleLoadError(f"{path}: rule name {name!r}: use 1-48 letters, digits, '_', '.' or '-'")
    if not path.is_file():
        raise RuleLoadError(f"{path}: no such rule file")
    module_name = f"defang_rule_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise RuleLoadError(f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}") from None
    except Exception as exc:
        sys.modules.pop(module_name, None)
        tb = exc.__traceback__
        line = 0
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        raise RuleLoadError(f"{path}:{line}: {type(exc).__name__}: {exc}") from None
    return module
