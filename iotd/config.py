"""The ini file, validated once at start-up into frozen attrs classes.

Every section and key the daemon knows is listed here with its type and
default; nothing else reads the file.  A mistake raises :class:`ConfigError`
whose text is one line: ``iotd: config error: [section] key: why``.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import socket
import urllib.parse
from typing import Any, Callable

import attrs

from iotd.mqtt import settings as mqtt_settings


class ConfigError(Exception):
    """A bad config file; ``str()`` is the one line printed to the user."""

    def __init__(self, section: str, key: str | None, why: str, path: str | None = None):
        where = f"[{section}]" + (f" {key}" if key else "")
        prefix = f"{path}: " if path else ""
        super().__init__(f"iotd: config error: {prefix}{where}: {why}")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _int_min(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _float_min(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not value >= minimum:
            raise ValueError(f"must be at least {minimum:g}, got {text.strip()}")
        return value

    return parse


def _text(text: str) -> str:
    return text.strip()


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _endpoints(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    for word in words:
        kind = word.split(":", 1)[0]
        if kind not in ("tcp", "tcp6", "ssl", "unix", "systemd"):
            raise ValueError(f"unknown endpoint type {kind!r} in {word!r}")
        if kind == "ssl":
            for part in word.split(":")[1:]:
                if "=" in part:
                    name, value = part.split("=", 1)
                    if name in ("privateKey", "certKey", "extraCertChain", "caCertsDir") and not os.access(value, os.R_OK):
                        raise ValueError(f"cannot read {name} file {value!r}")
    return words


def _cidrs(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for word in text.replace(",", " ").split():
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"not a CIDR network: {word!r}") from None
    return tuple(nets)


def _port_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.strip().split("-"))
    except ValueError:
        raise ValueError(f"expected LOW-HIGH, got {text!r}") from None
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise ValueError("ports must be 1-65535")
    if low > high:
        raise ValueError(f"range is backwards: {low} > {high}")
    return (low, high)


def _store_url(text: str) -> str:
    url = text.strip()
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected empty (SQLite in data_dir) or a postgresql:// URL")
    return url


def _bus_url(text: str) -> str:
    url = text.strip()
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("expected empty (one node, in-process) or a redis:// or rediss:// URL")
    try:
        parts.port
    except ValueError:
        raise ValueError("the port is not a number") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database must be a number, got {db!r}")
    return url


def _node_name(text: str) -> str:
    name = text.strip()
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise ValueError("expected letters, digits, '.', '_' or '-' (at most 63)")
    return name


def _splice(text: str) -> bool:
    word = text.strip().lower()
    if word not in ("auto", "off"):
        raise ValueError(f"expected auto or off, got {text!r}")
    return word == "auto"


def _level(text: str) -> str:
    low = text.strip().lower()
    if low not in ("debug", "info", "warn", "error"):
        raise ValueError(f"expected debug, info, warn or error, got {text!r}")
    return low


@attrs.frozen
class IotdSection:
    data_dir: str = "var"
    tenant: str = "default"
    log_level: str = "info"


@attrs.frozen
class HttpSection:
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    max_body_bytes: int = 1048576
    cors_origins: tuple[str, ...] = ()
    max_connections_per_address: int = 256
    header_timeout: float = 10.0
    console: bool = True  # the web console at /console/ (false: 404)


@attrs.frozen
class PushSection:
    enabled: bool = True
    command_timeout: float = 60.0
    max_attempts: int = 3
    command_ttl: float = 0.0
    offline_after: float = 90.0
    auto_register: bool = True
    tenant: str = "default"
    listen: tuple[str, ...] = ()
    allowed_sources: tuple[Any, ...] = ()
    auto_register_per_minute: int = 600
    max_devices: int = 100000


@attrs.frozen
class DeviceLinkSection:
    enabled: bool = True
    interface: str = "127.0.0.1"
    public_host: str = ""
    port_range: tuple[int, int] = (40000, 40099)
    max_links: int = 100
    connect_timeout: float = 10.0
    default_timeout_ms: int = 0
    unused_ttl: float = 60.0
    allowed_device_networks: tuple[Any, ...] = ()
    require_source: bool = False
    max_links_per_tenant: int = 0
    max_duration_ms: int = 0
    rate_limit: int = 0
    splice: bool = True  # plain TCP links relayed with splice(2) where the platform has it


@attrs.frozen
class WebsocketSection:
    idle_timeout: float = 60.0
    max_buffer_bytes: int = 1048576
    replay_limit: int = 100000
    max_connections: int = 20000
    max_connections_per_address: int = 0
    packet_cache_bytes: int = 67108864


@attrs.frozen
class StoreSection:
    url: str = ""  # empty: SQLite at <data_dir>/iotd.sqlite3
    pool_size: int = 8  # PostgreSQL connections (the writer's and the readers')


@attrs.frozen
class ClusterSection:
    node: str = ""  # empty: the host name
    bus: str = ""  # empty: in-process (one node); redis://host:6379/0 or rediss://

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname()


@attrs.frozen
class MqttSection:
    broker: Any = None  # iotd.mqtt.broker.Broker; None: MQTT off
    client_id: str = ""  # empty: iotd-<node name>
    username: str = ""
    password_file: str = ""  # mode 0600; the password is never in the ini
    topic_prefix: str = "iotd"
    qos: int = 1
    keepalive: int = 30
    auto_register: bool = False


@attrs.frozen
class RetentionSection:
    events_days: float = 30.0


@attrs.frozen
class Config:
    iotd: IotdSection = IotdSection()
    http: HttpSection = HttpSection()
    push: PushSection = PushSection()
    devicelink: DeviceLinkSection = DeviceLinkSection()
    websocket: WebsocketSection = WebsocketSection()
    retention: RetentionSection = RetentionSection()
    store: StoreSection = StoreSection()
    cluster: ClusterSection = ClusterSection()
    mqtt: MqttSection = MqttSection()
    path: str | None = None

    @property
    def database_path(self) -> str:
        return os.path.join(self.iotd.data_dir, "iotd.sqlite3")

    @property
    def store_target(self) -> str:
        """What the store opens: ``[store] url``, or the SQLite file when it is empty."""
        return self.store.url or self.database_path

    @property
    def store_backend(self) -> str:
        return "postgresql" if self.store.url else "sqlite"

    @property
    def admin_key_path(self) -> str:
        return os.path.join(self.iotd.data_dir, "admin.key")


# section -> (attrs class, {key: parser})
SCHEMA: dict[str, tuple[type, dict[str, Callable[[str], Any]]]] = {
    "iotd": (IotdSection, {"data_dir": _nonempty, "tenant": _nonempty, "log_level": _level}),
    "http": (
        HttpSection,
        {"listen": _endpoints, "max_body_bytes": _int_min(1), "cors_origins": _words,
         "max_connections_per_address": _int_min(0), "header_timeout": _float_min(0.001),
         "console": _bool},
    ),
    "push": (
        PushSection,
        {
            "enabled": _bool,
            "command_timeout": _float_min(0.001),
            "max_attempts": _int_min(1),
            "command_ttl": _float_min(0.0),
            "offline_after": _float_min(0.001),
            "auto_register": _bool,
            "tenant": _nonempty,
            "listen": _endpoints,
            "allowed_sources": _cidrs,
            "auto_register_per_minute": _int_min(0),
            "max_devices": _int_min(0),
        },
    ),
    "devicelink": (
        DeviceLinkSection,
        {
            "enabled": _bool,
            "interface": _nonempty,
            "public_host": _text,
            "port_range": _port_range,
            "max_links": _int_min(1),
            "connect_timeout": _float_min(0.001),
            "default_timeout_ms": _int_min(0),
            "unused_ttl": _float_min(0.001),
            "allowed_device_networks": _cidrs,
            "require_source": _bool,
            "max_links_per_tenant": _int_min(0),
            "max_duration_ms": _int_min(0),
            "rate_limit": _int_min(0),
            "splice": _splice,
        },
    ),
    "websocket": (
        WebsocketSection,
        {
            "idle_timeout": _float_min(0.001),
            "max_buffer_bytes": _int_min(1024),
            "replay_limit": _int_min(1),
            "max_connections": _int_min(1),
            "max_connections_per_address": _int_min(0),
            "packet_cache_bytes": _int_min(0),
        },
    ),
    "retention": (RetentionSection, {"events_days": _float_min(0)}),
    "store": (StoreSection, {"url": _store_url, "pool_size": _int_min(2)}),
    "cluster": (ClusterSection, {"node": _node_name, "bus": _bus_url}),
    "mqtt": (
        MqttSection,
        {"broker": mqtt_settings.broker, "client_id": _text, "username": _text,
         "password_file": mqtt_settings.secret_file, "topic_prefix": mqtt_settings.topic_prefix,
         "qos": mqtt_settings.qos, "keepalive": _int_min(5), "auto_register": _bool},
    ),
}


def parse_text(text: str, path: str | None = None) -> Config:
    """Parse ini text into a :class:`Config`, or raise :class:`ConfigError`."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), strict=True
    )
    parser.optionxform = str  # keys are case-sensitive, as documented
    try:
        parser.read_string(text, source=path or "<config>")
    except configparser.DuplicateOptionError as e:
        raise ConfigError(e.section, e.option, "given twice", path) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(e.section, None, "section given twice", path) from None
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise ConfigError("?", None, f"not an ini file: {first}", path) from None
    sections: dict[str, Any] = {}
    for section in parser.sections():
        if section not in SCHEMA:
            raise ConfigError(section, None, "unknown section", path)
        cls, keys = SCHEMA[section]
        values = {}
        for key, raw in parser.items(section):
            if key not in keys:
                raise ConfigError(section, key, "unknown key", path)
            try:
                values[key] = keys[key](raw)
            except ValueError as e:
                raise ConfigError(section, key, str(e), path) from None
        sections[section] = cls(**values)
    return Config(path=path, **sections)


def load(path: str | None) -> Config:
    """Read and validate the file at ``path``; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("iotd", None, f"cannot read config file: {e.strerror}", path) from None
    return parse_text(text, path)
