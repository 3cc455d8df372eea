"""Closing another node's link: a request and its answer on the bus topic ``links``.

A link's sockets live on the node that made it, so ``DELETE`` on another
node asks the owner (:meth:`CloseForwarder.ask`)::

    asker -> all:  {"op": "close",  "rid": R, "to": OWNER, "token": T, "tenant": N}
    owner -> all:  {"op": "closed", "rid": R, "to": ASKER, "result": "closed" | "unknown" | "failed"}

Every node hears both (pub/sub) and acts only on messages whose ``to`` is
its own name.  The owner closes the link (of that tenant only), waits for
its sockets and its row delete, then answers ``closed``; ``unknown`` when it
has no such link of that tenant (it deletes a row of its own name for that
token anyway); ``failed`` when its close raised.  The asker's Deferred fires
with the result, or fails with :class:`CloseTimeout` after ``timeout``
seconds (the bus is at most once: a lost request or answer, a node that
died meanwhile).  ``rid`` is random, so an answer meant for an earlier
request, or for another node, matches nothing.  A malformed message is
dropped with a log line.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

from twisted.internet import defer

from iotd.logs import Logger

TOPIC = "links"
TIMEOUT = 5.0  # seconds the asker waits for the owner's answer
RESULTS = ("closed", "unknown", "failed")
_MAX_TEXT = 256

# close_here(token, tenant) -> Deferred firing with "closed" or "unknown"
CloseHere = Callable[[str, str], defer.Deferred]


class CloseTimeout(Exception):
    """The owning node did not answer in time."""


def _text(message: dict[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise ValueError(f"{name} must be a non-empty string")
    return value


class CloseForwarder:
    log = Logger()

    def __init__(self, cluster: Any, clock: Any, close_here: CloseHere, timeout: float = TIMEOUT) -> None:
        self.cluster = cluster
        self.clock = clock
        self.close_here = close_here
        self.timeout = timeout
        self._waiting: dict[str, tuple[defer.Deferred, Any]] = {}
        cluster.subscribe(TOPIC, self.received)

    def ask(self, node: str, token: str, tenant: str) -> defer.Deferred:
        """Ask ``node`` to close ``token`` (of ``tenant``); fires with a result of :data:`RESULTS`."""
        rid = secrets.token_hex(12)
        d: defer.Deferred = defer.Deferred()
        timer = self.clock.callLater(self.timeout, self._timed_out, rid)
        self._waiting[rid] = (d, timer)
        self.cluster.publish(TOPIC, {"op": "close", "rid": rid, "to": node, "token": token, "tenant": tenant})
        return d

    def pending(self) -> int:
        return len(self._waiting)

    def _timed_out(self, rid: str) -> None:
        entry = self._waiting.pop(rid, None)
        if entry is not None:
            entry[0].errback(CloseTimeout(f"no answer within {self.timeout:g} s"))

    def received(self, node: str, message: Any) -> None:
        """A message on ``links`` from ``node`` (the channel calls this)."""
        try:
            if not isinstance(message, dict):
                raise ValueError("not an object")
            op = message.get("op")
            if op not in ("close", "closed"):
                raise ValueError(f"unknown op {str(op)[:20]!r}")
            if _text(message, "to") != self.cluster.node:
                return
            rid = _text(message, "rid")
            if op == "close":
                token, tenant = _text(message, "token"), _text(message, "tenant")
            else:
                result = message.get("result")
                if result not in RESULTS:
                    raise ValueError("bad result")
        except ValueError as e:
            self.log.warn("bus: dropped a malformed links message from {node}: {error}",
                          node=str(node)[:64], error=str(e))
            return
        if op == "closed":
            entry = self._waiting.pop(rid, None)
            if entry is not None:
                d, timer = entry
                if timer.active():
                    timer.cancel()
                d.callback(result)
            return
        self._close_for(node, rid, token, tenant)

    def _close_for(self, asker: str, rid: str, token: str, tenant: str) -> None:
        d = defer.maybeDeferred(self.close_here, token, tenant)

        def failed(failure: Any) -> str:
            self.log.failure("closing link {token} for node {node} failed", failure,
                             token=token[:6], node=asker)
            return "failed"

        def answer(result: str) -> None:
            self.cluster.publish(TOPIC, {"op": "closed", "rid": rid, "to": asker, "result": result})

        d.addErrback(failed).addCallback(answer).addErrback(
            lambda f: self.log.failure("answering node {node} failed", f, node=asker))

    def stop(self) -> None:
        """Fail every request still waiting (service stop)."""
        waiting, self._waiting = self._waiting, {}
        for d, timer in waiting.values():
            if timer.active():
                timer.cancel()
            d.errback(CloseTimeout("the node is stopping"))
