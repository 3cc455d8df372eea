"""iThings-style subscriptions: one websocket, many device events.

The protocol of unitedrhino iThings (``share/websocket``): after the connect
reply the client sends ``up.sub`` / ``up.unSub`` / ``up.ping`` and receives
``down.pub`` messages for the codes it subscribed to.

The messages themselves are :mod:`iotd.ws.subscribe_messages`; the route
is :mod:`iotd.ws.subscribe_job`.  One :class:`SubscribeFactory` subscribes to
the event bus once.  Its index
maps ``(tenant, code, selector)`` — a selector being one device identity form
(``("pd", productID, deviceName)``, ``("pdi", productID, deviceName,
identifier)``, ``("p", projectID)``, ``("pa", projectID, areaID)``) — to the
connections subscribed with it.  An event looks up only the selectors its
device has (at most four per code), merges the hits (so a connection gets it
at most once) and writes one prepared frame to each.  Group keys are checked
per event (project/area/groups may change); other keys see their tenant.

Chosen where the spec is silent:

* "May this group key subscribe?" asks the registry's selector index (which
  tags the devices of a product+deviceName / project / project+area carry),
  never a scan of the devices.
* The per-connection cap counts refusals too: subscriptions held plus
  ``up.sub`` requests refused with ``100012`` may not pass
  :data:`MAX_SUBSCRIPTIONS`; past it every ``up.sub`` is answered ``100006``
  without looking anything up (a refusal stays counted for the life of the
  connection; ``up.unSub`` frees only subscriptions).  Malformed requests
  (``100006``, ``100014``) are answered without any lookup and are not counted.
* A client-sent ``down.pub`` gets ``100018``; any other ``down.*`` type is
  ignored silently, like unknown types (as the iThings server does).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from twisted.internet.task import LoopingCall

from iotd.events import Event
from iotd.ws.factory import SocketFactory
from iotd.ws.limits import Limits
from iotd.ws.protocol import STATE_OPEN, SocketProtocol
from iotd.ws.subscribe_messages import (CODES, E_NOT_IMPLEMENTED, E_NOT_IMPLEMENTED_MSG, E_PARAM, E_PARAM_MSG,
                                        E_PERMISSION, E_PERMISSION_MSG, E_TYPE, E_TYPE_MSG, KIND_CODES, OK,
                                        BadRequest, message, selector)

MAX_SUBSCRIPTIONS = 1000
PING_EVERY = 10.0
MISSED_PINGS = 5

class SubscribeSocket(SocketProtocol):
    kind = "subscribe"
    app_code: str | None = None
    project_id: str | None = None
    limited = False
    refused = 0  # up.sub requests refused with 100012 (they count toward the cap)
    _heartbeat: Any = None
    _missed = 0

    def configure(self, app_code: str | None, project_id: str | None) -> None:
        self.app_code, self.project_id = app_code, project_id
        self.subs: set[tuple[str, tuple[str, ...]]] = set()

    # -- life -------------------------------------------------------------------

    def opened(self) -> None:
        self.limited = self.key.limited
        self.log.info("websocket {conn} subscriptions for app {app} project {project}",
                      conn=self.conn_id, app=self.app_code, project=self.project_id)
        self.send_json({"code": 200, "msg": OK,
                        "handler": {"Traceparent": secrets.token_hex(16), "connectID": str(self.conn_id)}})
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.clock
        self._heartbeat.start(PING_EVERY, now=False)

    def closed(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        for code, sel in getattr(self, "subs", ()):
            self.factory.remove(self, code, sel)
        self.subs = set()

    def activity(self) -> None:
        self._missed = 0

    def _beat(self) -> None:
        if self.state != STATE_OPEN:
            return
        if self._missed >= MISSED_PINGS:
            self.log.info("websocket {conn}: {n} pings unanswered, closing", conn=self.conn_id, n=self._missed)
            self._heartbeat.stop()
            self.close(1000, "heartbeat timeout")
            return
        self._missed += 1
        self.sendPing(str(int(self.clock.seconds())).encode())

    # -- requests ---------------------------------------------------------------------

    def reply(self, code: int, msg: str, type_: str | None) -> None:
        out: dict[str, Any] = {"code": code, "msg": msg}
        if type_:
            out["type"] = type_
        self.send_json(out)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            request = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            request = None
        if not isinstance(request, dict):
            self.reply(E_TYPE, E_TYPE_MSG, None)
            return
        type_ = request.get("type")
        if not isinstance(type_, str) or not type_:
            self.reply(E_PARAM, E_PARAM_MSG, None)
            return
        try:
            if type_ == "down.pub":
                raise BadRequest(E_NOT_IMPLEMENTED, E_NOT_IMPLEMENTED_MSG)
            if type_ == "up.ping":
                self.reply(200, OK, "down.pong")
            elif type_ == "up.sub":
                self._subscribe(request.get("body"))
                self.reply(200, OK, "down.subRet")
            elif type_ == "up.unSub":
                self._unsubscribe(request.get("body"))
                self.reply(200, OK, "down.unSubRet")
            # other types (other down.* ones included) are ignored
        except BadRequest as e:
            self.reply(e.code, e.msg, type_)

    def _parse(self, body: Any) -> tuple[str, tuple[str, ...]]:
        if not isinstance(body, dict):
            raise BadRequest(E_PARAM, E_PARAM_MSG)
        code = body.get("code")
        if not isinstance(code, str) or code not in CODES:
            raise BadRequest(E_PARAM, E_PARAM_MSG)
        return code, selector(code, body.get("params"))

    def _subscribe(self, body: Any) -> None:
        code, sel = self._parse(body)
        if (code, sel) in self.subs:
            return
        if len(self.subs) + self.refused >= MAX_SUBSCRIPTIONS:
            raise BadRequest(E_PARAM, E_PARAM_MSG)
        if not self.factory.may_subscribe(self.key, code, sel):
            self.refused += 1
            raise BadRequest(E_PERMISSION, E_PERMISSION_MSG)
        self.subs.add((code, sel))
        self.factory.add(self, code, sel)
        self.log.debug("websocket {conn} subscribed {code} {sel}", conn=self.conn_id, code=code, sel=sel)

    def _unsubscribe(self, body: Any) -> None:
        code, sel = self._parse(body)
        if (code, sel) in self.subs:
            self.subs.discard((code, sel))
            self.factory.remove(self, code, sel)


class SubscribeFactory(SocketFactory):
    kind = "subscribe"
    protocol = SubscribeSocket

    bus_kinds = tuple(KIND_CODES)

    def __init__(self, ctx: Any, limits: Limits, clock: Any = None):
        super().__init__(ctx, limits, clock)
        # (tenant, code, selector) -> {socket: None}; two tables: keys that see the whole
        # tenant, and group keys (checked per event)
        self._plain: dict[tuple, dict[SubscribeSocket, None]] = {}
        self._limited: dict[tuple, dict[SubscribeSocket, None]] = {}
        self._tenants: dict[str, int] = {}  # subscriptions per tenant, for a quick "nobody"

    # -- the index ------------------------------------------------------------------

    def add(self, sock: SubscribeSocket, code: str, sel: tuple[str, ...]) -> None:
        table = self._limited if sock.limited else self._plain
        table.setdefault((sock.key.tenant, code, sel), {})[sock] = None
        self._tenants[sock.key.tenant] = self._tenants.get(sock.key.tenant, 0) + 1

    def remove(self, sock: SubscribeSocket, code: str, sel: tuple[str, ...]) -> None:
        table = self._limited if sock.limited else self._plain
        index = (sock.key.tenant, code, sel)
        socks = table.get(index)
        if socks is not None and sock in socks:
            del socks[sock]
            if not socks:
                del table[index]
            left = self._tenants.get(sock.key.tenant, 1) - 1
            if left > 0:
                self._tenants[sock.key.tenant] = left
            else:
                self._tenants.pop(sock.key.tenant, None)

    def may_subscribe(self, key: Any, code: str, sel: tuple[str, ...]) -> bool:
        """May ``key`` read what ``sel`` names (some device of it, for a group key)?"""
        if not key.allows(CODES[code][1], "read"):
            return False
        if not key.limited:
            return True
        if sel[0] == "pdi":  # the identifier names a reading key, not a device
            sel = ("pd", sel[1], sel[2])
        tags = self.registry.selection_tags(key.tenant, sel)
        return any(group in tags for group in key.groups)

    # -- per event ----------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        tenant = event.tenant
        if tenant not in self._tenants:
            return
        device = self.registry.get(tenant, event.device)
        if device is not None:
            sels = list(device.selectors)
            product, name = sels[0][1], sels[0][2]
        else:
            product = name = event.device
            sels = [("pd", product, name)]
        for code in KIND_CODES[event.kind]:
            if code == "devicePropertyReport":
                data = event.data.get("data")
                if isinstance(data, dict):
                    for identifier in data:
                        self._deliver(event, device, code, sels + [("pdi", product, name, identifier)],
                                      identifier)
            else:
                self._deliver(event, device, code, sels, None)

    def _gather(self, table: dict, tenant: str, code: str, sels: list) -> dict | None:
        found = None
        copied = False
        for sel in sels:
            socks = table.get((tenant, code, sel))
            if socks:
                if found is None:
                    found = socks
                else:
                    if not copied:
                        found, copied = dict(found), True
                    found.update(socks)
        return found

    def _deliver(self, event: Event, device: Any, code: str, sels: list, identifier: str | None) -> None:
        tenant = event.tenant
        plain = self._gather(self._plain, tenant, code, sels)
        limited = self._gather(self._limited, tenant, code, sels) if self._limited else None
        if not plain and not limited:
            return
        key = code if identifier is None else f"{code}:{identifier}"
        frame = self.prepared(event, "sub:" + key, lambda e: message(e, device, code, identifier))
        if plain:
            self.broadcast(event.kind, frame, plain)
        if limited and device is not None:
            self.broadcast(event.kind, frame, [s for s in limited if s.key.sees(device)])
