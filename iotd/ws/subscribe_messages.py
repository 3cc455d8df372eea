"""What a subscription socket says: codes, selectors, answers and the ``down.pub`` messages.

The vocabulary of unitedrhino iThings (``share/websocket``): a subscription
is a ``code`` (:data:`CODES`) and a selector, one device identity form
(``("pd", productID, deviceName)``, ``("pdi", productID, deviceName,
identifier)``, ``("p", projectID)``, ``("pa", projectID, areaID)``); errors
are numeric codes with the server's Chinese messages.
"""

from __future__ import annotations

import json
from typing import Any

from iotd.events import Event
from iotd.registry import id_text
from iotd.timefmt import parse_iso
from iotd.ws.protocol import dumps

# code -> (event kind, resource a key needs `read` on)
CODES = {
    "devicePropertyReport": ("reading", "readings"),
    "devicePropertyReportV2": ("reading", "readings"),
    "devicePublish": ("packet", "packets"),
    "deviceActionReport": ("action", "commands"),
    "deviceConn": ("conn", "devices"),
    "deviceOtaReport": ("ota", "devices"),
}
KIND_CODES: dict[str, tuple[str, ...]] = {}
for _code, (_kind, _) in CODES.items():
    KIND_CODES.setdefault(_kind, ())
    KIND_CODES[_kind] += (_code,)

OK = "成功"
E_PARAM, E_PARAM_MSG = 100006, "参数错误"
E_PERMISSION, E_PERMISSION_MSG = 100012, "权限不足"
E_TYPE, E_TYPE_MSG = 100014, "参数的类型不对"
E_NOT_IMPLEMENTED, E_NOT_IMPLEMENTED_MSG = 100018, "尚未实现"

_FORMS = {
    frozenset(("productID", "deviceName", "identifier")): "pdi",
    frozenset(("productID", "deviceName")): "pd",
    frozenset(("projectID",)): "p",
    frozenset(("projectID", "areaID")): "pa",
}
_FORM_KEYS = {"pdi": ("productID", "deviceName", "identifier"), "pd": ("productID", "deviceName"),
              "p": ("projectID",), "pa": ("projectID", "areaID")}


class BadRequest(Exception):
    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


def selector(code: str, params: Any) -> tuple[str, ...]:
    """The selector of one ``params`` object; :class:`BadRequest` (100006) if no form fits."""
    if not isinstance(params, dict):
        raise BadRequest(E_PARAM, E_PARAM_MSG)
    given = {k: v for k, v in params.items() if v is not None}
    form = _FORMS.get(frozenset(given))
    if form is None or (form == "pdi" and code != "devicePropertyReport"):
        raise BadRequest(E_PARAM, E_PARAM_MSG)
    values = []
    for name in _FORM_KEYS[form]:
        text = id_text(given[name])
        if text is None:
            raise BadRequest(E_PARAM, E_PARAM_MSG)
        values.append(text)
    return (form, *values)


def ms_of(iso_text: Any, fallback_us: int) -> str:
    """``timestamp``: milliseconds since the epoch, as a string."""
    if isinstance(iso_text, str):
        try:
            return str(parse_iso(iso_text) // 1000)
        except (ValueError, OverflowError):
            pass
    return str(fallback_us // 1000)


def content_text(data: dict[str, Any]) -> str:
    """``devicePublish.content``: UTF-8 as is, JSON serialized, binary as hex."""
    payload = data.get("payload")
    encoding = data.get("payload_encoding")
    if payload is None:
        return ""
    if encoding == "json" or not isinstance(payload, str):
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return payload


def identity(device: Any, identifier: str) -> tuple[str, str]:
    """``(productID, deviceName)`` of an event's device (its identifier for both if unknown)."""
    if device is None:
        return identifier, identifier
    return device.product_id, device.device_name


def pub(code: str, body: dict[str, Any]) -> bytes:
    return dumps({"code": 200, "msg": OK, "type": "down.pub", "path": code, "body": body})


def message(event: Event, device: Any, code: str, identifier: str | None) -> bytes:
    """The ``down.pub`` message of ``code`` for ``event`` (built once per event)."""
    product, name = identity(device, event.device)
    data = event.data
    who = {"productID": product, "deviceName": name}
    if code == "devicePropertyReport":
        body = {"device": who, "timestamp": ms_of(data.get("measured_at"), event.inserted_us),
                "identifier": identifier, "param": data["data"][identifier]}
    elif code == "devicePropertyReportV2":
        body = {"device": who, "timestamp": ms_of(data.get("measured_at"), event.inserted_us),
                "params": data.get("data")}
    elif code == "devicePublish":
        action = data.get("packet_type")
        body = {"productID": product, "deviceName": name, "content": content_text(data),
                "topic": data.get("interface_id") or "",
                "action": action if action in ("up", "down") else "up",
                "timestamp": ms_of(data.get("transceived_at"), event.inserted_us),
                "requestID": str(event.id), "traceID": "", "resultCode": 200, "respPayload": ""}
    elif code == "deviceActionReport":
        body = {"device": who, "msgToken": str(data.get("msgToken", "")),
                "timestamp": str(event.inserted_us // 1000), "actionID": data.get("actionID", ""),
                "params": data.get("params"), "code": data.get("code", 200), "msg": data.get("msg", ""),
                "dir": data.get("dir", "down"), "reqType": data.get("reqType", "req")}
        if "errorDetail" in data:  # (an error result's extra fields; an expired command is code 408)
            body["errorDetail"] = data["errorDetail"]
    elif code == "deviceConn":
        body = {"device": who, "timestamp": str(event.inserted_us // 1000), "status": data.get("status")}
    else:  # deviceOtaReport
        body = {"device": who, "timestamp": str(event.inserted_us // 1000), "status": data.get("status"),
                "detail": data.get("detail", ""), "step": data.get("step")}
    return pub(code, body)
