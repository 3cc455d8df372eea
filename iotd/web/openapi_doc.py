"""The OpenAPI 3.1 description of iotd's REST API, its device side and its websocket URLs.

Written out here as data, operation by operation; ``tests/test_openapi.py``
checks it against the Klein route table (a route without an entry, or an
entry without a route, fails), validates it with ``openapi-spec-validator``,
and schemathesis tests the live daemon against it.  Websocket URLs are not
HTTP operations a generic client can call, so they sit in ``x-websockets``
(URL, scope, kind, query parameters, frames), checked against the route
table like the rest.  Paths use the route table's own parameter names.
"""

from __future__ import annotations

from typing import Any

from iotd import __version__
from iotd.push.state import STATES as COMMAND_STATES

ERROR_CODES = {400: "Malformed JSON or query", 401: "Missing, unknown or expired key",
               403: "The key lacks the permission", 404: "No such resource", 409: "Conflict",
               413: "Body over max_body_bytes", 415: "Body is not JSON",
               422: "Well-formed but invalid", 503: "Store unavailable (or no free link port)",
               504: "The node holding the link did not answer in time"}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


def _p(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False) -> dict:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema}


def _path(name: str, description: str = "") -> dict[str, Any]:
    return _p(name, "path", {"type": "string", "minLength": 1}, description or name)


LIMIT = _p("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Page size")
READ = (400, 401, 403, 404, 503)
WRITE = (400, 401, 403, 404, 413, 415, 422, 503)
HISTORY_QUERY = [
    _p("after", "query", {"type": "string", "format": "date-time"},
       "Only events whose inserted_at is strictly later (ISO 8601); turns the default order to asc"),
    _p("after_id", "query", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
       "Only events whose id is greater (instead of after)"),
    _p("before", "query", {"type": "string", "format": "date-time"},
       "Only events whose inserted_at is strictly earlier (ISO 8601)"),
    LIMIT,
    _p("order", "query", {"type": "string", "enum": ["asc", "desc"]},
       "asc: oldest first (default with after/after_id); desc: newest first (default otherwise)"),
    _p("cursor", "query", {"type": "string"},
       "The next value of the previous page; continues in the same window and order"),
]

_TIME = {"type": "string", "format": "date-time"}
_NTIME = {"type": ["string", "null"], "format": "date-time"}
_NSTR = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "DeviceBody": {"type": "object", "description": "identifier, online, lastSeen and lastAddress are ignored",
                   "properties": {
                       "name": _NSTR, "host": _NSTR, "productID": _NSTR, "deviceName": _NSTR,
                       "projectID": {"type": ["string", "integer", "null"]},
                       "areaID": {"type": ["string", "integer", "null"]},
                       "pushId": {"type": ["integer", "null"]},
                       "ports": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1,
                                                                            "maximum": 65535}},
                       "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
                       "fields": {"type": "object"},
                       "interfaces": {"type": "array", "items": {"type": "object"}},
                       "transport": {"type": ["string", "null"], "enum": ["push", "mqtt", None]}}},
    "Device": {"type": "object", "required": ["identifier", "tags", "online"], "properties": {
        "identifier": {"type": "string"}, "name": _NSTR, "host": _NSTR, "productID": _NSTR,
        "deviceName": _NSTR, "projectID": _NSTR, "areaID": _NSTR, "pushId": {"type": ["integer", "null"]},
        "ports": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
        "fields": {"type": "object"}, "interfaces": {"type": "array", "items": {"type": "object"}},
        "transport": {"type": ["string", "null"]}, "online": {"type": "boolean"}, "lastSeen": _NTIME, "lastAddress": _NSTR}},
    "DevicePage": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": ref("Device")}, "next": {"type": "string"}}},
    "StreamBody": {"type": "object", "properties": {
        "devices": {"type": "array", "items": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string"}}}},
    "Stream": {"type": "object", "required": ["id", "devices", "tags"], "properties": {
        "id": {"type": "string"}, "devices": {"type": "array", "items": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "string"}}}},
    "ApiKeyBody": {"type": "object", "required": ["name", "role"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "role": {"type": "string", "enum": ["admin", "read_only", "group"]},
        "groups": {"type": "array", "items": {"type": "string"}},
        "permissions": {"type": "array", "items": {"type": "string", "description": "resource:action"}},
        "expiresAt": _TIME}},
    "ApiKey": {"type": "object", "required": ["id", "name", "role", "tenant", "groups", "permissions",
                                              "createdAt"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "role": {"type": "string"},
        "tenant": {"type": "string"}, "groups": {"type": "array", "items": {"type": "string"}},
        "permissions": {"type": "array", "items": {"type": "string"}}, "createdAt": _TIME,
        "expiresAt": _TIME, "lastUsedAt": _TIME}},
    "NewApiKey": {"allOf": [ref("ApiKey"), {"type": "object", "required": ["key"], "properties": {
        "key": {"type": "string", "description": "64 hex characters, shown this once"}}}]},
    "ApiKeyPage": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": ref("ApiKey")}, "next": {"type": "string"}}},
    "Packet": {"type": "object", "required": ["id", "device_id", "inserted_at", "payload_encoding"],
               "properties": {"id": {"type": "integer"}, "device_id": {"type": "string"}, "inserted_at": _TIME,
                              "interface_id": _NSTR, "transceived_at": _NTIME,
                              "payload_encoding": {"enum": ["json", "binary", "utf8", "none"]},
                              "payload": {}, "packet_type": {"type": "string"}, "meta": {"type": "object"}}},
    "PacketBody": {"type": "object", "properties": {
        "payload": {}, "payload_encoding": {"enum": ["json", "binary", "utf8", "none"]},
        "meta": {"type": "object"}, "transceived_at": _TIME, "interface": {"type": "string"},
        "packet_type": {"type": "string"}}},
    "Reading": {"type": "object", "required": ["id", "device_id", "inserted_at", "data"], "properties": {
        "id": {"type": "integer"}, "device_id": {"type": "string"}, "inserted_at": _TIME,
        "packet_id": {"type": ["integer", "null"]}, "parser_id": {"type": "null"}, "measured_at": _NTIME,
        "data": {"type": "object"}, "location": {"type": ["object", "null"]}, "meta": {"type": "object"}}},
    "ReadingBody": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "object", "maxProperties": 1000}, "measured_at": _TIME,
        "packet_id": {"type": "integer"}, "meta": {"type": "object"}, "location": {"type": "object"}}},
    "Ota": {"type": "object", "required": ["id", "device_id", "inserted_at", "status"], "properties": {
        "id": {"type": "integer"}, "device_id": {"type": "string"}, "inserted_at": _TIME,
        "status": {"type": "integer"}, "step": {"type": "integer"}, "detail": {"type": "string"},
        "reported_at": _TIME}},
    "OtaBody": {"type": "object", "required": ["status"], "properties": {
        "status": {"type": "integer"}, "step": {"type": "integer"}, "detail": {"type": "string"}}},
    "Event": {"type": "object", "required": ["id", "device_id", "inserted_at"], "properties": {
        "id": {"type": "integer"}, "device_id": {"type": "string"}, "inserted_at": _TIME}},
    "PacketPage": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": ref("Packet")}, "next": {"type": "string"},
        "pruned": {"const": True}}},
    "ReadingPage": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": ref("Reading")}, "next": {"type": "string"},
        "pruned": {"const": True}}},
    "EventPage": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": {"type": "object", "required": ["kind", "body"], "properties": {
            "kind": {"enum": ["packet", "reading", "ota", "action", "conn"]}, "body": ref("Event")}}},
        "next": {"type": "string"}, "pruned": {"const": True}}},
    "CommandBody": {"type": "object", "required": ["endpoint"], "properties": {
        "verb": {"enum": ["GET", "POST"]}, "endpoint": {"type": "string"}, "body": {},
        "contentType": {"type": "string"}, "queryString": {"type": "string"},
        "ttl": {"type": "number", "minimum": 1, "maximum": 2592000}, "expiresAt": _TIME}},
    "BulkCommandBody": {"type": "object", "required": ["command"], "properties": {
        "devices": {"type": "array", "items": {"type": "string"}, "maxItems": 10000}, "tag": {"type": "string"},
        "command": ref("CommandBody")}},
    "Batch": {"type": "object", "required": ["batch", "commands"], "properties": {
        "batch": {"type": "integer"}, "commands": {"type": "array", "items": {
            "type": "object", "required": ["device", "id"], "properties": {
                "device": {"type": "string"}, "id": {"type": "integer"}}}}}},
    "BatchView": {"type": "object", "required": ["batch", "createdAt", "total", "byStatus", "commands"],
                  "properties": {
        "batch": {"type": "integer"}, "createdAt": _TIME, "total": {"type": "integer"},
        "byStatus": {"type": "object", "additionalProperties": {"type": "integer"}},
        "commands": {"type": "array", "items": {"type": "object", "required": ["device", "id", "status"],
                                                "properties": {"device": {"type": "string"}, "id": {"type": "integer"},
                                                               "status": {"enum": list(COMMAND_STATES)}}}},
        "next": {"type": "integer"}}},
    "Command": {"type": "object", "required": ["id", "device", "status", "attempts", "createdAt"], "properties": {
        "id": {"type": "integer"}, "device": {"type": "string"},
        "status": {"enum": list(COMMAND_STATES)}, "attempts": {"type": "integer"},
        "createdAt": _TIME, "sentAt": _NTIME, "finishedAt": _NTIME, "response": {}, "responseRaw": {},
        "error": {}, "expiresAt": _NTIME, "batch": {"type": "integer"},
        "resultRaw": {"type": "string", "description": "The /result body as it came (base64 when resultEncoding)"},
        "resultEncoding": {"enum": ["base64"]}, "errorDetail": {"type": "object"},
        "sentUuid": {"type": "string"}, "resultUuid": {"type": "string"}}},
    "CommandPage": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": ref("Command")}, "next": {"type": "integer"}}},
    "LinkBody": {"type": "object", "properties": {
        "protocol": {"enum": ["tcp", "udp"]}, "devicePort": {"type": "integer"}, "timeout": {"type": "integer"},
        "source": {"type": "object"}, "encrypt": {"type": "object"},
        "maxDuration": {"type": "integer", "minimum": 0, "description": "ms after creation the link closes; 0 = none"},
        "rateLimit": {"type": "integer", "minimum": 0, "description": "bytes/s per direction; 0 = none"}}},
    "Link": {"type": "object", "required": ["device", "port", "token"], "properties": {
        "device": {"type": "string"}, "port": {"type": "integer"}, "token": {"type": "string"},
        "host": {"type": "string"}, "node": {"type": ["string", "null"]},
        "maxDuration": {"type": "integer"}, "expiresAt": _TIME, "rateLimit": {"type": "integer"},
        "datagramsRateDropped": {"type": "integer"}}},
    "LinkList": {"type": "object", "required": ["items"], "properties": {"items": {
        "type": "array", "items": ref("Link")}}},
    "Health": {"type": "object", "required": ["status", "version"], "properties": {
        "status": {"enum": ["ok", "degraded", "unavailable"]}, "version": {"type": "string"},
        "node": {"type": ["string", "null"]}, "store": {"type": "string"}, "bus": {"type": "string"}}},
    "OpenApi": {"type": "object", "required": ["openapi", "paths"]},
}


def _op(summary: str, responses: dict[str, Any], params: list | None = None, body: str | None = None,
        auth: bool = True, array_body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        schema = ref(body)
        if array_body:
            schema = {"oneOf": [ref(body), {"type": "array", "minItems": 1, "maxItems": 1000, "items": ref(body)}]}
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if not auth:
        op["security"] = []
    return op


def _history(scope: str, kind: str, target: list) -> dict[str, Any]:
    page = {"packets": "PacketPage", "readings": "ReadingPage", "events": "EventPage"}[kind]
    return _op(f"Stored {kind} of {scope}, a page at a time",
               {"200": _json(ref(page), "A page; next is absent on the last one"), **_errors(*READ)},
               target + HISTORY_QUERY)


def _paths() -> dict[str, Any]:
    ident = [_path("identifier", "Device identifier (case-insensitive)")]
    stream = [_path("stream_id", "Stream id")]
    tag = [_path("tag", "Tag")]
    link = [_path("token", "Link token")]
    command = [_p("command_id", "path", {"type": "integer", "minimum": 0}, "Command id")]
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("Health of the node and its store", {
            "200": _json(ref("Health"), "Serving"), "503": _json(ref("Health"), "The store is unavailable")},
            auth=False)},
        "/metrics": {"get": _op("Prometheus metrics", {"200": {
            "description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            auth=False)},
        "/api/v1/openapi.json": {"get": _op("This document", {"200": _json(ref("OpenApi"), "OpenAPI 3.1")},
                                            auth=False)},
        "/api/v1/api-keys": {
            "post": _op("Create a key", {"201": _json(ref("NewApiKey"), "Created; key is shown once"),
                                         **_errors(*WRITE)}, body="ApiKeyBody"),
            "get": _op("List keys", {"200": _json(ref("ApiKeyPage"), "A page"), **_errors(*READ)},
                       [LIMIT, _p("after", "query", {"type": "string"}, "Last id of the previous page")])},
        "/api/v1/api-keys/self": {"get": _op("The presented key itself (what it may do)", {
            "200": _json(ref("ApiKey"), "The key"), **_errors(400, 401, 503)})},
        "/api/v1/api-keys/{key_id}": {"delete": _op("Revoke a key", {"204": {"description": "Revoked"},
                                                                    **_errors(*READ)}, [_path("key_id")])},
        "/api/v1/devices": {"get": _op("List devices", {"200": _json(ref("DevicePage"), "A page"),
                                                        **_errors(*READ)},
                                       [LIMIT, _p("after", "query", {"type": "string"}, "Last identifier seen"),
                                        _p("tag", "query", {"type": "string"}, "Only devices with this tag")])},
        "/api/v1/devices/{identifier}": {
            "get": _op("A device", {"200": _json(ref("Device"), "The device"), **_errors(*READ)}, ident),
            "put": _op("Create or replace a device", {"200": _json(ref("Device"), "Replaced"),
                                                     "201": _json(ref("Device"), "Created"),
                                                     **_errors(*WRITE, 409)}, ident, body="DeviceBody"),
            "delete": _op("Delete a device", {"204": {"description": "Deleted"}, **_errors(*READ)}, ident)},
        "/api/v1/streams/{stream_id}": {
            "get": _op("A stream", {"200": _json(ref("Stream"), "The stream"), **_errors(*READ)}, stream),
            "put": _op("Create or replace a stream", {"200": _json(ref("Stream"), "Replaced"),
                                                     "201": _json(ref("Stream"), "Created"),
                                                     **_errors(*WRITE)}, stream, body="StreamBody"),
            "delete": _op("Delete a stream", {"204": {"description": "Deleted"}, **_errors(*READ)}, stream)},
        "/api/v1/devices/{identifier}/packets": {
            "post": _op("Ingest packets", {"201": _json({"oneOf": [ref("Packet"), {"type": "array", "items": ref(
                "Packet")}]}, "Stored"), **_errors(*WRITE)}, ident, body="PacketBody", array_body=True),
            "get": _history("a device", "packets", ident)},
        "/api/v1/devices/{identifier}/readings": {
            "post": _op("Ingest readings", {"201": _json({"oneOf": [ref("Reading"), {"type": "array", "items": ref(
                "Reading")}]}, "Stored"), **_errors(*WRITE)}, ident, body="ReadingBody", array_body=True),
            "get": _history("a device", "readings", ident)},
        "/api/v1/devices/{identifier}/ota": {
            "post": _op("Report OTA progress", {"201": _json({"oneOf": [ref("Ota"), {"type": "array", "items": ref(
                "Ota")}]}, "Stored"), **_errors(*WRITE)}, ident, body="OtaBody", array_body=True)},
        "/api/v1/devices/{identifier}/events": {"get": _history("a device", "events", ident)},
        "/api/v1/tags/{tag}/packets": {"get": _history("a tag", "packets", tag)},
        "/api/v1/tags/{tag}/readings": {"get": _history("a tag", "readings", tag)},
        "/api/v1/streams/{stream_id}/packets": {"get": _history("a stream", "packets", stream)},
        "/api/v1/streams/{stream_id}/readings": {"get": _history("a stream", "readings", stream)},
        "/api/v1/packets": {"get": _history("the tenant", "packets", [])},
        "/api/v1/readings": {"get": _history("the tenant", "readings", [])},
        "/api/v1/devices/{identifier}/commands": {
            "post": _op("Queue a command", {"201": _json(ref("Command"), "Queued"),
                                            "200": _json(ref("Command"), "Finished within wait"),
                                            "202": _json(ref("Command"), "Not finished within wait"),
                                            **_errors(*WRITE)},
                        ident + [_p("wait", "query", {"type": "number", "minimum": 0},
                                    "Seconds to wait for the result")], body="CommandBody"),
            "get": _op("A device's commands", {"200": _json(ref("CommandPage"), "A page"), **_errors(*READ)},
                       ident + [LIMIT, _p("after", "query", {"type": "integer", "minimum": 0}, "Last id seen"),
                                _p("status", "query", {"enum": list(COMMAND_STATES)}, "Only this status")])},
        "/api/v1/commands": {
            "post": _op("Queue one command per device of a list or a tag, in one transaction",
                        {"201": _json(ref("Batch"), "Queued"), **_errors(*WRITE)}, body="BulkCommandBody")},
        "/api/v1/command-batches/{batch_id}": {
            "get": _op("A bulk request's commands, counted by status",
                       {"200": _json(ref("BatchView"), "A page"), **_errors(*READ)},
                       [_p("batch_id", "path", {"type": "integer", "minimum": 0}, "Batch id"), LIMIT,
                        _p("after", "query", {"type": "integer", "minimum": 0}, "Last command id seen")])},
        "/api/v1/commands/{command_id}": {
            "get": _op("A command", {"200": _json(ref("Command"), "The command"), **_errors(*READ)}, command),
            "delete": _op("Cancel a command", {"204": {"description": "Cancelled"}, **_errors(*READ, 409)},
                          command)},
        "/api/v1/devicelink": {"get": _op("Open links", {"200": _json(ref("LinkList"), "Every open link"),
                                                         **_errors(*READ)})},
        "/api/v1/devicelink/{identifier}": {
            "post": _op("Open a link to a device", {"201": _json(ref("Link"), "Opened"), **_errors(*WRITE)},
                        ident, body="LinkBody")},
        "/api/v1/devicelink/{token}": {
            "get": _op("A link", {"200": _json(ref("Link"), "The link"), **_errors(*READ)}, link),
            "delete": _op("Close a link", {"204": {"description": "Closed"}, **_errors(*READ, 504)}, link)},
        "/push": {"get": _op("Device side: poll for a command (Control iD push)", {
            "200": {"description": "Empty (nothing to do) or the command as JSON"}, **_errors(400, 403, 503)},
            [_p("deviceId", "query", {"type": "integer"}, "The device's push id", required=True)], auth=False)},
        "/result": {"post": _op("Device side: the result of the command", {
            "200": {"description": "Empty, always"}, **_errors(400, 403, 413, 503)},
            [_p("deviceId", "query", {"type": "integer"}, "The device's push id", required=True)], auth=False)},
    }
    return paths


_WS_QUERY = {"auth": "The API key (or Authorization: Bearer)",
             "after": "ISO 8601: replay stored events strictly later, then live",
             "preload": "Comma-separated: device, device.fields, device.interfaces (readings also packet, "
                        "packet.interface)"}


def _websockets() -> dict[str, Any]:
    out: dict[str, Any] = {}
    scopes = {"device": "/api/v1/devices/{target}", "tag": "/api/v1/tags/{target}",
              "stream": "/api/v1/streams/{target}", "mandate": "/api/v1"}
    for scope, prefix in scopes.items():
        for part in ("packets", "readings"):
            out[f"{prefix}/{part}/socket"] = {
                "summary": f"Live (and replayed) {part} of {'the tenant' if scope == 'mandate' else 'a ' + scope}",
                "frames": "JSON array of {event: packet_added|reading_added, body}",
                "parameters": [{"name": n, "in": "query", "description": d} for n, d in _WS_QUERY.items()]}
    out["/api/v1/system/common/websocket/connect"] = {"summary": "iThings-style subscriptions", "parameters": [
        {"name": "token", "in": "query", "description": "The API key (or the token header)"}]}
    out["/api/v1/devicelink/{token}/socket"] = {
        "summary": "A TCP link used over a websocket; the link token is the credential (no API key)",
        "frames": "binary both ways: the bytes to and from the device (encrypt applies as on the port)",
        "parameters": [{"name": "token", "in": "path", "description": "The link's token"}]}
    return out


def document() -> dict[str, Any]:
    err = {f"E{c}": _json(ref("Error"), d) for c, d in ERROR_CODES.items()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "iotd", "version": __version__,
                 "description": "IoT device gateway. Errors are {\"error\": {\"code\", \"message\"}}."},
        "security": [{"bearer": []}, {"auth": []}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS, "responses": err,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "auth": {"type": "apiKey", "in": "query", "name": "auth"}}},
        "x-websockets": _websockets(),
    }
