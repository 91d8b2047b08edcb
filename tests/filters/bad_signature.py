"""filter_sender forgets the sender argument (line 4)."""


def filter_sender(conn):
    return None
