"""``/healthz`` and ``/metrics`` (no key: bind ``[http] listen`` privately to hide them).

``/healthz`` is 200 ``{"status": "ok", "store": "ok", "version"}`` when a
read reaches the store and its health (:attr:`iotd.store.db.Store.health`)
is ``ok``; otherwise 503 with ``"status": "unavailable"`` and ``"store"``
saying why: ``"full"`` (disk full), ``"missing"`` (the database file was
removed under the daemon), ``"unreachable"`` (PostgreSQL does not answer) or
``"unavailable"`` (not running, or the read failed for another reason).
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
        if state != "ok":
            return respond(request, 503, {"status": "unavailable", "store": state, "version": __version__})
        return respond(request, 200, {"status": "ok", "store": "ok", "version": __version__})

    @app.route("/metrics", methods=["GET"])
    def metrics(request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest()
