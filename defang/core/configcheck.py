"""Options that pass their own checks but do not fit together: warnings, not errors.

``config.load`` refuses a value that cannot be right on its own (a type, a range, a
min above a max).  Here are combinations that work, lose no mail, yet do not do what an
admin means; ``defang check`` prints them (``--strict`` fails), the multiplexor logs them
at its start and answers them to every reload.
"""

from __future__ import annotations

from defang.core.config import Config


def timeout_warnings(cfg: Config) -> list[str]:
    """Lines about timeouts that do not fit together (empty when they do).

    A worker past ``busy_timeout`` is killed and its message gets ``on_internal_error``:
    a scanner that hangs must time out before that, or the filter's own handling of an
    unanswered check (tempfail, deliver with a header) never runs.  A filter may ask the
    scanners one after the other and then look something up in DNS, so the configured
    scanners' timeouts and one DNS lifetime must add up to less than ``busy_timeout``.
    A warning, not an error: mail still gets a 4xx, never lost (``defang check --strict``
    fails on it).
    """
    parts = [(f"[{name}] timeout {timeout:g}", timeout) for name, address, timeout in (
        ("spamassassin", cfg.spamassassin_address, cfg.spamassassin_timeout),
        ("clamav", cfg.clamav_address, cfg.clamav_timeout),
        ("rspamd", cfg.rspamd_address, cfg.rspamd_timeout)) if address]  # fmt: skip
    parts.append((f"[dns] lifetime {cfg.dns_lifetime:g}", cfg.dns_lifetime))
    out = _verify_warnings(cfg)
    total = sum(t for _, t in parts)
    if total < cfg.busy_timeout:
        return out
    return [*out, f"config: [multiplexor] busy_timeout {cfg.busy_timeout:g} is not above "
            f"{' + '.join(what for what, _ in parts)} = {total:g} s: a hung scanner gets the worker "
            f"killed and the message on_internal_error before the filter can handle it; raise "
            f"busy_timeout or lower those timeouts"]  # fmt: skip


def _verify_warnings(cfg: Config) -> list[str]:
    """A recipient's probe (``defang.verify``) runs in one RCPT request: the cache read and
    write (``[state] timeout`` each) and the probe must end before ``busy_timeout``, or a
    hung next hop gets ``on_internal_error`` instead of ``[verify] on_error``."""
    total = cfg.verify_timeout + 2 * cfg.state_timeout
    if not cfg.verify_host or total < cfg.busy_timeout:
        return []
    return [f"config: [multiplexor] busy_timeout {cfg.busy_timeout:g} is not above [verify] timeout "
            f"{cfg.verify_timeout:g} + 2 x [state] timeout {cfg.state_timeout:g} = {total:g} s: a hung next "
            f"hop gets the worker killed and the recipient on_internal_error instead of [verify] on_error; "
            f"raise busy_timeout or lower those timeouts"]  # fmt: skip
