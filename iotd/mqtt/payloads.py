"""What a device's MQTT payload means: the event data it becomes, or why it is dropped.

The same checks as REST ingest (:mod:`iotd.ingest_items`), after the
payload passed :func:`iotd.jsonsafe.loads` (no NaN, Infinity, overflowing
number or lone surrogate).  Chosen where the spec is silent:

- ``packets``: a JSON object is the REST packet body (``interface`` is
  ``mqtt`` unless it names one); any other payload is the packet's bytes:
  UTF-8 text as ``utf8``, anything else as ``binary`` (hex), up to the
  broker's message size.
- ``readings``: one REST reading body or an array of 1-1,000.
- ``ota``: ``{"status", "step", "detail"}``.
- ``status``: ``online`` or ``offline`` (any case, surrounding blanks
  ignored; also as a JSON string).
- ``commands/result``: ``{"id", "response"}`` or ``{"id", "error"}``; the
  whole payload is the command's ``resultRaw``.
- A body object may carry ``"id"`` (a string or an integer): a redelivered
  message with the same id for the same device is not stored twice.  In an
  array of readings, the ids of the items together are the message's id.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from iotd import errors, jsonsafe
from iotd.ingest_items import CHECKS, MAX_BATCH

Item = tuple[str, dict[str, Any]]  # (event kind, data)


class Parsed(NamedTuple):
    items: list[Item]
    message_id: str | None  # the device's own id of the message, if it set one


def _json(payload: bytes) -> Any:
    try:
        return jsonsafe.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise errors.Invalid("payload is not JSON") from None


def _take_id(body: dict[str, Any]) -> str | None:
    if "id" not in body:
        return None
    value = body.pop("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value) or len(str(value)) > 200:
        raise errors.Invalid("id must be a string or an integer (at most 200 characters)")
    return str(value)


def _raw_packet(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return {"payload": payload.hex(), "payload_encoding": "binary", "interface": "mqtt"}
    return {"payload": text, "payload_encoding": "utf8", "interface": "mqtt"}


def packets(payload: bytes, now: str) -> Parsed:
    try:
        body = jsonsafe.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return Parsed([("packet", CHECKS["packet"](_raw_packet(payload), now))], None)
    message_id = _take_id(body)
    if body.get("interface") is None and body.get("interface_id") is None:
        body["interface"] = "mqtt"
    return Parsed([("packet", CHECKS["packet"](body, now))], message_id)


def readings(payload: bytes, now: str) -> Parsed:
    body = _json(payload)
    many = isinstance(body, list)
    if many and not 1 <= len(body) <= MAX_BATCH:
        raise errors.Invalid(f"an array must hold 1-{MAX_BATCH} readings")
    if not many and not isinstance(body, dict):
        raise errors.Invalid("a reading must be a JSON object or an array of them")
    items, ids = [], []
    for index, item in enumerate(body if many else [body]):
        if not isinstance(item, dict):
            raise errors.Invalid(f"item {index}: a reading must be a JSON object")
        try:
            own = _take_id(item)
            items.append(("reading", CHECKS["reading"](item, now)))
        except errors.Invalid as e:
            raise errors.Invalid(f"item {index}: {e.message}" if many else e.message) from None
        if own is not None:
            ids.append(own)
    return Parsed(items, ",".join(ids) if ids else None)


def ota(payload: bytes, now: str) -> Parsed:
    body = _json(payload)
    if not isinstance(body, dict):
        raise errors.Invalid("an OTA report must be a JSON object")
    message_id = _take_id(body)
    return Parsed([("ota", CHECKS["ota"](body, now))], message_id)


EVENTS = {"packets": packets, "readings": readings, "ota": ota}


def status(payload: bytes) -> bool:
    """True for ``online``, False for ``offline``."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise errors.Invalid("status must be online or offline") from None
    if text.startswith('"'):
        try:
            text = json.loads(text)
        except ValueError:
            pass
    word = text.strip().lower() if isinstance(text, str) else ""
    if word not in ("online", "offline"):
        raise errors.Invalid("status must be online or offline")
    return word == "online"


def result_id(payload: bytes) -> int:
    """The command id a ``commands/result`` payload answers."""
    body = _json(payload)
    if not isinstance(body, dict):
        raise errors.Invalid("a result must be a JSON object")
    cid = body.get("id")
    if isinstance(cid, str) and cid.isdigit():
        cid = int(cid)
    if not isinstance(cid, int) or isinstance(cid, bool) or not 0 < cid < 2**63:
        raise errors.Invalid("a result must name its command's id")
    if "response" not in body and body.get("error") is None:
        raise errors.Invalid("a result holds response or error")
    return cid
