"""``[mqtt] broker``: a Twisted client endpoint string, read into what the MQTT client connects to.

The client (:mod:`iotd.mqtt.connection`) is paho's, which opens its own
socket, so iotd reads the endpoint string rather than handing it to
``clientFromString``.  The forms a user of Twisted knows are accepted:

- ``tcp:host=H:port=P`` (or ``tcp:H:P``), optional ``timeout=S``;
- ``tls:host=H:port=P`` (or ``tls:H:P``; port 8883 when omitted), with
  ``trustRoots=PATH`` (a PEM file or a directory of them; default: the
  system's roots), and ``certificate=PEM`` + ``privateKey=PEM`` for a client
  certificate;
- ``unix:path=/run/mosquitto.sock`` (or ``unix:/run/...``).

``\\:`` escapes a colon inside a value, as in Twisted.  Anything else is a
config error naming the part that is wrong.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import attrs


@attrs.frozen
class Broker:
    kind: str  # "tcp", "tls" or "unix"
    host: str  # the host name, or the socket's path for unix
    port: int = 0
    timeout: float = 10.0
    trust_roots: str | None = None
    certificate: str | None = None
    private_key: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of a ``tls:`` broker: verify its certificate and its host name."""
        roots = self.trust_roots
        if roots is None:
            context = ssl.create_default_context()
        elif os.path.isdir(roots):
            context = ssl.create_default_context(capath=roots)
        else:
            context = ssl.create_default_context(cafile=roots)
        if self.certificate:
            context.load_cert_chain(self.certificate, self.private_key)
        return context

    def __str__(self) -> str:
        return self.host if self.kind == "unix" else f"{self.kind}:{self.host}:{self.port}"


def _split(text: str) -> list[str]:
    parts, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port must be 1-65535, got {text!r}")
    return int(text)


def _readable(name: str, path: str) -> str:
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {name} {path!r}")
    return path


def parse(text: str) -> Broker | None:
    """The broker of ``text``, None when it is empty (MQTT off); ValueError names what is wrong."""
    text = text.strip()
    if not text:
        return None
    kind, *rest = _split(text)
    if kind not in ("tcp", "tls", "unix"):
        raise ValueError(f"expected a tcp:, tls: or unix: client endpoint, got {kind!r}")
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in rest:
        if "=" in part:
            name, value = part.split("=", 1)
            named[name] = value
        else:
            positional.append(part)
    if kind == "unix":
        path = named.pop("path", positional[0] if positional else "")
        if not path:
            raise ValueError("unix: needs path=")
        named.pop("timeout", None)
        if named:
            raise ValueError(f"unknown parameter {sorted(named)[0]!r} for unix:")
        return Broker("unix", path)
    host = named.pop("host", positional[0] if positional else "")
    if not host:
        raise ValueError(f"{kind}: needs host=")
    port_text = named.pop("port", positional[1] if len(positional) > 1 else ("8883" if kind == "tls" else ""))
    if not port_text:
        raise ValueError("tcp: needs port=")
    args: dict[str, Any] = {"port": _port(port_text)}
    if "timeout" in named:
        try:
            args["timeout"] = float(named.pop("timeout"))
        except ValueError:
            raise ValueError("timeout must be a number of seconds") from None
    if kind == "tls":
        for name, field in (("trustRoots", "trust_roots"), ("certificate", "certificate"),
                            ("privateKey", "private_key")):
            if name in named:
                args[field] = _readable(name, named.pop(name))
        if args.get("certificate") and not args.get("private_key"):
            args["private_key"] = args["certificate"]  # both in one PEM file, as Twisted allows
    if named:
        raise ValueError(f"unknown parameter {sorted(named)[0]!r} for {kind}:")
    return Broker(kind, host, **args)
