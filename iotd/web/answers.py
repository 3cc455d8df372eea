"""Answering a request outside Klein: the JSON error and the late answer, as the app writes them.

The hot paths the site root serves before Klein's routing (``/push``,
``/result``, the ingest POSTs: see :mod:`iotd.web.site`) answer exactly what
the Klein app would (:mod:`iotd.web.app` uses :func:`error_body` too): every
error as ``{"error": {"code", "message"}}`` JSON, an unexpected one logged and
answered ``500 internal``, a store that is down ``503``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from iotd import errors
from iotd.logs import Logger
from iotd.request import respond

log = Logger(namespace="iotd.web")


def error_body(request: Any, failure: Failure) -> bytes:
    """Set the status of ``failure``'s answer on ``request`` and return its JSON body."""
    from iotd.store import StoreUnavailable

    err = failure.value
    if not isinstance(err, errors.ApiError):
        if failure.check(StoreUnavailable):
            err = errors.Unavailable("the store is unavailable")
        else:
            log.failure("request {method} {path} failed", failure, method=request.method, path=request.path)
            err = errors.ApiError("internal error", code="internal", status=500)
    return respond(request, err.status, err.to_json())


def answer(body: Any, request: Any) -> None:
    """Write ``body`` and finish (nothing when answered elsewhere or the client hung up)."""
    if body is NOT_DONE_YET or request.channel is None:
        return
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def failed(failure: Failure, request: Any) -> None:
    if request.channel is not None:
        answer(error_body(request, failure), request)


def render(request: Any, handler: Any, *args: Any) -> Any:
    """``handler(request, *args)`` as a resource's ``render`` result.

    The handler answers bytes, ``NOT_DONE_YET`` (it finishes the request
    itself), a Deferred or a coroutine of bytes; what it raises is answered as
    :func:`error_body`.
    """
    try:
        result = handler(request, *args)
    except Exception:
        return error_body(request, Failure())
    if result is NOT_DONE_YET or isinstance(result, bytes):
        return result
    if not isinstance(result, defer.Deferred):
        result = defer.ensureDeferred(result)
    result.addCallbacks(answer, failed, callbackArgs=(request,), errbackArgs=(request,))
    return NOT_DONE_YET
