"""What an ELEMENT event socket says: its URL parameters (``preload``, ``after``) and its frames.

A frame is a JSON array of ``{"event": "packet_added" | "reading_added",
"body": ...}`` elements; the ``device`` and ``packet`` preloads add the
event's device (as ELEMENT shapes it) and, for a reading, its packet.  An
element is serialized once per event and preload set (cached on the event).
"""

from __future__ import annotations

from typing import Any

from iotd import errors
from iotd.events import Event
from iotd.timefmt import parse_iso
from iotd.ws.protocol import dumps

KINDS = ("packet", "reading")
EVENT_NAMES = {"packet": "packet_added", "reading": "reading_added"}

_PRELOADS = {
    "packet": ("device", "device.fields", "device.interfaces"),
    "reading": ("device", "device.fields", "device.interfaces", "packet", "packet.interface"),
}
_IMPLIES = {"device.fields": "device", "device.interfaces": "device", "packet.interface": "packet"}


def parse_preload(text: str | None, kind: str) -> tuple[str, ...]:
    """The canonical preload list (implied names added, sorted); 400 for unknown names."""
    if not text:
        return ()
    names: set[str] = set()
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in _PRELOADS[kind]:
            allowed = ", ".join(_PRELOADS[kind])
            raise errors.BadRequest(f"unknown preload {name!r}; {kind} sockets know {allowed}",
                                    code="invalid_preload")
        names.add(name)
        if name in _IMPLIES:
            names.add(_IMPLIES[name])
    return tuple(sorted(names))


def parse_after(text: str) -> int:
    """``after`` as micros; 400 unless ISO 8601 (a ``+`` decoded to a space is forgiven)."""
    value = text.strip().replace(" ", "+")
    try:
        return parse_iso(value)
    except (ValueError, TypeError, OverflowError):
        raise errors.BadRequest("after must be an ISO 8601 date-time, e.g. 2026-11-23T18:30:00.123456Z",
                                code="invalid_after") from None


def device_doc(device: Any, preload: tuple[str, ...]) -> dict[str, Any] | None:
    """The registry device as ELEMENT shapes it for the ``device`` preload."""
    if device is None:
        return None
    out: dict[str, Any] = {
        "id": device.identifier,
        "name": device.name if device.name is not None else device.identifier,
        "slug": device.identifier.lower(),
        "tags": list(device.tags),
    }
    if "device.fields" in preload:
        out["fields"] = device.fields
    if "device.interfaces" in preload:
        out["interfaces"] = device.interfaces
    return out


def packet_doc(packet: Event | None, device: Any, preload: tuple[str, ...]) -> dict[str, Any] | None:
    if packet is None:
        return None
    out = dict(packet.body())
    if "packet.interface" in preload:
        interface = None
        wanted = out.get("interface_id")
        if wanted is not None and device is not None:
            interface = next((i for i in device.interfaces if i.get("id") == wanted), None)
        out["interface"] = interface
    return out


def item(event: Event, preload: tuple[str, ...], variant: str, device: Any, packet: Event | None) -> bytes:
    """One ``{"event", "body"}`` element, serialized once per event and preload set."""
    key = "el-item:" + variant
    if packet is not None:
        key += f":p{packet.id}"
    cached = event.cache.get(key)
    if cached is not None:
        return cached
    body = event.body()
    if preload:
        body = dict(body)
        if "device" in preload:
            body["device"] = device_doc(device, preload)
        if "packet" in preload:
            body["packet"] = packet_doc(packet, device, preload)
    out = event.cache[key] = dumps({"event": EVENT_NAMES[event.kind], "body": body})
    return out


def plain_frame(event: Event) -> bytes:
    """The frame of the common socket (no preload): one element."""
    return b"[" + item(event, (), "", None, None) + b"]"
