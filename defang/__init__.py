"""defang: a MIMEDefang-style mail filter for Postfix and Sendmail, in Python.

``filter.py`` imports its verdict constructors from here::

    from defang import accept, reject, tempfail, discard
"""

from defang.verdicts import Verdict, accept, discard, reject, tempfail

__all__ = ["Verdict", "accept", "discard", "reject", "tempfail"]
__version__ = "0.1.0"
