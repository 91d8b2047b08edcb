"""Two policy groups (issue 30): recipients whose local part begins with "strict" refuse
spam, the others (the default group) get it tagged.  "Spam" is a GTUBE-like marker in the
Subject.  The tests read X-Policy to see which group each delivery was decided for."""

from defang import reject

MARKER = "SPAM-TEST-MARKER"


def filter_recipient(conn, rcpt):
    if rcpt.split("@")[0].startswith("strict"):
        conn.policy("strict")


def filter_end(msg):
    msg.add_header("X-Policy", msg.policy or "default")
    msg.add_header("X-Rcpt-Args", "; ".join(f"{r} {' '.join(a)}" for r, a in msg.rcpt_args.items()))
    spam = MARKER in (msg.get_header("Subject") or "")
    if spam and msg.policy == "strict":
        return reject("Spam refused by this recipient's policy", "550", "5.7.1")
    if spam:
        msg.add_header("X-Spam-Flag", "YES")
    return None
