"""A filter that costs what a header asks (tests/postfix/test_postfix_budget.py).

X-Quarantine: keep the message first; X-Spin: loop in filter_end, never returning (the
CPU budget's timer must stop it); else the message passes with an X-Budget header.
"""


def filter_begin(msg):
    if msg.get_header("X-Quarantine"):
        msg.quarantine("kept before the budget ran out")


def filter_end(msg):
    if msg.get_header("X-Spin"):
        while True:
            pass
    msg.add_header("X-Budget", "passed")
