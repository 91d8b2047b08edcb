"""Pool test filter whose filter_initialize always raises (a database that is down).

It imports fine, so ``defang run`` starts; every worker then fails to boot.  The
multiplexor must back off instead of forking in a tight loop.
"""


def filter_initialize():
    raise ConnectionRefusedError("database at 127.0.0.1:1 is down (pool test)")


def filter_end(msg):
    msg.add_header("X-Never", "reached")
