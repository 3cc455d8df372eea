"""Errors that reach a REST client as ``{"error": {"code", "message"}}``.

Raised anywhere below the web layer; the Klein app turns them into the
JSON body and status.  Never carries a traceback to the client.
"""

from __future__ import annotations


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class Conflict(ApiError):
    status, code = 409, "conflict"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Invalid(ApiError):
    """Well-formed but invalid (422)."""

    status, code = 422, "invalid_body"


class ItemInvalid(Invalid):
    """Invalid (422) about item ``index`` of a call that writes many (a batch); the handler names the item."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class Unavailable(ApiError):
    status, code = 503, "unavailable"


def require_object(value: object, allowed: set[str], what: str = "body") -> dict:
    """``value`` as a dict with only ``allowed`` keys, else :class:`Invalid` naming the problem."""
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be a JSON object")
    unknown = set(value) - allowed
    if unknown:
        raise Invalid(f"unknown field {short(sorted(unknown)[0])}")
    return value


def short(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message, cut at ``limit`` characters (a client's text is not echoed whole)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")
