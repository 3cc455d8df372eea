"""What an ingested packet, reading or OTA report may hold: the checks shared by REST and MQTT.

Each check takes one item (already parsed by :func:`iotd.jsonsafe.loads`:
no lone surrogate, NaN, Infinity or overflowing number) and the current time
as ISO text, and returns the event's data or raises :class:`iotd.errors.Invalid`
naming the field.  A reading's ``data`` holds at most :data:`MAX_DATA_KEYS`
keys (each key becomes a frame on a subscription socket).  Used by
:mod:`iotd.web.ingest` and :mod:`iotd.mqtt.payloads`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from iotd import errors
from iotd.timefmt import iso, parse_iso

MAX_BATCH = 1000
MAX_DATA_KEYS = 1000
_MAX_ID = 2**63 - 1  # SQLite's largest integer
_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})*$")
ENCODINGS = ("binary", "utf8", "json", "none")


def _object(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.Invalid(f"{name} must be an object")
    return value


def _time(value: Any, name: str, now: str) -> str:
    if value is None:
        return now
    try:
        return iso(parse_iso(value))
    except (ValueError, TypeError, OverflowError):
        raise errors.Invalid(f"{name} must be an ISO 8601 date-time") from None


def packet(item: Any, now: str) -> dict[str, Any]:
    errors.require_object(item, {"payload", "payload_encoding", "meta", "transceived_at", "interface",
                                 "interface_id", "packet_type"}, "a packet")
    payload = item.get("payload")
    encoding = item.get("payload_encoding")
    if encoding is None:
        encoding = "none" if payload is None else "utf8" if isinstance(payload, str) else "json"
    if encoding not in ENCODINGS:
        raise errors.Invalid(f"payload_encoding must be one of {', '.join(ENCODINGS)}")
    if encoding == "binary" and not (isinstance(payload, str) and _HEX.match(payload)):
        raise errors.Invalid("payload must be a hex string for payload_encoding binary")
    if encoding == "utf8" and not isinstance(payload, str):
        raise errors.Invalid("payload must be a string for payload_encoding utf8")
    if encoding == "none" and payload is not None:
        raise errors.Invalid("payload must be null for payload_encoding none")
    interface = item.get("interface", item.get("interface_id"))
    if interface is not None and not isinstance(interface, str):
        raise errors.Invalid("interface must be a string")
    packet_type = item.get("packet_type", "up")
    if not isinstance(packet_type, str) or not packet_type:
        raise errors.Invalid("packet_type must be a string")
    return {
        "interface_id": interface,
        "transceived_at": _time(item.get("transceived_at"), "transceived_at", now),
        "payload_encoding": encoding,
        "payload": payload.lower() if encoding == "binary" else payload,
        "packet_type": packet_type,
        "meta": _object(item.get("meta"), "meta"),
    }


def _point(value: Any) -> dict | None:
    if value is None:
        return None
    ok = (
        isinstance(value, dict)
        and value.get("type") == "Point"
        and isinstance(value.get("coordinates"), list)
        and len(value["coordinates"]) in (2, 3)
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in value["coordinates"])
    )
    if not ok:
        raise errors.Invalid("location must be a GeoJSON point")
    return value


def reading(item: Any, now: str) -> dict[str, Any]:
    errors.require_object(item, {"data", "measured_at", "packet_id", "meta", "location"}, "a reading")
    data = item.get("data")
    if not isinstance(data, dict):
        raise errors.Invalid("data must be an object")
    if len(data) > MAX_DATA_KEYS:
        raise errors.Invalid(f"data has {len(data)} keys, at most {MAX_DATA_KEYS} are allowed")
    packet_id = item.get("packet_id")
    if packet_id is not None and (not isinstance(packet_id, int) or isinstance(packet_id, bool)
                                  or not 1 <= packet_id <= _MAX_ID):
        raise errors.Invalid("packet_id must be the id of a packet (a positive integer)")
    return {
        "packet_id": packet_id,
        "parser_id": None,
        "measured_at": _time(item.get("measured_at"), "measured_at", now),
        "data": data,
        "location": _point(item.get("location")),
        "meta": _object(item.get("meta"), "meta"),
    }


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 2**53:
        raise errors.Invalid(f"{name} must be an integer")
    return value


def ota(item: Any, now: str) -> dict[str, Any]:
    errors.require_object(item, {"status", "step", "detail"}, "an OTA report")
    detail = item.get("detail", "")
    if not isinstance(detail, str):
        raise errors.Invalid("detail must be a string")
    return {
        "status": _int(item.get("status"), "status"),
        "step": _int(item.get("step", 0), "step"),
        "detail": detail,
        "reported_at": now,
    }


# event kind -> its check
CHECKS: dict[str, Callable[[Any, str], dict[str, Any]]] = {"packet": packet, "reading": reading, "ota": ota}
