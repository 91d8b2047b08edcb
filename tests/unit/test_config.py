"""Config loading: defaults, overrides, and errors that name the key."""

import re
from dataclasses import replace

import pytest
from paths import REPO

from defang.core import config
from defang.core.configcheck import timeout_warnings


def test_shipped_config_loads_and_finds_the_default_filter(tmp_path):
    cfg = config.load(REPO / "etc" / "defang.toml", runtime_dir=str(tmp_path))
    assert cfg.filter == REPO / "filters" / "filter.py"
    assert cfg.milter_socket == f"unix:{tmp_path}/milter.sock"
    assert cfg.spool_dir == tmp_path / "spool"
    assert cfg.on_filter_error.code == "451" and cfg.on_filter_error.dsn == "4.3.0"


def test_every_option_is_documented_in_the_shipped_file():
    import tomllib

    data = tomllib.loads((REPO / "etc" / "defang.toml").read_text())
    present = {(s, k) for s, t in data.items() for k in t}
    assert present == set(config.KEYS), "etc/defang.toml must list every option"


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[multiplexor]\nworkerz = 3\n")
    with pytest.raises(config.ConfigError, match=r"unknown option \[multiplexor\] workerz"):
        config.load(p)


def test_bad_value_names_the_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[replies]\non_busy = { code = "250", dsn = "2.0.0", text = "hm" }\n')
    with pytest.raises(config.ConfigError, match="on_busy"):
        config.load(p)


def test_overrides_and_socket_specs(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[daemon]\nfilter = "f.py"\n')
    cfg = config.load(p, socket="inet:9999@127.0.0.1", runtime_dir=str(tmp_path))
    assert cfg.filter == tmp_path / "f.py"  # relative to the config file
    assert cfg.milter_socket == "inet:9999@127.0.0.1"
    with pytest.raises(config.ConfigError, match="expected unix:/absolute/path"):
        config.load(p, socket="tcp:localhost")


def test_a_reply_text_with_cr_is_refused(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[replies]\non_busy = { code = "451", dsn = "4.3.2", text = "busy\\r\\n250 OK" }\n')
    with pytest.raises(config.ConfigError, match="text may not contain CR or NUL"):
        config.load(p)


def test_state_and_greylist_options_are_checked(tmp_path):
    from defang.core.config import ConfigError, load

    cases = {'[state]\non_error = "drop"\n': '[state] on_error = \'drop\': expected "tempfail" or "accept"',
             '[state]\nbackend = "memcached"\n': 'expected "sqlite" or "redis"',
             '[state]\nredis_url = "10.0.0.5:6379"\n': "expected a Redis URL",
             "[greylist]\nipv4_prefix = 33\n": "expected a prefix length from 0 to 32",
             "[greylist]\ndelay = -1\n": "expected a non-negative number"}  # fmt: skip
    for text, why in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(why)):
            load(path)
    path.write_text(f'[daemon]\nruntime_dir = "{tmp_path}"\n')
    assert load(path).state_path == tmp_path / "state.sqlite3"


def test_the_shipped_timeouts_fit_under_busy_timeout_with_every_scanner_configured(tmp_path):
    cfg = config.load(REPO / "etc" / "defang.toml", runtime_dir=str(tmp_path))
    both = replace(cfg, spamassassin_address="inet:783@127.0.0.1", clamav_address="inet:3310@127.0.0.1",
                   rspamd_address="inet:11333@127.0.0.1")  # fmt: skip
    assert timeout_warnings(both) == []
    assert (both.spamassassin_timeout + both.clamav_timeout + both.rspamd_timeout + both.dns_lifetime
            < both.busy_timeout)  # fmt: skip
    # a scanner that is not configured is never waited for
    assert timeout_warnings(replace(cfg, clamav_timeout=600)) == []
    [line] = timeout_warnings(replace(both, busy_timeout=55))
    assert line.startswith("config: [multiplexor] busy_timeout 55 is not above [spamassassin] timeout 20 + "
                           "[clamav] timeout 20 + [rspamd] timeout 10 + [dns] lifetime 5 = 55 s")  # fmt: skip


def test_verify_options_and_the_probe_fitting_under_busy_timeout(tmp_path):
    cfg = config.load(REPO / "etc" / "defang.toml", runtime_dir=str(tmp_path))
    assert (cfg.verify_host, cfg.verify_on_error, cfg.verify_timeout) == ("", "tempfail", 10.0)
    probing = replace(cfg, verify_host="10.0.0.7")
    assert timeout_warnings(probing) == [] and timeout_warnings(replace(cfg, verify_timeout=600)) == []
    [line] = timeout_warnings(replace(probing, verify_timeout=56))
    assert line.startswith("config: [multiplexor] busy_timeout 60 is not above [verify] timeout 56 + "
                           "2 x [state] timeout 2 = 60 s")  # fmt: skip
    path = tmp_path / "v.toml"
    bad = (('sender = "a@b\\r\\nRSET"', "[verify] sender = 'a@b\\r\\nRSET': expected one word"),
           ('helo = "x y"', "[verify] helo = 'x y': expected one word"),
           ('on_error = "reject"', "[verify] on_error"), ("port = 0", "[verify] port"))
    for text, why in bad:
        path.write_text(f'[daemon]\nruntime_dir = "{tmp_path}"\n[verify]\n{text}\n')
        with pytest.raises(config.ConfigError, match=re.escape(why)):
            config.load(path)


def test_each_option_is_declared_once_and_config_is_made_from_the_declarations():
    from dataclasses import fields

    from defang.core.options import SECTIONS

    declared = [(s.SECTION, s.KEYS[f.name]) for s in SECTIONS for f in fields(s)]
    assert len(declared) == len(set(declared)) == len(config.KEYS)
    flat = {s.FLAT[f.name]: f.default for s in SECTIONS for f in fields(s)}
    cfg = config.Config()
    assert {f.name for f in fields(config.Config)} == set(flat) | {"source"}
    assert all(getattr(cfg, name) == default for name, default in flat.items())


def test_engines_take_their_section_as_loaded(tmp_path):
    from defang.workers.api.services import ServiceSettings
    from defang.workers.checks.resolver import DnsSettings
    from defang.workers.checks.smtpverify import VerifySettings
    from defang.workers.mime.limits import MimeLimits
    from defang.workers.stores.state import StateSettings

    p = tmp_path / "c.toml"
    p.write_text('[mime]\nmax_parts = 7\n[dns]\ntimeout = 1.5\n[state]\nbackend = "redis"\n'
                 '[greylist]\nauto_allow = 9\n[clamav]\naddress = "inet:3310@127.0.0.1"\ntimeout = 4\n'
                 '[notify]\nfrom = "filter@example.org"\n[spamassassin]\nadd_received = false\n'
                 '[verify]\nhost = "10.0.0.7"\nnegative_ttl = 60\n')  # fmt: skip
    cfg = config.load(p, runtime_dir=str(tmp_path))
    assert cfg.section(MimeLimits) == MimeLimits(max_parts=7) and MimeLimits is config.MimeSection
    assert cfg.section(DnsSettings).timeout == 1.5
    assert cfg.section(StateSettings).path == tmp_path / "state.sqlite3"
    services = ServiceSettings.from_config(cfg)
    assert services.state.backend == "redis" and services.greylist.auto_allow == 9
    assert services.auth.dns_timeout == 1.5 and services.auth.dkim_body_canonicalization == "relaxed"
    assert services.scans.clamav.address == "inet:3310@127.0.0.1" and services.scans.clamav.timeout == 4
    assert services.scans.spamassassin.received is False and services.scans.rspamd.off
    assert services.notify_from == "filter@example.org" and services.administrator == "postmaster"
    assert services.verify == VerifySettings(host="10.0.0.7", negative_ttl=60)
    assert VerifySettings is config.VerifySection
