"""Split after accept (issue 30, approach 2): a message to several recipients is split into
one copy each (msg.split_by_recipient); each copy comes back through defang alone and is
decided with its recipient's policy: "strict*" recipients refuse spam, the others get it
tagged.  "Spam" is a GTUBE-like marker in the Subject."""

from defang import reject

MARKER = "SPAM-TEST-MARKER"


def filter_begin(msg):
    msg.split_by_recipient()  # True with two recipients or more: that decides the original


def filter_end(msg):
    strict = all(r.split("@")[0].startswith("strict") for r in msg.recipients)
    msg.add_header("X-Policy", "strict" if strict else "default")
    spam = MARKER in (msg.get_header("Subject") or "")
    if spam and strict:
        return reject("Spam refused by this recipient's policy", "550", "5.7.1")
    if spam:
        msg.add_header("X-Spam-Flag", "YES")
    return None
