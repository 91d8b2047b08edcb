"""Import the admin's ``filter.py`` once and resolve its hooks by name.

A broken filter must be caught here, before a worker takes any mail: ``defang run``
and ``defangctl reload`` print ``FilterLoadError``'s text as it is and refuse the
filter.  So the text is one ``file:line: ExceptionType: message`` line that points
at the admin's own code (an editor or a terminal can jump to it), not at importlib.

Hooks are looked up once here, never per message (aiosmtpd's rule): the runner only
reads ``LoadedFilter.hooks``.  Besides "defined but not callable", two mistakes are
caught at load time because they would otherwise fail on every message: a hook that
cannot take the arguments defang passes (``defang.core.hooks`` has each one's arity),
and an ``async def`` hook.

Warnings raised while the filter imports (a deprecated import), and one for each
top-level function whose name is a near miss of a hook (a misspelt hook never runs;
``defang.core.hooks.misnamed``: helpers such as ``filter_bad_filename`` are not), are
kept, one ``file:line: ...`` line each, in ``LoadedFilter.warnings``: the zygote logs
them, ``defang check`` and ``defang test`` print them (``check --strict`` fails on them).  The name
``workers.helpers`` (the helpers' address before they moved under ``defang``) is still
found, for one release: ``OldNames``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from defang.core.hooks import NAMES as HOOK_NAMES
from defang.core.hooks import misnamed, signature_problem

MODULE_NAME = "defang_filter"


class FilterLoadError(Exception):
    """The filter cannot be used; ``str(exc)`` is the one line to show the admin."""


@dataclass(frozen=True)
class LoadedFilter:
    path: str
    module: ModuleType
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class OldNames:
    """``workers.helpers`` -> ``defang.workers.helpers``, which warns that it is deprecated.

    A finder and loader by their protocol (``find_spec``; ``create_module``,
    ``exec_module``), without the ``importlib.abc`` bases: importing that module pulls in
    ``importlib.resources`` and more, into every defang process.

    First on ``sys.meta_path``, so that a ``workers/`` folder on ``sys.path`` (a source
    tree as the working directory) is never imported a second time under its old name.
    Any other ``workers.*`` name is an ImportError that says where things went.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "workers" and not fullname.startswith("workers."):
            return None
        if fullname not in ("workers", "workers.helpers"):
            raise ImportError(f"no module named {fullname!r}: defang's worker modules are defang.workers.*; "
                              "a filter imports what it needs from defang", name=fullname)  # fmt: skip
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        if spec.name == "workers.helpers":
            # at the line that imports it: the first frame that is not the import machinery
            caller = next(f for f in reversed(traceback.extract_stack())
                          if "importlib" not in f.filename and f.filename != __file__)  # fmt: skip
            warnings.warn_explicit(
                "workers.helpers is deprecated and goes in the next release: import the same names "
                "from defang (from defang import DANGEROUS_EXTENSIONS, ...)",
                DeprecationWarning, caller.filename, caller.lineno or 0)  # fmt: skip
        return importlib.import_module("defang." + spec.name)

    def exec_module(self, module: ModuleType) -> None:
        pass  # imported already, under its own name


def _install_old_names() -> None:
    if not any(isinstance(f, OldNames) for f in sys.meta_path):
        sys.meta_path.insert(0, OldNames())


def load_filter(path: str) -> LoadedFilter:
    """Import ``path`` as module ``defang_filter``; raise ``FilterLoadError`` if unusable."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise FilterLoadError(f"{path}: FileNotFoundError: no such filter file") from None
    except OSError as exc:  # the daemons' user may not reach it (see SECURITY.md)
        raise FilterLoadError(f"{path}: {type(exc).__name__}: {exc.strerror} "
                              f"(running as uid {os.geteuid()})") from None  # fmt: skip
    if not os.path.isfile(path):
        raise FilterLoadError(f"{path}: not a regular file")
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.append(directory)  # so filter.py can import its own helper modules

    _install_old_names()
    loader = importlib.machinery.SourceFileLoader(MODULE_NAME, path)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    assert spec is not None  # an explicit loader always yields a spec
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(MODULE_NAME)
    sys.modules[MODULE_NAME] = module
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        _restore(previous)
        raise FilterLoadError(_describe(exc, path)) from None
    try:
        hooks = _resolve_hooks(module, path)
    except FilterLoadError:
        _restore(previous)
        raise
    said = tuple(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught)
    said += tuple(misnamed(vars(module), path))
    return LoadedFilter(path=path, module=module, hooks=hooks, warnings=said)


def check_filter(path: str) -> str | None:
    """The load error text for ``path``, or None when it loads (for ``defang check``)."""
    try:
        load_filter(path)
    except FilterLoadError as exc:
        return str(exc)
    return None


def _restore(previous: ModuleType | None) -> None:
    if previous is None:
        sys.modules.pop(MODULE_NAME, None)
    else:
        sys.modules[MODULE_NAME] = previous


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text else text


def _describe(exc: BaseException, path: str) -> str:
    """``file:line: Type: message`` for an exception raised while importing ``path``."""
    kind = type(exc).__name__
    if isinstance(exc, SyntaxError):
        # The syntax error's own location: the filter, or a helper module it imports.
        where = f"{exc.filename or path}:{exc.lineno or 0}"
        return f"{where}: {kind}: {_one_line(exc.msg or str(exc))}"
    frames = traceback.extract_tb(exc.__traceback__)
    real = os.path.realpath(path)
    inside = [f for f in frames if f.filename and os.path.realpath(f.filename) == real]
    frame = inside[-1] if inside else (frames[-1] if frames else None)
    if isinstance(exc, OSError) and exc.filename == path:
        frame = None  # the filter file itself could not be read: importlib's frame is noise
    where = f"{frame.filename}:{frame.lineno}" if frame else f"{path}:0"
    message = _one_line(str(exc))
    return f"{where}: {kind}: {message}" if message else f"{where}: {kind}"


def _resolve_hooks(module: ModuleType, path: str) -> dict[str, Callable[..., Any]]:
    hooks: dict[str, Callable[..., Any]] = {}
    for name in HOOK_NAMES:
        if not hasattr(module, name):
            continue
        fn = getattr(module, name)
        if not callable(fn):
            where = f"{path}:{_assignment_line(path, name)}"
            raise FilterLoadError(
                f"{where}: TypeError: {name} is defined but not callable (it is {type(fn).__name__})"
            )
        _check_signature(name, fn, path)
        hooks[name] = fn
    return hooks


def _check_signature(name: str, fn: Callable[..., Any], path: str) -> None:
    problem = signature_problem(name, fn)
    if problem:
        code = getattr(fn, "__code__", None)
        where = f"{code.co_filename}:{code.co_firstlineno}" if code else f"{path}:0"
        raise FilterLoadError(f"{where}: TypeError: {problem}")


def _assignment_line(path: str, name: str) -> int:
    """Line of the last top-level binding of ``name`` (only on the error path)."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return 0
    line = 0
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        elif isinstance(node, ast.ImportFrom | ast.Import):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                line = node.lineno
            continue
        for target in targets:
            if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target)):
                line = node.lineno
    return line
