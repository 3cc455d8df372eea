"""The one Klein app: every REST area's routes, and every error as JSON.

Each REST area is a module with ``routes(app, ctx)`` that adds its routes to
the one :class:`klein.Klein` instance; a job's service adds its module's
routes when the tree is built (see :mod:`iotd.tap`).  Every error leaves as
``{"error": {"code", "message"}}`` JSON, never HTML or a traceback.  The HTTP
site around the app is :mod:`iotd.web.site`.
"""

from __future__ import annotations

from typing import Callable

from klein import Klein
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from iotd import errors
from iotd.context import Context
from iotd.request import respond
from iotd.web.answers import error_body


def make_app(ctx: Context, areas: list[Callable[[Klein, Context], None]]) -> Klein:
    app = Klein()

    @app.handle_errors(HTTPException)
    def http_error(request, failure):
        exc = failure.value
        if isinstance(exc, NotFound):
            err = errors.NotFound(f"no such path {request.path.decode('latin-1')[:200]}")
        elif isinstance(exc, MethodNotAllowed):
            err = errors.MethodNotAllowed(f"method {request.method.decode('latin-1')[:20]} not allowed here")
        else:
            err = errors.ApiError(exc.description or exc.name, code="http_error", status=exc.code or 400)
        return respond(request, err.status, err.to_json())

    @app.handle_errors(Exception)  # ApiError, StoreUnavailable, anything else (logged): as the fast paths
    def api_error(request, failure):
        return error_body(request, failure)

    for area in areas:
        area(app, ctx)
    return app
