"""Devices and streams as the registry keeps them, and the checks of what a client may write.

Identifiers are case-insensitive and kept upper-case
(:func:`normalize_identifier`); an ID given as a string or a number compares
as text (:func:`id_text`).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import attrs

from iotd import errors
from iotd.timefmt import iso

PUSH_ID_MIN, PUSH_ID_MAX = -(2**63), 2**63 - 1

# field -> (check, message) for the client-writable fields of a device
_STR = (lambda v: v is None or (isinstance(v, str) and len(v) <= 1000), "a string")


def _is_port(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": _STR,
    "host": _STR,
    "productID": _STR,
    "deviceName": _STR,
    "projectID": (lambda v: v is None or isinstance(v, (str, int)) and not isinstance(v, bool), "a string"),
    "areaID": (lambda v: v is None or isinstance(v, (str, int)) and not isinstance(v, bool), "a string"),
    "pushId": (
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and PUSH_ID_MIN <= v <= PUSH_ID_MAX),
        "a signed 64-bit integer",
    ),
    "ports": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_port(p) for k, p in v.items()),
              "an object of name: port (1-65535)"),
    "tags": (lambda v: isinstance(v, list) and all(isinstance(t, str) and t for t in v), "a list of strings"),
    "fields": (lambda v: isinstance(v, dict), "an object"),
    "interfaces": (lambda v: isinstance(v, list) and all(isinstance(i, dict) for i in v), "a list of objects"),
    # how its commands reach it: "push" (it polls GET /push; also when unset) or "mqtt" (iotd.mqtt)
    "transport": (lambda v: v is None or v in ("push", "mqtt"), '"push", "mqtt" or null'),
}


def id_text(value: Any) -> str | None:
    """An ID given as a string or a number, as the string it is compared by (None: no ID)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def normalize_identifier(identifier: str) -> str:
    if not isinstance(identifier, str) or not identifier.strip() or len(identifier) > 200:
        raise errors.Invalid("identifier must be 1-200 characters")
    if "/" in identifier:
        raise errors.Invalid("identifier must not contain '/'")
    return identifier.strip().upper()


@attrs.define(eq=False)
class Device:
    tenant: str
    identifier: str
    name: str | None = None
    pushId: int | None = None
    host: str | None = None
    ports: dict[str, int] = attrs.Factory(dict)
    tags: list[str] = attrs.Factory(list)
    productID: str | None = None
    deviceName: str | None = None
    projectID: str | None = None
    areaID: str | None = None
    fields: dict[str, Any] = attrs.Factory(dict)
    interfaces: list[dict] = attrs.Factory(list)
    transport: str | None = None  # None or "push": /push; "mqtt": published on its commands topic
    online: bool = False
    lastSeen: int | None = None  # micros
    lastAddress: str | None = None
    stored_seen: int | None = attrs.field(default=None, init=False, repr=False)  # lastSeen as last flushed
    _selectors: tuple | None = attrs.field(default=None, init=False, repr=False)

    @property
    def selectors(self) -> tuple[tuple[str, ...], ...]:
        """The subscription selectors this device matches: ``("pd", productID, deviceName)``,
        and ``("p", projectID)`` / ``("pa", projectID, areaID)`` when it has them."""
        sels = self._selectors
        if sels is None:
            out: list[tuple[str, ...]] = [("pd", self.product_id, self.device_name)]
            project = id_text(self.projectID)
            if project is not None:
                out.append(("p", project))
                area = id_text(self.areaID)
                if area is not None:
                    out.append(("pa", project, area))
            sels = self._selectors = tuple(out)
        return sels

    @property
    def product_id(self) -> str:
        """``productID`` for the subscription protocol (the identifier if unset)."""
        return self.productID if self.productID else self.identifier

    @property
    def device_name(self) -> str:
        return self.deviceName if self.deviceName else self.identifier

    def doc(self) -> dict[str, Any]:
        """What the store keeps."""
        out = {f: getattr(self, f) for f in _FIELDS}
        out.update(online=self.online, lastSeen=self.lastSeen, lastAddress=self.lastAddress)
        return out

    def to_json(self) -> dict[str, Any]:
        out = {"identifier": self.identifier}
        for f in _FIELDS:
            out[f] = getattr(self, f)
        out["online"] = self.online
        out["lastSeen"] = iso(self.lastSeen) if self.lastSeen is not None else None
        out["lastAddress"] = self.lastAddress
        return out


def validate_device_body(body: Any) -> dict[str, Any]:
    """The client-writable fields of a PUT body, checked; raises Invalid."""
    if not isinstance(body, dict):
        raise errors.Invalid("body must be a JSON object")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("identifier", "online", "lastSeen", "lastAddress"):
            continue  # read-only fields echoed back by a client are ignored
        if key not in _FIELDS:
            raise errors.Invalid(f"unknown field {key!r}")
        check, what = _FIELDS[key]
        if not check(value):
            raise errors.Invalid(f"{key} must be {what}")
        if key in ("projectID", "areaID") and value is not None:
            value = str(value)
        out[key] = copy.deepcopy(value)
    if "tags" in out:
        out["tags"] = list(dict.fromkeys(out["tags"]))
    return out


@attrs.define
class Stream:
    tenant: str
    id: str
    devices: list[str] = attrs.Factory(list)
    tags: list[str] = attrs.Factory(list)
    _device_set: frozenset[str] = attrs.field(init=False, repr=False)
    _tag_set: frozenset[str] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._device_set = frozenset(self.devices)
        self._tag_set = frozenset(self.tags)

    def names(self, identifier: str) -> bool:
        """Is ``identifier`` listed in ``devices``?"""
        return identifier in self._device_set

    def contains(self, device: Device) -> bool:
        return device.identifier in self._device_set or not self._tag_set.isdisjoint(device.tags)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "devices": list(self.devices), "tags": list(self.tags)}
