"""Spam by rspamd: do what rspamd advises, while the sender is still connected.

Needs [rspamd] address in defang.toml (rspamd's normal worker, "inet:11333@127.0.0.1").
rspamd is told the client, HELO, sender, recipients and queue ID in its own protocol.
For each message, rspamd's action:

  * "reject": refused with 550 (no bounce to a forged address);
  * "soft reject": 451, the sending MTA retries later (rspamd's rate limits, greylisting);
  * "rewrite subject": delivered with "[SPAM] " before the subject;
  * "add header", "rewrite subject": X-Spam-Flag: YES;
  * every scanned message: X-Rspamd-Action and X-Rspamd-Score, and the symbols that hit.

If rspamd cannot be asked (down, too slow, the message over [rspamd] max_size) the
message is delivered with "X-Rspamd-Action: not scanned: <why>": a spam filter fails
open (see virus_notify.py for one that fails closed).
"""

from defang import reject, tempfail

SUBJECT_TAG = "[SPAM] "


def filter_begin(msg):
    msg.start_checks("rspamd")  # rspamd starts while the message hooks go on


def filter_end(msg):
    spam = msg.rspamd()
    if not spam.scanned:
        msg.add_header("X-Rspamd-Action", f"not scanned: {spam.error or spam.skipped}"[:200])
        return None
    if spam.action == "reject":
        msg.tag("rspamd_reject")
        return reject(f"Message looks like spam (rspamd score {spam.score:.1f})", code="550", dsn="5.7.1")
    if spam.action == "soft reject":
        return tempfail("Try again later", code="451", dsn="4.7.1")
    msg.add_header("X-Rspamd-Action", spam.action)
    msg.add_header("X-Rspamd-Score", f"{spam.score:.2f} / {spam.required:.2f}")
    msg.add_header("X-Rspamd-Symbols", ", ".join(sorted(spam.symbols)) or "none")
    if spam.is_spam:
        msg.tag("rspamd_spam")
        msg.add_header("X-Spam-Flag", "YES")
    if spam.action == "rewrite subject":
        msg.change_header("Subject", SUBJECT_TAG + msg.subject)
    return None
