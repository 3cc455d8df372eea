"""``GET /api/v1/devicelink/{token}/socket``: a TCP link's client over a websocket on the HTTP port.

The token (>= 128 random bits) is the credential, as it is for the link's
port: no API key is asked for.  Every check is answered as JSON before the
upgrade: a header that is not UTF-8 ``400``; an unknown token (or one of a
link on another node, or closed) ``404``; a UDP link ``409``
(``not_tcp``); a request that is no websocket upgrade ``426``; a peer other
than the link's ``source`` ``403`` (``refused_source``); a link that already
has its client ``409`` (``link_taken``).  Then the websocket is the link's
one client (:mod:`iotd.relay.ws_side`).  The access log shows the path with
the token replaced (:func:`iotd.web.site.redact_uri`).
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from iotd import errors
from iotd.request import check_headers, header

PATH = "/api/v1/devicelink/<token>/socket"


def routes(app: Klein, manager: Any, sockets: Any) -> None:
    """``manager``: the node's :class:`~iotd.relay.links.LinkManager`; ``sockets``: its
    :class:`~iotd.relay.ws_side.LinkSockets`."""

    @app.route(PATH, methods=["GET"], endpoint="ws_devicelink")  # ws_: a websocket URL (OpenAPI x-websockets)
    def link_socket(request, token):
        check_headers(request)
        link = manager.get(token)
        if link is None or link.closed:
            raise errors.NotFound("no such link on this node")
        if link.protocol != "tcp":
            raise errors.Conflict("only a tcp link can be used over a websocket", code="not_tcp")
        if "websocket" not in (header(request, "upgrade") or "").lower():
            raise errors.ApiError("this URL is a websocket: send an Upgrade: websocket request",
                                  code="upgrade_required", status=426)
        side = sockets.take(link, request.getClientAddress())
        if side == "refused_source":
            raise errors.Forbidden("this link is pinned to another source address", code="refused_source")
        if side == "refused_taken":
            raise errors.Conflict("this link already has its client", code="link_taken")
        for name in (b"origin", b"sec-websocket-origin"):  # the token authenticates, no cookies ride on
            request.requestHeaders.removeHeader(name)
        return sockets.resource(side)
