"""defang: a MIMEDefang-style mail filter for Postfix and Sendmail, in Python.

Everything a ``filter.py`` uses is importable from here::

    from defang import reject, tempfail, DANGEROUS_EXTENSIONS, MimeLimitError

The verdicts are loaded with the package; the MIME helpers, result and model types on
first use (PEP 562), so that the daemons, which import ``defang.core`` and never parse
MIME, do not pay for the MIME engine's imports.  Where each name lives is in ``_LAZY``.
"""

from __future__ import annotations

import importlib
from typing import Any

from defang.core.verdicts import Verdict, accept, discard, reject, tempfail
from defang.core.version import VERSION

__version__ = VERSION

_FILENAMES = "defang.workers.mime.filenames"
_ARCHIVES = "defang.workers.mime.archives"
_LIMITS = "defang.workers.mime.limits"
_LAZY: dict[str, str] = {
    "DANGEROUS_EXTENSIONS": _FILENAMES,
    "extensions": _FILENAMES,
    "final_extensions": _FILENAMES,
    "has_extension": _FILENAMES,
    "is_dangerous_filename": _FILENAMES,
    "names_differ": _FILENAMES,
    "normalize_filename": _FILENAMES,
    "safe_filename": _FILENAMES,
    "suspicious_filename": _FILENAMES,
    "ArchiveListing": _ARCHIVES,
    "ArchiveMember": _ARCHIVES,
    "archive_kind": _ARCHIVES,
    "list_archive": _ARCHIVES,
    "MimeLimitError": _LIMITS,
    "MimeLimits": _LIMITS,
    "PartActionError": _LIMITS,
    "SignedMessageError": _LIMITS,
    "SIGNED_TYPES": "defang.workers.mime.part",
    "Part": "defang.workers.mime.part",
    "decode_words": "defang.workers.mime.text",
    "Message": "defang.workers.api.message",
    "Connection": "defang.workers.api.conn",
    "NotesError": "defang.workers.api.conn",
    "Chain": "defang.workers.api.chain",
    "auth": "defang.workers.api.auth",  # a module: from defang import auth
    "Rule": "defang.workers.api.chain",
    "state": "defang.workers.api.state",  # modules: from defang import state, greylist, ...
    "greylist": "defang.workers.api.greylist",
    "ratelimit": "defang.workers.api.ratelimit",
    "lists": "defang.workers.api.lists",
    "verify": "defang.workers.api.verify",
}

__all__ = ["Verdict", "accept", "discard", "reject", "tempfail", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    """A lazy re-export: import the name's home on first use, then keep it here."""
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'defang' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if home.rpartition(".")[2] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
