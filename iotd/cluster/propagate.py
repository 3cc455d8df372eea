"""Key and registry changes made on one node reach the others within a second.

A key write (create, revoke) publishes ``keys``; the other nodes read the key
changes at once (:meth:`iotd.auth.KeyRing.poll_now`) -- revoked keys' sockets
close with 4401 through the ring's revoke listeners, as on one node.  Their
half-second revision poll is the backstop for a lost message and for
``iotd-admin``.

A device or stream write publishes ``registry`` with what changed and the
registry revision it made; the other nodes read that one row again
(:meth:`iotd.registry.Registry.reload_device`, ``reload_stream``), a deleted
device running the delete listeners there too (its links close, its queued
commands are cancelled -- idempotently).  The backstop: every
:data:`REVISION_CHECK` seconds a node reads the store's registry revision, and
if it stays ahead of the changes the node applied for two checks in a row
(a message was lost) the node reloads the registry.  Without a bus (one node)
none of this runs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from iotd.logs import Logger

log = Logger()
REVISION_CHECK = 1.0


def propagate(cluster: Any, keys: Any, registry: Any, clock: Any) -> LoopingCall | None:
    """Wire the messages; returns the started revision check (None on one node)."""
    if not cluster.clustered:
        return None
    keys.add_write_listener(lambda revision: cluster.publish("keys", {"rev": revision}))
    cluster.subscribe("keys", lambda node, message: _track(keys.poll_now(), "keys"))

    registry.add_change_listener(lambda what, tenant, ident, rev: cluster.publish(
        "registry", {"what": what, "tenant": tenant, "id": ident, "rev": rev}))

    async def reload(what: str, tenant: str, ident: str, rev: int) -> None:
        if what == "device":
            await registry.reload_device(tenant, ident)
        else:
            await registry.reload_stream(tenant, ident)
        registry.applied(rev)

    def changed(node: str, message: dict[str, Any]) -> None:
        what, tenant, ident, rev = (message.get("what"), message.get("tenant"), message.get("id"),
                                    message.get("rev"))
        if what not in ("device", "stream") or not (isinstance(tenant, str) and isinstance(ident, str)
                                                    and isinstance(rev, int)):
            log.warn("bus: dropped a malformed registry message from {node}", node=node)
            return
        _track(defer.Deferred.fromCoroutine(reload(what, tenant, ident, rev)), "registry")

    cluster.subscribe("registry", changed)
    loop = LoopingCall(lambda: _track(defer.Deferred.fromCoroutine(registry.check_revision()), "registry"))
    loop.clock = clock
    loop.start(REVISION_CHECK, now=False)
    return loop


def _track(d: defer.Deferred, what: str) -> None:
    d.addErrback(lambda f: log.warn("bus: applying a {what} change failed: {error}", what=what,
                                    error=f.getErrorMessage()))
