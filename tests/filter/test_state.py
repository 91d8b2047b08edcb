"""defang.state and its users (greylisting, rate limits, lists) in process, on both back
ends: a real SQLite file and a real redis-server on loopback, with a clock the test turns."""

from __future__ import annotations

import pytest

from defang.testbed.redisd import RedisServer, redis_available
from defang.workers.api import greylist, lists, ratelimit, services, state
from defang.workers.api.conn import Connection
from defang.workers.stores import state as stores
from defang.workers.stores.state import GreylistSettings, StateError, StateSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server():
    if redis_available():
        pytest.skip(redis_available())
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """services.CURRENT pointing at a fresh state of one back end, and its clock."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        import redis

        redis.Redis.from_url(server.url).flushall()
        settings = StateSettings(backend="redis", redis_url=server.url, timeout=1.0)
    else:
        settings = StateSettings(path=tmp_path / "state.sqlite3", timeout=1.0)
    clock = Clock()
    saved = services.CURRENT
    services.CURRENT = services.ServiceSettings(state=settings, greylist=GreylistSettings(auto_allow=3))
    stores.CURRENT.configure(settings, clock=clock)
    yield clock
    stores.CURRENT.close()
    stores.CURRENT.clock = __import__("time").time
    services.CURRENT = saved


def conn(ip="203.0.113.5", **macros):
    return Connection(ip=ip, macros={"i": "Q1", **macros})


def test_primitives(backend):
    assert state.get("k") is None
    assert state.set_if_absent("k", "v", ttl=10) is True
    assert state.set_if_absent("k", "w", ttl=10) is False and state.get("k") == "v"
    assert [state.incr("c", ttl=60), state.incr("c", 5, ttl=60)] == [1, 6]
    state.set("t", "x", ttl=5, timeout=0.5)
    assert state.sadd("s", ["a", "b", "a"]) == 2 and state.smembers("s") == {"a", "b"}
    assert state.sismember("s", "a") and state.srem("s", ["a", "z"]) == 1 and not state.sismember("s", "a")
    assert [state.hit("w", 60, 2) for _ in range(3)] == [(1, True), (2, True), (3, False)]
    backend.now += 61
    assert state.hit("w", 60, 2) == (1, True)
    state.delete("k")
    assert state.get("k") is None


def test_sqlite_expiry_is_lazy_and_swept(backend):
    if services.CURRENT.state.backend != "sqlite":
        pytest.skip("Redis expires keys itself")
    state.set("short", "1", ttl=10)
    state.incr("n", ttl=10)
    backend.now += 11
    assert state.get("short") is None and state.incr("n", ttl=10) == 1  # an expired counter starts again
    backend.now += services.CURRENT.state.sweep_interval + 20
    state.set("other", "1")  # a write runs the sweep
    rows = state.store().db.execute("SELECT key FROM kv").fetchall()
    assert sorted(r[0] for r in rows) == ["other"]


def test_greylist_first_attempt_waits_then_passes(backend):
    c = conn()
    first = greylist.check(c, "a@example.org", "b@example.net")
    assert (first.action, first.code, first.dsn) == ("tempfail", "451", "4.7.1")
    assert first.text.startswith("Greylisted, try again in 300 seconds (after ")
    backend.now += 299
    assert greylist.check(c, "a@example.org", "b@example.net").text.startswith("Greylisted, try again in 1 ")
    backend.now += 1
    assert greylist.check(c, "a@example.org", "b@example.net") is None
    assert greylist.check(conn("203.0.113.77"), "a@example.org", "b@example.net") is None  # same /24
    assert greylist.check(conn("203.0.114.5"), "a@example.org", "b@example.net") is not None
    assert greylist.check(c, "other@example.org", "b@example.net") is not None


def test_greylist_retry_after_the_window_starts_again(backend):
    c = conn()
    greylist.check(c, "a@example.org", "b@example.net")
    backend.now += 300 + 4 * 3600 + 1
    assert greylist.check(c, "a@example.org", "b@example.net") is not None


def test_greylist_auto_allows_a_network_that_retried(backend):
    for n in range(3):
        c = conn(f"198.51.100.{n}")
        assert greylist.check(c, f"s{n}@example.org", "b@example.net") is not None
        backend.now += 300
        assert greylist.check(c, f"s{n}@example.org", "b@example.net") is None
    assert greylist.check(conn("198.51.100.200"), "new@example.org", "new@example.net") is None


def test_greylist_exemptions_and_ipv6(backend):
    args = ("a@example.org", "b@example.net")
    assert greylist.check(conn(**{"{auth_authen}": "alice"}), *args) is None
    assert greylist.check(conn("192.0.2.9"), *args, exempt_networks=["192.0.2.0/24"]) is None
    assert greylist.check(conn("::ffff:192.0.2.9"), *args, exempt_networks=["192.0.2.0/24"]) is None
    assert greylist.check(conn("192.0.2.9"), *args, exempt_domains=["example.org"]) is None
    assert greylist.check(conn("192.0.2.9"), "a@mail.example.org", "b@x.test",
                          exempt_domains=["example.org"]) is None
    assert greylist.check(conn(None), *args) is None
    assert greylist.check(conn("2001:db8:1:2::5"), *args) is not None
    backend.now += 300
    assert greylist.check(conn("2001:db8:1:2:ffff::9"), *args) is None  # same /64


def test_ratelimit_sliding_window_counts_and_refuses(backend, caplog):
    c = conn(**{"{auth_authen}": "alice"})
    got = [ratelimit.check(c, "auth_user", limit=3, window=60) for _ in range(4)]
    assert got[:3] == [None, None, None] and (got[3].code, got[3].dsn) == ("451", "4.7.1")
    assert "rate limit auth_user=alice: 4 in 60s > 3: tempfail" in caplog.text
    assert ratelimit.check(conn(), "auth_user", limit=1, window=60) is None  # not authenticated: not counted
    r = ratelimit.check(c, "sender", sender="X@example.org", limit=1, window=60, action="reject")
    assert r is None
    r = ratelimit.check(c, "sender", sender="x@example.org", limit=1, window=60, action="reject")
    assert (r.action, r.code) == ("reject", "550")
    backend.now += 30
    assert ratelimit.check(c, "auth_user", limit=3, window=60) is not None
    backend.now += 31
    assert ratelimit.check(c, "auth_user", limit=3, window=60) is None


def test_lists_allow_wins_and_scopes(backend):
    lists.add("block", ["example.org", "198.51.100.0/24"])
    lists.add("allow", ["boss@example.org"], scope="b@example.net")
    lists.add("allow", ["2001:db8::/32"])
    assert lists.show("block") == ["198.51.100.0/24", "example.org"]
    assert lists.lookup("203.0.113.1", "x@sub.example.org", "c@example.net").list == "block"
    assert lists.lookup("203.0.113.1", "boss@example.org", "b@example.net").list == "allow"
    assert lists.lookup("198.51.100.9", "a@else.test").entry == "198.51.100.0/24"
    assert lists.lookup("2001:db8::1", "x@example.org").list == "allow"
    assert lists.lookup("203.0.113.1", "a@else.test") is None
    # a dual-stack socket's IPv4-mapped address is the IPv4 client, not a way round its block
    assert lists.lookup("::ffff:198.51.100.9", "a@else.test").entry == "198.51.100.0/24"
    assert lists.lookup("IPv6:::ffff:198.51.100.9", "a@else.test").entry == "198.51.100.0/24"
    lists.add("block", ["spam.test"], scope="example.net")  # a recipient domain
    assert lists.lookup(None, "a@spam.test", "z@example.net").scope == "example.net"
    assert lists.remove("block", ["EXAMPLE.ORG"]) == 1
    assert lists.lookup("203.0.113.1", "x@example.org", "c@example.net") is None
    assert lists.scopes() == ["global", "b@example.net", "example.net"]
    with pytest.raises(lists.ListError):
        lists.add("block", ["not an entry"])
    with pytest.raises(lists.ListError):
        lists.add("deny", ["x.test"])


def test_state_down_gives_the_configured_verdict(tmp_path):
    saved = services.CURRENT
    for on_error, expected in (("tempfail", ("tempfail", "451")), ("accept", None)):
        settings = StateSettings(backend="redis", redis_url="redis://127.0.0.1:9/0", timeout=0.5,
                                 on_error=on_error)
        services.CURRENT = services.ServiceSettings(state=settings)
        try:
            v = greylist.check(conn(), "a@example.org", "b@example.net")
            assert (v.action, v.code) == expected if expected else v is None
            v = ratelimit.check(conn(), "client_ip", limit=1, window=1)
            assert (v.action, v.code) == expected if expected else v is None
            found = lists.check(conn(), "a@example.org")
            assert (found.verdict.action, found.allow) == ("tempfail", False) if expected else found is None
            with pytest.raises(StateError):
                state.get("x")
        finally:
            stores.CURRENT.close()
            services.CURRENT = saved


def test_a_sender_cannot_borrow_another_triplet_nor_break_keys(backend):
    c = conn()
    greylist.check(c, "a@b.example", "c|d@example.net")
    backend.now += 300
    assert greylist.check(c, "a@b.example", "c|d@example.net") is None
    assert greylist.check(c, "a@b.example|c", "d@example.net") is not None  # not the same triplet
    long_sender = "x" * 900 + "@example.org"
    assert greylist.check(c, long_sender, "b@example.net").code == "451"
    backend.now += 300
    assert greylist.check(c, long_sender, "b@example.net") is None
    assert ratelimit.check(c, "sender", sender="'; DROP TABLE kv; --@x.test", limit=1, window=60) is None
    assert state.get("defang:none") is None  # the tables are still there


def test_defang_lists_says_why_in_one_line(tmp_path):
    import subprocess
    import sys

    def lists(config_text: str, *args: str) -> subprocess.CompletedProcess:
        config = tmp_path / "c.toml"
        config.write_text(f'[daemon]\nruntime_dir = "{tmp_path / "run"}"\nuser = "root"\n' + config_text)
        return subprocess.run([sys.executable, "-m", "defang", "lists", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    def last_line(r: subprocess.CompletedProcess) -> str:
        return r.stderr.strip().splitlines()[-1]

    down = lists('[state]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:9/0"\ntimeout = 0.5\n',
                 "add", "block", "spam.example")  # fmt: skip
    assert down.returncode == 1 and last_line(down).startswith("defang lists: redis 127.0.0.1:9/0: ")
    assert "Traceback" not in down.stderr
    bad = lists("", "add", "block", "spam example")
    assert (bad.returncode, last_line(bad)) == (
        2, "defang lists: 'spam example': expected an address, a domain or an IP range")
    scope = lists("", "add", "allow", "x@y.example", "--scope", "10.0.0.0/8")
    assert scope.returncode == 2 and "a scope is 'global', a recipient address" in last_line(scope)
    (tmp_path / "in.txt").write_text("# comment\nblock global spam.example\nallow bob@example.org a.example\n"
                                     "block global not/valid\n")  # fmt: skip
    imp = lists("", "import", str(tmp_path / "in.txt"))
    assert imp.returncode == 2 and last_line(imp).endswith("in.txt:4: 'not/valid': expected an address, "
                                                           "a domain or an IP range")  # fmt: skip
    assert lists("", "export").stdout == "# defang lists export: LIST SCOPE ENTRY\n"  # nothing stored


def test_the_sqlite_file_is_private(backend):
    if services.CURRENT.state.backend != "sqlite":
        pytest.skip("a file of the SQLite back end")
    state.set("k", "v")
    path = services.CURRENT.state.path
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir() if p.name.startswith(path.name)}
    assert modes and set(modes.values()) == {0o600}, modes


def _open_at_once(path: str, barrier, errors) -> None:
    from defang.workers.stores.state_sqlite import SqliteStore

    barrier.wait()
    try:
        SqliteStore(path, 5.0, lambda: 0.0)
    except StateError as exc:
        errors.put(str(exc))


def test_workers_opening_a_new_sqlite_file_at_once_never_get_database_is_locked(tmp_path):
    # a fresh install: every worker's first state call opens the new file at the same time
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    for n in range(25):
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_at_once, args=(str(tmp_path / f"s{n}.sqlite3"), barrier, errors))
                 for _ in range(6)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
    seen = []
    while not errors.empty():
        seen.append(errors.get())
    assert seen == []
