"""The ini file: defaults, and one clear line for every kind of mistake."""

import pytest

from iotd import config
from iotd.tap import load_config


def test_shipped_file_equals_defaults(tmp_path):
    shipped = config.load("etc/iotd.ini")
    assert shipped == config.Config(path="etc/iotd.ini")


def test_values_parse_into_types():
    cfg = config.parse_text("[devicelink]\nport_range = 41000-41010\nmax_links = 5\n"
                            "[push]\nallowed_sources = 10.0.0.0/8, 192.168.1.0/24\nauto_register = no\n")
    assert cfg.devicelink.port_range == (41000, 41010)
    assert cfg.devicelink.max_links == 5
    assert cfg.push.auto_register is False
    assert [str(n) for n in cfg.push.allowed_sources] == ["10.0.0.0/8", "192.168.1.0/24"]


def test_http_connection_limits_default_and_parse():
    assert config.Config().http.max_connections_per_address == 256
    assert config.Config().http.header_timeout == 10.0
    cfg = config.parse_text("[http]\nmax_connections_per_address = 0\nheader_timeout = 2.5\n")
    assert cfg.http.max_connections_per_address == 0  # no limit
    assert cfg.http.header_timeout == 2.5


@pytest.mark.parametrize("text, message", [
    ("[nosuch]\na = 1\n", "iotd: config error: [nosuch]: unknown section"),
    ("[http]\nlisten_on = tcp:1\n", "iotd: config error: [http] listen_on: unknown key"),
    ("[push]\nmax_attempts = many\n", "iotd: config error: [push] max_attempts: expected a whole number, got 'many'"),
    ("[push]\nenabled = maybe\n", "iotd: config error: [push] enabled: expected true or false, got 'maybe'"),
    ("[devicelink]\nport_range = 40100-40000\n", "iotd: config error: [devicelink] port_range: range is backwards: 40100 > 40000"),
    ("[iotd]\nlog_level = loud\n", "iotd: config error: [iotd] log_level: expected debug, info, warn or error, got 'loud'"),
    ("[push]\nallowed_sources = 10.0.0.300/8\n", "iotd: config error: [push] allowed_sources: not a CIDR network: '10.0.0.300/8'"),
    ("[http]\nlisten = ssl:8443:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem\n",
     "iotd: config error: [http] listen: cannot read privateKey file '/nonexistent/k.pem'"),
    ("[http]\nlisten = carrier-pigeon:1\n", "iotd: config error: [http] listen: unknown endpoint type 'carrier-pigeon' in 'carrier-pigeon:1'"),
    ("[http]\nmax_connections_per_address = -1\n",
     "iotd: config error: [http] max_connections_per_address: must be at least 0, got -1"),
    ("[http]\nheader_timeout = 0\n", "iotd: config error: [http] header_timeout: must be at least 0.001, got 0"),
])
def test_errors_name_section_and_key(text, message):
    with pytest.raises(config.ConfigError) as info:
        config.parse_text(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_plugin_turns_errors_into_systemexit_line(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[websocket]\nmax_buffer_bytes = -1\n")
    with pytest.raises(SystemExit) as info:
        load_config(str(bad))
    assert str(info.value) == f"iotd: config error: {bad}: [websocket] max_buffer_bytes: must be at least 1024, got -1"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        load_config(str(tmp_path / "nope.ini"))
    assert "cannot read config file" in str(info.value)


def test_cluster_keys_are_checked():
    cfg = config.parse_text("[cluster]\nnode = a-1\nbus = redis://:pw@127.0.0.1:6380/3\n")
    assert cfg.cluster.node == "a-1" and cfg.cluster.bus.endswith("/3")
    for text, why in [("[cluster]\nbus = http://x\n", "[cluster] bus: expected empty"),
                      ("[cluster]\nbus = redis://h:port/0\n", "[cluster] bus: the port is not a number"),
                      ("[cluster]\nbus = redis://h/db\n", "[cluster] bus: the database must be a number"),
                      ("[cluster]\nnode = a b\n", "[cluster] node: expected letters")]:
        try:
            config.parse_text(text)
        except config.ConfigError as e:
            assert why in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(text)


def test_mqtt_keys_are_checked(tmp_path):
    cfg = config.parse_text("[mqtt]\nbroker = tls:host=broker.example\nqos = 0\ntopic_prefix = site/a\n")
    assert (cfg.mqtt.broker.kind, cfg.mqtt.broker.host, cfg.mqtt.broker.port) == ("tls", "broker.example", 8883)
    assert cfg.mqtt.qos == 0 and cfg.mqtt.topic_prefix == "site/a"
    assert config.Config().mqtt.broker is None  # off by default
    assert config.parse_text("[mqtt]\nbroker = unix:/run/m.sock\n").mqtt.broker.host == "/run/m.sock"
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    for text, message in [
        ("broker = http://x", "[mqtt] broker: expected a tcp:, tls: or unix: client endpoint, got 'http'"),
        ("broker = tcp:host=x:port=99999", "[mqtt] broker: port must be 1-65535, got '99999'"),
        ("broker = tcp:host=x:port=1:colour=red", "[mqtt] broker: unknown parameter 'colour' for tcp:"),
        ("broker = tls:host=x:trustRoots=/nonexistent.pem", "[mqtt] broker: cannot read trustRoots '/nonexistent.pem'"),
        ("qos = 2", "[mqtt] qos: expected 0 or 1, got '2'"),
        ("topic_prefix = a/+/b", "[mqtt] topic_prefix: expected topic levels without wildcards"),
        ("keepalive = 1", "[mqtt] keepalive:"),
        (f"password_file = {secret}", f"[mqtt] password_file: '{secret}' is readable by others (mode 644): chmod 600 it"),
        ("password_file = /nonexistent", "[mqtt] password_file: cannot read '/nonexistent'"),
    ]:
        with pytest.raises(config.ConfigError) as e:
            config.parse_text(f"[mqtt]\n{text}\n")
        assert str(e.value).startswith("iotd: config error: " + message), str(e.value)
    secret.chmod(0o600)
    assert config.parse_text(f"[mqtt]\npassword_file = {secret}\n").mqtt.password_file == str(secret)


def test_devicelink_splice_is_auto_or_off():
    assert config.parse_text("[devicelink]\nsplice = off\n").devicelink.splice is False
    with pytest.raises(config.ConfigError) as e:
        config.parse_text("[devicelink]\nsplice = maybe\n")
    assert str(e.value) == "iotd: config error: [devicelink] splice: expected auto or off, got 'maybe'"
