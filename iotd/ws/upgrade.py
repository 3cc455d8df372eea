"""The checks every websocket URL makes before the upgrade (both kinds).

Every header of an upgrade request must be UTF-8 (Autobahn parses them all
again after us): one that is not is a ``400`` ``invalid_header`` naming it,
before anything else is looked at.  Then the request's key is looked up in
the ring (a key the ring did not know yet was looked up in the store by the
site root before the route ran); ``Authorization: Bearer``, ``?auth=`` and
the subscription ``token`` forms all work (:func:`iotd.auth.presented_key`).
Every error is answered as JSON by the route, before the upgrade.
"""

from __future__ import annotations

from typing import Any

from iotd import errors, metrics
from iotd.apikeys import ApiKey
from iotd.context import Context
from iotd.request import check_headers, key_of


def upgrade_key(ctx: Context, request: Any) -> ApiKey | None:
    """The live key of an upgrade request (every header checked first), or None (counted
    as an authentication failure)."""
    check_headers(request)
    key = ctx.keys.authenticate(key_of(request))
    if key is None:
        metrics.auth_failures.inc()
    return key


def still_valid(ctx: Context, request: Any) -> None:
    """401 when the request's key was revoked or expired while the route awaited something."""
    if ctx.keys.authenticate(key_of(request)) is None:
        raise errors.Unauthorized("a valid API key is required")
