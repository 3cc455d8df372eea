"""Which device addresses a link may reach (``[devicelink] allowed_device_networks``).

A key with ``devices:create`` and ``deviceLink:create`` chooses where a link
connects, so the rule is what stops it from reaching the daemon's own ports
or other local services (server-side request forgery).

Choices made:

- **Empty networks** (the default): every address except loopback
  (127.0.0.0/8, ::1), unspecified (the whole 0.0.0.0/8 "this network" block,
  since Linux routes 0.0.0.0 to the local host; ::), link-local
  (169.254.0.0/16, fe80::/10) and IPv4-mapped forms of those.
- **Explicit networks**: only addresses inside them; loopback too when listed
  (for example ``127.0.0.0/8``).
- An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is checked as the IPv4
  address it reaches, under both rules.
- **Host names** are resolved when a TCP link's client connects
  (:func:`resolve`: ``getaddrinfo`` through the reactor's name resolver, every
  address it returns).  Addresses outside the rule are skipped; when none is
  left the client is refused.  The relay connects to the first allowed
  address itself and never resolves again, so a name cannot change its
  answer between the check and the connect.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable

from twisted.internet import defer
from twisted.internet.interfaces import IResolutionReceiver
from zope.interface import implementer

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOCAL_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::1/128", "::/128", "fe80::/10")
)


def literal(host: str) -> Address | None:
    """``host`` as an IP address, or None when it is a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _reached(address: Address) -> Address:
    """The address a connect really reaches (IPv4-mapped IPv6 is IPv4)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


class DevicePolicy:
    """``allows(address)`` under ``[devicelink] allowed_device_networks``."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)

    def allows(self, address: Address | str) -> bool:
        if isinstance(address, str):
            parsed = literal(address)
            if parsed is None:
                return False
            address = parsed
        address = _reached(address)
        if self.networks:
            return any(address in net for net in self.networks)
        return not any(address in net for net in LOCAL_NETWORKS)

    def rule(self) -> str:
        """The rule in words, for error messages and logs."""
        if self.networks:
            return "outside [devicelink] allowed_device_networks"
        return ("a loopback, unspecified or link-local address, which an empty "
                "[devicelink] allowed_device_networks excludes")


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self, d: defer.Deferred[list[str]]) -> None:
        self._d = d
        self._hosts: list[str] = []

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        host = getattr(address, "host", None)
        if host is not None and host not in self._hosts:
            self._hosts.append(host)

    def resolutionComplete(self) -> None:
        self._d.callback(self._hosts)


def resolve(reactor: Any, host: str, port: int) -> defer.Deferred[list[str]]:
    """Every address ``host`` resolves to for a TCP connect (empty when it does not resolve)."""
    if literal(host) is not None:
        return defer.succeed([host])
    d: defer.Deferred[list[str]] = defer.Deferred()
    reactor.nameResolver.resolveHostName(_Collector(d), host, portNumber=port, transportSemantics="TCP")
    return d
