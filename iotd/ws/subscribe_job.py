"""The subscriptions job: its service and its Klein route (the iThings connect URL).

The connect reads each parameter from the ``ithings-`` header, the plain
header, the ``ithings-`` query name, then the plain query name
(``ithings-token`` before ``token``, as the iThings server does);
``Authorization: Bearer`` and ``?auth=`` work too.  A key it does not know,
or a ``tenant-code`` that is not the key's, is the iThings ``401`` body.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.application import service

from iotd import metrics
from iotd.context import Context
from iotd.request import arg, header, respond
from iotd.ws.factory import SocketService
from iotd.ws.limits import Limits
from iotd.ws.subscribe import SubscribeFactory
from iotd.ws.upgrade import upgrade_key

AUTH_FAILED = {"code": 100002, "msg": "认证失败"}
CONNECT_PATH = "/api/v1/system/common/websocket/connect"


def connect_param(request: Any, name: str) -> str | None:
    """A connect parameter: ``ithings-`` header, header, ``ithings-`` query name, query name."""
    for read in (header, arg):
        for candidate in ("ithings-" + name, name):
            value = read(request, candidate)
            if value and value.strip():
                return value.strip()
    return None


def routes(app: Klein, ctx: Context, factory: SubscribeFactory) -> None:
    @app.route(CONNECT_PATH, methods=["GET"], endpoint="ws_subscribe_connect")
    async def connect(request: Any) -> Any:
        key = upgrade_key(ctx, request)
        tenant_code = connect_param(request, "tenant-code")
        if key is not None and tenant_code not in (None, key.tenant):
            metrics.auth_failures.inc()
            key = None
        if key is None:
            return respond(request, 401, AUTH_FAILED)
        app_code = connect_param(request, "app-code")
        project_id = connect_param(request, "project-id")

        def setup(sock: Any) -> None:
            sock.configure(app_code, project_id)

        return factory.upgrade(request, key, setup)


def job(ctx: Context, parent: service.MultiService, limits: Limits) -> Any:
    """The subscriptions' service (1001 on stop) and the route that upgrades to them."""
    factory = SubscribeFactory(ctx, limits)
    SocketService("subscribe-ws", factory).setServiceParent(parent)
    return lambda app, ctx: routes(app, ctx, factory)
