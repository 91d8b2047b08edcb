"""A rate limit per authenticated user: a stolen password cannot send a spam run.

Each authenticated user (the {auth_authen} macro, from SMTP AUTH on submission) may send
100 messages an hour and 20 a minute, counted per recipient so that one message to 500
addresses counts as 500; past either, the next recipient gets "451 4.7.1 Too many
messages, try again in ... seconds" and a WARNING line with the counts (rate limit
auth_user=alice: 101 in 3600s > 100: tempfail), tagged ratelimit_auth_user in defangctl
status.  Unauthenticated mail is not counted here; add per="client_ip" for that.  The
windows slide, and are shared by every relay when [state] backend = "redis".
"""

from defang import ratelimit

LIMITS = [(20, 60), (100, 3600)]  # (messages, seconds)


def filter_recipient(conn, recipient):
    for limit, window in LIMITS:
        refused = ratelimit.check(conn, "auth_user", limit=limit, window=window)
        if refused is not None:
            return refused
    return None
