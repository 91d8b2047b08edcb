"""Config loading: defaults, overrides, and errors that name the key."""


import pytest
from paths import REPO

from defang.core import config


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
