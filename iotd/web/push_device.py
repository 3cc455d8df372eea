"""Push, the device side: ``GET /push`` and ``POST /result`` exactly as the Control iD push documents it.

No key (the protocol has none -- see ``[push] listen`` and ``allowed_sources``):

- ``GET /push?deviceId=N`` -> ``200`` empty (nothing to do) or ``200`` JSON
  ``{"verb", "endpoint", "body", "contentType", "queryString"}`` (only the
  fields the operator gave).  ``uuid`` is stored with the send and
  the result; other query parameters are ignored.  ``//push`` and ``//result`` are served alike.
- ``POST /result?deviceId=N`` ``{"response": ...}`` or ``{"error": ...}`` ->
  ``200`` empty, always (orphans and malformed bodies included).
- ``400`` JSON for a missing or non-integer ``deviceId``; ``403`` empty for a
  source outside ``allowed_sources``; ``413`` only over ``max_body_bytes``.

An idle poll is answered from memory: a registry dict lookup, a set lookup
in the command service, an empty ``200`` without an access-log line.  A
poll of a device with work, and every result, is answered once the
service's transaction committed.  Unknown deviceIds: :mod:`iotd.web.push_register`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from iotd import errors, metrics
from iotd.context import Context
from iotd.logs import Logger
from iotd.push import Command, CommandService
from iotd.request import respond
from iotd.web.push_register import Registrar
from iotd.web import answers
from iotd.web.site import add_fast_path


MAX_ID = 2**63 - 1
_LOGGED_MAX = 10000

_polls_unknown = metrics.polls.labels("unknown")
_polls_forbidden = metrics.polls.labels("forbidden")
_polls_bad = metrics.polls.labels("bad_request")
_polls_registered = metrics.polls.labels("registered")
_results_unknown = metrics.results.labels("unknown")
_results_forbidden = metrics.results.labels("forbidden")
_results_bad = metrics.results.labels("bad_request")


class DeviceSide:
    """``GET /push`` and ``POST /result`` for one daemon."""

    log = Logger()

    def __init__(self, ctx: Context, svc: CommandService):
        self.ctx = ctx
        self.svc = svc
        cfg = ctx.config.push
        self.auto_register = cfg.auto_register
        self.networks = tuple(cfg.allowed_sources)
        self._allowed: dict[str, bool] = {}
        self._logged_unknown: set[int] = set()
        self._logged_forbidden: set[str] = set()
        self.registrar = Registrar(ctx.registry, ctx.reactor, cfg, self.unknown)

    # helpers

    def allowed(self, host: str | None) -> bool:
        if not self.networks:
            return True
        known = self._allowed.get(host)  # type: ignore[arg-type]
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(host) if host else None
        except ValueError:
            address = None
        if address is not None and getattr(address, "ipv4_mapped", None) is not None:
            address = address.ipv4_mapped
        ok = address is not None and any(address in net for net in self.networks)
        if len(self._allowed) > _LOGGED_MAX:
            self._allowed.clear()
        self._allowed[host] = ok  # type: ignore[index]
        return ok

    def forbidden(self, request: Any, host: str | None, what: str) -> bytes:
        if host not in self._logged_forbidden:
            if len(self._logged_forbidden) > _LOGGED_MAX:
                self._logged_forbidden.clear()
            self._logged_forbidden.add(host)  # type: ignore[arg-type]
            self.log.warn("{what} from {host} refused: outside [push] allowed_sources", what=what, host=host)
        request.setResponseCode(403)
        request.defaultContentType = None
        return b""

    def unknown(self, device_id: int, host: str | None, what: str) -> None:
        if device_id not in self._logged_unknown:
            if len(self._logged_unknown) > _LOGGED_MAX:
                self._logged_unknown.clear()
            self._logged_unknown.add(device_id)
            self.log.warn("{what} from unknown deviceId {device_id} at {host} ignored", what=what,
                          device_id=device_id, host=host)

    @staticmethod
    def empty(request: Any) -> bytes:
        request.quiet = True  # no access-log line for the hot path (still counted)
        request.defaultContentType = None
        return b""

    # GET /push

    def caller(self, request: Any, what: str, forbidden: Any, bad: Any) -> tuple[str | None, int | None, Any]:
        """``(host, device_id, None)`` of a device request, or ``(host, None, answer)`` when its
        address is not allowed; a bad ``deviceId`` raises (400).  Both are counted."""
        host = getattr(request.client, "host", None)
        if self.networks and not self.allowed(host):
            forbidden.inc()
            return host, None, self.forbidden(request, host, what)
        values = request.args.get(b"deviceId")
        if values:
            text = values[0]  # ASCII digits, one optional "-" (bytes.isdigit is ASCII-only; a regex costs 8x)
            digits = text[1:] if text[:1] == b"-" else text
            if digits.isdigit() and len(digits) <= 19 and -(2**63) <= (device_id := int(text)) <= MAX_ID:
                return host, device_id, None
        bad.inc()
        raise errors.BadRequest("deviceId must be a signed 64-bit integer", code="invalid_device_id")

    def poll(self, request: Any) -> Any:
        host, device_id, refused = self.caller(request, "poll", _polls_forbidden, _polls_bad)
        if device_id is None:
            return refused
        if not self.svc.ready:
            return self.svc.when_ready().addCallback(lambda _: self._poll(request, device_id, host))
        return self._poll(request, device_id, host)

    def _poll(self, request: Any, device_id: int, host: str | None) -> Any:
        device = self.ctx.registry.by_push_id(device_id)
        if device is None:
            if not self.auto_register:
                _polls_unknown.inc()
                self.unknown(device_id, host, "poll")
                return self.empty(request)
            if not self.registrar.admits(device_id, host):
                _polls_unknown.inc()
                return self.empty(request)
            return defer.Deferred.fromCoroutine(self._register(request, device_id, host))
        self.svc.seen(device, host)
        if not self.svc.hand_out_then(device, _handed_out, request, uuid=_uuid(request)):
            return self.empty(request)  # idle: the hot path
        request.quiet = True  # a send: an action event in the event log
        return NOT_DONE_YET  # answered by _handed_out once the transaction committed

    async def _register(self, request: Any, device_id: int, host: str | None) -> Any:
        device = await self.registrar.register(device_id, host)
        if device is None:
            _polls_unknown.inc()
            return self.empty(request)
        _polls_registered.inc()
        self.svc.seen(device, host)
        cmd = await self.svc.hand_out(device, _uuid(request))
        if cmd is None:
            return self.empty(request)
        request.quiet = True
        request.setHeader(b"content-type", b"application/json")
        return cmd.payload()

    # POST /result

    def result(self, request: Any) -> Any:
        host, device_id, refused = self.caller(request, "result", _results_forbidden, _results_bad)
        if device_id is None:
            return refused
        raw = request.content.read() if request.content is not None else b""
        values = request.args.get(b"endpoint")
        endpoint = values[0].decode("utf-8", "replace") if values else None
        if not self.svc.ready:
            return self.svc.when_ready().addCallback(
                lambda _: self._result(request, device_id, host, raw, endpoint))
        return self._result(request, device_id, host, raw, endpoint)

    def _result(self, request: Any, device_id: int, host: str | None, raw: bytes, endpoint: str | None) -> Any:
        device = self.ctx.registry.by_push_id(device_id)
        if device is None:
            _results_unknown.inc()
            self.unknown(device_id, host, "result")
            return self.empty(request)
        self.svc.seen(device, host)
        request.quiet = True
        request.defaultContentType = None
        self.svc.complete_then(device, raw, endpoint, _completed, request, uuid=_uuid(request))
        return NOT_DONE_YET  # answered by _completed once the transaction committed (orphans too)


_PUSH = (b"/push", b"//push")  # (a push_remote_address ending in "/" makes the firmware ask for //push)
_RESULT = (b"/result", b"//result")


def _uuid(request: Any) -> str | None:
    """The firmware's ``uuid`` query value (text, at most 200 characters), or None."""
    values = request.args.get(b"uuid")
    return values[0][:200].decode("utf-8", "replace") if values else None


class DeviceResource(Resource):
    """``GET /push`` and ``POST /result`` as a plain twisted.web leaf (no Klein machinery).

    A handler answers with bytes (idle poll), ``NOT_DONE_YET`` (a poll of a
    device with work, a result: answered by a callback once the store
    committed), or a Deferred (the first poll of an unknown device, or before
    the queue is loaded).
    """

    isLeaf = True

    def __init__(self, side: DeviceSide):
        super().__init__()
        self._side = side

    def render(self, request: Any) -> Any:
        path, method = request.path, request.method
        if path in _PUSH and method == b"GET":
            handler = self._side.poll
        elif path in _RESULT and method == b"POST":
            handler = self._side.result
        else:
            err = errors.MethodNotAllowed(f"method {method.decode('latin-1')[:20]} not allowed here")
            return respond(request, err.status, err.to_json())
        return answers.render(request, handler)


def _handed_out(failure: Failure | None, cmd: Command | None, request: Any) -> None:
    """After the hand-out committed: the command is the poll's answer (None: empty)."""
    if failure is not None:
        answers.failed(failure, request)
    elif cmd is None:
        request.defaultContentType = None
        answers.answer(b"", request)
    else:
        request.setHeader(b"content-type", b"application/json")
        answers.answer(cmd.payload(), request)


def _completed(failure: Failure | None, cmd: Command | None, request: Any) -> None:
    """After a result committed: the empty 200 that closes the push transaction."""
    if failure is not None:
        answers.failed(failure, request)
    else:
        answers.answer(b"", request)


def device_routes(svc: CommandService):
    """The ``routes(app, ctx)`` of ``GET /push`` and ``POST /result`` (also served alone on ``[push] listen``)."""

    def routes(app: Klein, ctx: Context) -> None:
        device = DeviceResource(DeviceSide(ctx, svc))

        @app.route("/push", methods=["GET"])
        def push_poll(request):
            if request.method != b"GET":  # werkzeug adds HEAD: it must not hand out a command
                raise errors.MethodNotAllowed("method HEAD not allowed here")
            return device

        @app.route("/result", methods=["POST"])
        def push_result(request):
            return device

        # The hot path: the site root answers these two before Klein's routing.
        for path in _PUSH:
            add_fast_path(app, b"GET", path, device)
        for path in _RESULT:
            add_fast_path(app, b"POST", path, device)

    return routes
