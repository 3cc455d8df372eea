"""Push: the device side (``GET /push``, ``POST /result``), the operator REST, and the job.

Device side (no key; the protocol has none -- see ``[push] listen`` and
``allowed_sources``), exactly as the Control iD push documents it:

- ``GET /push?deviceId=N`` -> ``200`` empty (nothing to do) or ``200`` JSON
  ``{"verb", "endpoint", "body", "contentType", "queryString"}`` (only the
  fields the operator gave).  Other query parameters (``uuid``...) are ignored.
- ``POST /result?deviceId=N`` ``{"response": ...}`` or ``{"error": ...}`` ->
  ``200`` empty, always (orphans and malformed bodies included).
- ``400`` JSON for a missing or non-integer ``deviceId``; ``403`` empty for a
  source outside ``allowed_sources``; ``413`` only over ``max_body_bytes``.

An idle poll is answered from memory: a registry dict lookup, a queue dict
lookup, an empty ``200`` without an access-log line.

Auto-registration (``[push] auto_register``) is bounded, since anybody who
reaches ``/push`` can make up deviceIds:

- ``auto_register_per_minute`` (daemon-wide): at most that many devices are
  registered in any sliding minute, counted in one-second buckets on the
  reactor clock (at most 60 buckets, whatever the rate);
- ``max_devices`` (per tenant, ``Registry.count`` plus registrations in
  flight): no auto-registration once the tenant has that many devices
  (devices created over REST count too).

A poll refused by either gets the empty ``200`` (the device sees "nothing to
do"), is counted as ``iotd_push_polls_total{outcome="unknown"}``, and is
logged at most once a minute (one line with the number refused since the
previous line), never once per poll or per deviceId.  ``0`` for either key
means no device is auto-registered.

Operator side (``commands:*``): queue (``?wait=S`` holds the answer until the
command finishes), get, list, cancel.  The queue itself is
:class:`iotd.commands.CommandService`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections import deque
from typing import Any

from klein import Klein
from twisted.application import service, strports
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from iotd import errors, metrics
from iotd.commands import Command, CommandService, STATES
from iotd.logs import Logger
from iotd.store import StoreUnavailable
from iotd.store import commands as cmdsql
from iotd.context import Context
from iotd.web.app import make_app
from iotd.request import arg, query_int, read_json, require, respond, visible_device
from iotd.web.site import add_fast_path, make_site

log = Logger()

MAX_WAIT = 60.0
MAX_ID = 2**63 - 1
_DEVICE_ID = re.compile(rb"-?[0-9]{1,19}\Z")
_ENDPOINT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FIELDS = {"verb", "endpoint", "body", "contentType", "queryString"}
_LOGGED_MAX = 10000

_polls_unknown = metrics.polls.labels("unknown")
_polls_forbidden = metrics.polls.labels("forbidden")
_polls_bad = metrics.polls.labels("bad_request")
_polls_registered = metrics.polls.labels("registered")
_results_unknown = metrics.results.labels("unknown")
_results_forbidden = metrics.results.labels("forbidden")
_results_bad = metrics.results.labels("bad_request")


# -- validation -----------------------------------------------------------------


def validate_command(body: Any) -> dict[str, Any]:
    """The checked command spec of a queue request; raises Invalid (422)."""
    if not isinstance(body, dict):
        raise errors.Invalid("body must be a JSON object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise errors.Invalid(f"unknown field {errors.short(sorted(unknown)[0])}")
    out: dict[str, Any] = {}
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        raise errors.Invalid("endpoint must be a path segment like load_objects or set_configuration.fcgi")
    out["endpoint"] = endpoint
    verb = body.get("verb")
    if verb is not None:
        if not isinstance(verb, str) or verb.upper() not in ("GET", "POST"):
            raise errors.Invalid("verb must be GET or POST")
        out["verb"] = verb.upper()
    ctype = body.get("contentType")
    if ctype is not None:
        if not isinstance(ctype, str) or not ctype.strip() or len(ctype) > 200 or _CONTROL.search(ctype):
            raise errors.Invalid("contentType must be a media type such as application/json")
        out["contentType"] = ctype
    qs = body.get("queryString")
    if qs is not None:
        if not isinstance(qs, str) or len(qs) > 8192 or _CONTROL.search(qs):
            raise errors.Invalid("queryString must be a string without control characters")
        out["queryString"] = qs
    payload = body.get("body")
    if payload is not None:
        if not isinstance(payload, (dict, list, str)):
            raise errors.Invalid("body must be an object, an array or a string")
        out["body"] = payload
    if ctype is not None and ctype.split(";", 1)[0].strip().lower() == "application/octet-stream":
        if payload is not None:
            if not isinstance(payload, str):
                raise errors.Invalid("body must be a base64 string for application/octet-stream")
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise errors.Invalid("body must be a base64 string for application/octet-stream") from None
    return out


def _wait_seconds(request: Any) -> float | None:
    text = arg(request, "wait")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise errors.BadRequest("query parameter wait must be seconds (0-60)") from None
    if not 0 <= value <= MAX_WAIT:  # also rejects nan
        raise errors.BadRequest("query parameter wait must be seconds (0-60)")
    return value


# -- the device side ------------------------------------------------------------


class SlidingMinute:
    """At most ``limit`` takes in any 60 seconds, counted in one-second buckets on ``clock``.

    A bucket leaves the window once all of it is more than 60 s old (so the
    window is 60 to 61 seconds long: never more than ``limit`` in a minute).
    """

    WINDOW = 60

    def __init__(self, clock: Any, limit: int):
        self._clock = clock
        self.limit = limit
        self._buckets: deque[list[int]] = deque()  # [second, takes], oldest first; at most WINDOW
        self._total = 0

    def take(self) -> bool:
        """Count one take now, if the window has room; False (nothing counted) if not."""
        now = int(self._clock.seconds())
        buckets = self._buckets
        while buckets and buckets[0][0] + 1 + self.WINDOW <= now:
            self._total -= buckets.popleft()[1]
        if self._total >= self.limit:
            return False
        if buckets and buckets[-1][0] == now:
            buckets[-1][1] += 1
        else:
            buckets.append([now, 1])
        self._total += 1
        return True


class DeviceSide:
    """``GET /push`` and ``POST /result`` for one daemon."""

    log = Logger()

    def __init__(self, ctx: Context, svc: CommandService):
        self.ctx = ctx
        self.svc = svc
        cfg = ctx.config.push
        self.auto_register = cfg.auto_register
        self.tenant = cfg.tenant
        self.networks = tuple(cfg.allowed_sources)
        self._allowed: dict[str, bool] = {}
        self._registering: dict[int, defer.Deferred] = {}
        self._logged_unknown: set[int] = set()
        self._logged_forbidden: set[str] = set()
        self.max_devices = cfg.max_devices
        self._rate = SlidingMinute(ctx.reactor, cfg.auto_register_per_minute)
        self._creating = 0  # auto-registrations written but not yet committed
        self._refused = 0  # refused since the last log line
        self._refused_logged_at: float | None = None

    # helpers

    @staticmethod
    def host_of(request: Any) -> str | None:
        return getattr(request.getClientAddress(), "host", None)

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

    @staticmethod
    def device_id(request: Any) -> int:
        values = request.args.get(b"deviceId")
        if values and _DEVICE_ID.match(values[0]):
            value = int(values[0])
            if -(2**63) <= value <= MAX_ID:
                return value
        raise errors.BadRequest("deviceId must be a signed 64-bit integer", code="invalid_device_id")

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

    def poll(self, request: Any) -> Any:
        host = self.host_of(request)
        if self.networks and not self.allowed(host):
            _polls_forbidden.inc()
            return self.forbidden(request, host, "poll")
        try:
            device_id = self.device_id(request)
        except errors.ApiError:
            _polls_bad.inc()
            raise
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
            if device_id not in self._registering and not self._may_register(device_id, host):
                _polls_unknown.inc()
                return self.empty(request)
            return defer.Deferred.fromCoroutine(self._register(request, device_id, host))
        self.svc.seen(device, host)
        if self.svc.hand_out_then(device, _sent, request) is None:
            return self.empty(request)
        request.quiet = True  # every send is an action event in the event log
        return NOT_DONE_YET  # answered by _sent once the send is committed

    @staticmethod
    def _command(request: Any, cmd: Command) -> bytes:
        request.quiet = True
        request.setHeader(b"content-type", b"application/json")
        return cmd.payload()

    async def _register(self, request: Any, device_id: int, host: str | None) -> Any:
        pending = self._registering.get(device_id)
        if pending is None:
            pending = self._registering[device_id] = defer.Deferred.fromCoroutine(
                self._put_device(device_id, host))
            pending.addBoth(lambda r: (self._registering.pop(device_id, None), r)[1])
        waiter: defer.Deferred = defer.Deferred()
        pending.addCallback(lambda device: (waiter.callback(device), device)[1])
        device = await waiter
        if device is None:
            _polls_unknown.inc()
            return self.empty(request)
        _polls_registered.inc()
        self.svc.seen(device, host)
        got = self.svc.hand_out(device)
        if got is None:
            return self.empty(request)
        cmd, committed = got
        await committed
        return self._command(request, cmd)

    async def _put_device(self, device_id: int, host: str | None) -> Any:
        registry = self.ctx.registry
        device = registry.by_push_id(device_id)
        if device is not None:
            return device
        identifier = str(device_id)
        if registry.get(self.tenant, identifier) is not None:
            self.unknown(device_id, host, "poll (a device named like it has another pushId)")
            return None
        self._creating += 1
        try:
            device, _ = await registry.put(self.tenant, identifier, {"pushId": device_id, "host": host})
        except errors.Conflict:
            return registry.by_push_id(device_id)
        except Exception:
            self.log.failure("auto-registering pushId {push_id} failed", push_id=device_id)
            return None
        finally:
            self._creating -= 1
        self.log.info("device {device} auto-registered (pushId {push_id}, host {host})",
                      device=device.identifier, push_id=device_id, host=host)
        return device

    def _may_register(self, device_id: int, host: str | None) -> bool:
        """``max_devices``, then ``auto_register_per_minute`` (a refused poll takes no slot)."""
        held = self.ctx.registry.count(self.tenant) + self._creating
        if held >= self.max_devices:
            why = f"the tenant {self.tenant} has {held} devices, [push] max_devices is {self.max_devices}"
        elif not self._rate.take():
            why = f"[push] auto_register_per_minute ({self._rate.limit}) reached"
        else:
            return True
        self._refused += 1
        now = self.ctx.reactor.seconds()
        if self._refused_logged_at is None or now - self._refused_logged_at >= SlidingMinute.WINDOW:
            self.log.warn("auto-registration refused for {refused} poll(s) since the last such line "
                          "(the latest: deviceId {device_id} at {host}): {why}",
                          refused=self._refused, device_id=device_id, host=host, why=why)
            self._refused_logged_at = now
            self._refused = 0
        return False

    # POST /result

    def result(self, request: Any) -> Any:
        host = self.host_of(request)
        if self.networks and not self.allowed(host):
            _results_forbidden.inc()
            return self.forbidden(request, host, "result")
        try:
            device_id = self.device_id(request)
        except errors.ApiError:
            _results_bad.inc()
            raise
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
        if not self.svc.complete_then(device, raw, endpoint, _completed, request):
            return b""  # an orphan
        return NOT_DONE_YET  # answered by _completed once the result is committed


class DeviceResource(Resource):
    """``GET /push`` and ``POST /result`` as a plain twisted.web leaf (no Klein machinery).

    A handler answers with bytes (idle poll, orphan), ``NOT_DONE_YET`` (a
    command or a result: answered by a callback once the store committed), or
    a Deferred (the first poll of an unknown device, or before the queue is loaded).
    """

    isLeaf = True

    def __init__(self, side: "DeviceSide"):
        super().__init__()
        self._side = side

    def render(self, request: Any) -> Any:
        path, method = request.path, request.method
        if path == b"/push" and method == b"GET":
            handler = self._side.poll
        elif path == b"/result" and method == b"POST":
            handler = self._side.result
        else:
            err = errors.MethodNotAllowed(f"method {method.decode('latin-1')[:20]} not allowed here")
            return respond(request, err.status, err.to_json())
        try:
            result = handler(request)
        except Exception:
            return _error_body(request, Failure())
        if result is NOT_DONE_YET or isinstance(result, bytes):
            return result
        result.addCallbacks(_answer, _failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET


def _answer(body: Any, request: Any) -> None:
    if body is NOT_DONE_YET or request.channel is None:  # answered elsewhere / the device hung up
        return
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _failed(failure: Failure, request: Any) -> None:
    if request.channel is not None:
        _answer(_error_body(request, failure), request)


def _sent(failure: Failure | None, cmd: Command, request: Any) -> None:
    """After a send committed: the command is the poll's answer."""
    if failure is not None:
        _failed(failure, request)
    else:
        request.setHeader(b"content-type", b"application/json")
        _answer(cmd.payload(), request)


def _completed(failure: Failure | None, request: Any) -> None:
    """After a result committed: the empty 200 that closes the push transaction."""
    if failure is not None:
        _failed(failure, request)
    else:
        _answer(b"", request)


def _error_body(request: Any, failure: Failure) -> bytes:
    """The JSON error the Klein app would answer (see iotd.web.app.make_app)."""
    err = failure.value
    if not isinstance(err, errors.ApiError):
        if failure.check(StoreUnavailable):
            err = errors.Unavailable("the store is unavailable")
        else:
            log.failure("request {method} {path} failed", failure, method=request.method, path=request.path)
            err = errors.ApiError("internal error", code="internal", status=500)
    return respond(request, err.status, err.to_json())


def device_routes(app: Klein, ctx: Context) -> None:
    """``GET /push`` and ``POST /result`` (also served alone on ``[push] listen``)."""
    device = DeviceResource(DeviceSide(ctx, ctx.jobs["push"]))

    @app.route("/push", methods=["GET"])
    def push_poll(request):
        if request.method != b"GET":  # werkzeug adds HEAD: it must not hand out a command
            raise errors.MethodNotAllowed("method HEAD not allowed here")
        return device

    @app.route("/result", methods=["POST"])
    def push_result(request):
        return device

    # The hot path: the site root answers these two before Klein's routing.
    add_fast_path(app, b"GET", b"/push", device)
    add_fast_path(app, b"POST", b"/result", device)


# -- the operator side ----------------------------------------------------------


def operator_routes(app: Klein, ctx: Context) -> None:
    """The commands REST (``commands:*``)."""
    svc: CommandService = ctx.jobs["push"]

    def visible(key: Any, cmd: Command) -> bool:
        if cmd.tenant != key.tenant:
            return False
        if not key.limited:
            return True
        device = ctx.registry.get(cmd.tenant, cmd.device)
        return device is not None and key.sees(device)

    async def stored(key: Any, command_id: int) -> Command:
        row = await ctx.store.read(cmdsql.get, command_id) if command_id <= MAX_ID else None
        cmd = Command.from_row(row) if row is not None else None
        if cmd is None or not visible(key, cmd):
            raise errors.NotFound(f"no command {command_id}")
        return cmd

    @app.route("/api/v1/devices/<identifier>/commands", methods=["POST"])
    async def commands_create(request, identifier):
        key = require(ctx, request, "commands", "create")
        device = visible_device(ctx, key, identifier)
        wait = _wait_seconds(request)
        spec = validate_command(read_json(request))
        cmd = await svc.create(key.tenant, device.identifier, spec)
        if wait is None:
            return respond(request, 201, cmd.to_json())
        cmd = await svc.wait(cmd, wait)
        return respond(request, 200 if cmd.finished else 202, cmd.to_json())

    @app.route("/api/v1/devices/<identifier>/commands", methods=["GET"])
    async def commands_list(request, identifier):
        key = require(ctx, request, "commands", "read")
        device = visible_device(ctx, key, identifier)
        status = arg(request, "status")
        if status is not None and status not in STATES:
            raise errors.BadRequest(f"query parameter status must be one of {', '.join(STATES)}")
        limit = query_int(request, "limit", 100, 1, 1000)
        after = query_int(request, "after", 0, 0, MAX_ID)
        rows = await ctx.store.read(cmdsql.list_for_device, key.tenant, device.identifier, status, after,
                                    limit + 1)
        items = [Command.from_row(r).to_json() for r in rows[:limit]]
        out: dict[str, Any] = {"items": items}
        if len(rows) > limit:
            out["next"] = items[-1]["id"]
        return respond(request, 200, out)

    @app.route("/api/v1/commands/<int:command_id>", methods=["GET"])
    async def commands_get(request, command_id):
        key = require(ctx, request, "commands", "read")
        cmd = await stored(key, command_id)
        return respond(request, 200, cmd.to_json())

    @app.route("/api/v1/commands/<int:command_id>", methods=["DELETE"])
    async def commands_cancel(request, command_id):
        key = require(ctx, request, "commands", "delete")
        await svc.when_ready()
        cmd = svc.unfinished(command_id)
        if cmd is not None and visible(key, cmd):
            await svc.cancel(cmd)
            return respond(request, 204)
        cmd = await stored(key, command_id)
        raise errors.Conflict(f"command {command_id} is {cmd.status if cmd.finished else 'finishing'}; "
                              "only a queued command can be cancelled")


def routes(app: Klein, ctx: Context) -> None:
    device_routes(app, ctx)
    operator_routes(app, ctx)


# -- the job --------------------------------------------------------------------


def job(ctx: Context, parent: service.MultiService):
    """Add the command service when ``[push] enabled``; returns the routes for the main app.

    With ``[push] listen`` set, ``/push`` and ``/result`` are served only on
    those endpoints (the devices' network) by a site of their own, and the
    main app gets only the operator REST.
    """
    cfg = ctx.config.push
    if not cfg.enabled:
        return None
    svc = CommandService(ctx.store, ctx.registry, ctx.events, ctx.reactor, cfg)
    svc.setServiceParent(parent)
    ctx.jobs["push"] = svc
    ctx.registry.add_delete_listener(svc.device_deleted)
    # Load the queue once the core (store, registry) is up; whoever awaits
    # core.started (tests, the start-up) then finds the queue loaded too.
    core = parent.getServiceNamed("core")
    core.started.addCallback(lambda result: defer.Deferred.fromCoroutine(svc.load()).addCallback(lambda _: result))
    if not cfg.listen:
        return routes
    site = make_site(ctx, make_app(ctx, [device_routes]), ready=lambda: svc.ready)
    for index, endpoint in enumerate(cfg.listen):
        listener = strports.service(endpoint, site, reactor=ctx.reactor)
        listener.setName(f"push-{index}")
        listener.setServiceParent(parent)
    return operator_routes
