"""The common case: one filter_end that looks at headers only."""


def filter_end(msg):
    if "viagra" in msg.subject.lower():
        msg.reject("Spam")
    msg.add_header("X-Filtered-By", "defang")
