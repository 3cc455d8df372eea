"""``GET /api/v1/openapi.json`` (no key): the document of :mod:`iotd.web.openapi_doc`, serialized once."""

from __future__ import annotations

from klein import Klein

from iotd.context import Context
from iotd.request import respond
from iotd.web.openapi_doc import document


def routes(app: Klein, ctx: Context) -> None:
    body = document()

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(request):
        return respond(request, 200, body)
