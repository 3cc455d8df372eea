"""``/healthz`` and ``/metrics`` (no key: bind ``[http] listen`` privately to hide them).

``/healthz`` answers ``{"status", "version", "node", "store", "bus"}``:

- 200 ``"status": "ok"`` when a read reaches the store, its health
  (:attr:`iotd.store.engine.Store.health`) is ``ok`` and the bus is up (one
  node's in-process bus always is);
- 200 ``"status": "degraded"`` while the bus between nodes is down
  (``"bus": "down"`` or ``"connecting"``): the node serves on, its sockets get
  its own events, and the other nodes' from the store about a second late;
  likewise while a component of :attr:`iotd.context.Context.health` is not
  ``ok`` (``"mqtt": "down"``: the broker is away; every other job serves on);
- 503 ``"status": "unavailable"`` when the store is not ``ok``, ``"store"``
  saying why: ``"full"`` (disk full), ``"missing"`` (the database file was
  removed under the daemon), ``"unreachable"`` (PostgreSQL does not answer)
  or ``"unavailable"`` (not running, or the read failed for another reason).
"""

from __future__ import annotations

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from iotd import __version__
from iotd.context import Context
from iotd.request import respond


def _ping(conn):
    return conn.execute("SELECT 1").fetchone()[0]


def routes(app: Klein, ctx: Context) -> None:
    @app.route("/healthz", methods=["GET"])
    async def healthz(request):
        try:
            await ctx.store.read(_ping)
        except Exception:
            state = ctx.store.health if ctx.store.health != "ok" else "unavailable"
        else:
            state = ctx.store.health
        bus = ctx.cluster.channel.state
        body = {"version": __version__, "node": ctx.cluster.node, "store": state, "bus": bus}
        for name, check in ctx.health.items():
            body[name] = check()
        if state != "ok":
            return respond(request, 503, {"status": "unavailable", **body})
        others_ok = bus == "ok" and all(body[name] == "ok" for name in ctx.health)
        return respond(request, 200, {"status": "ok" if others_ok else "degraded", **body})

    @app.route("/metrics", methods=["GET"])
    def metrics(request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest()
