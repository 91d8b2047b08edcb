"""SpamAssassin's verdict as headers (the example's own ``add_spam_headers``), and what the
filter sees spamd is given before the message (``msg.spamassassin_headers``), on one line."""


def filter_begin(msg):
    msg.start_checks("spamassassin")


def filter_end(msg):
    spam = msg.spamassassin()
    msg.add_header("X-Test-Rules", ",".join(sorted(spam.rules)) if spam.scanned else f"error {spam}")
    msg.add_header("X-Test-Hop", " ".join(msg.spamassassin_headers.split()) or "none")
    msg.add_spam_headers(spam)
