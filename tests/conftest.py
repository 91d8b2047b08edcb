"""Test levels, one folder each (see tests/README.md); helpers for all of them in support/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402


def _nsd_missing() -> bool:
    return shutil.which("nsd") is None and not Path("/usr/sbin/nsd").exists()


@pytest.fixture(scope="session")
def keydir():
    """DKIM keys made for this run (authzones.key)."""
    from authzones import share_with_daemons

    d = Path(tempfile.mkdtemp(prefix="defang-keys-"))
    share_with_daemons(d, 0o750)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ns(keydir):
    """NSD on loopback serving the test zones (support/authzones.py), for the session."""
    if _nsd_missing():
        pytest.skip("nsd not installed (scripts/bootstrap installs it)")
    from authzones import zones

    from defang.testbed.dns import Nsd

    with Nsd(zones(keydir)) as server:
        yield server


@pytest.fixture(scope="session")
def dns_config(ns, keydir, tmp_path_factory):
    """A defang.toml whose [dns] is the test server (never the system's resolver), with
    relay.test's DKIM and ARC keys: for every test that runs a filter using defang.auth;
    its [state] is a file of its own (a root test never writes /var/lib/defang's)."""
    from authzones import key

    relay = key("relay", keydir)[0]
    path = tmp_path_factory.mktemp("dnscfg") / "defang.toml"
    path.write_text(f'[dns]\nservers = ["{ns.server}"]\ntimeout = 1\nlifetime = 2\n'
                    f'[state]\npath = "{path.parent / "state.sqlite3"}"\n'  # never the system's state
                    '[auth]\nauthserv_id = "mx.relay.test"\n'
                    f'[dkim]\nkeys = [{{domain = "relay.test", selector = "s2026", key = "{relay}"}}]\n'
                    f'[arc]\nkey = {{domain = "relay.test", selector = "arc", key = "{relay}"}}\n'
                    )  # fmt: skip
    return path
