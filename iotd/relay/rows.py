"""This node's links in the store's ``links`` table, so every node can list them (spec 50).

Choices made:

- **At open** the link's row is written through the store writer (group
  commit) the moment :class:`~iotd.relay.links.LinkManager` reports the
  open; the relay never waits for it.  The create answer waits for that
  commit (:meth:`LinkRows.written`), so a ``201`` means every node lists the
  link.  A failed write does not fail the create: the link is open and works
  here; its row is written again by the next refresh.
- **At close** the row is deleted (queued after any earlier write of it: the
  writer keeps queue order).  A ``DELETE`` answers once that commit ended
  (:meth:`LinkRows.removed`, which never fails); a failed delete is retried
  by every refresh until it succeeds.
- **Counters**: every :data:`REFRESH_EVERY` seconds one store write rewrites
  the rows of the links whose counters (or last activity) changed since
  their row was written -- bounded work (at most ``max_links`` rows, one
  transaction), nothing on the hot path.  So another node shows a link's
  byte counts at most ``REFRESH_EVERY`` seconds old; this node shows its own
  live from memory.
- **At start** (:meth:`LinkRows.start`, once the store is open) the rows
  that carry this node's name are deleted: a node that was killed (``kill
  -9``) left them, and its sockets died with it.  Rows of *other* dead nodes
  are :mod:`iotd.relay.reaper`'s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

from iotd.logs import Logger
from iotd.relay.link import Link
from iotd.store import links as linksql

REFRESH_EVERY = 5.0  # seconds between two rewrites of changed rows


def link_doc(link: Link, node: str, public_host: str = "") -> dict[str, Any]:
    """What ``GET /api/v1/devicelink`` shows of ``link``, on any node: its JSON plus ``node`` (and ``host``)."""
    doc = link.to_json()
    doc["node"] = node
    if public_host:
        doc["host"] = public_host
    return doc


def _snapshot(link: Link) -> tuple:
    return (link.bytes_up, link.bytes_down, link.datagrams_up, link.datagrams_down,
            link.refused, link.dropped, link.rate_dropped, link.last_activity)


class LinkRows:
    """Keeps the ``links`` rows of this node (``node``) in step with its open links."""

    log = Logger()

    def __init__(self, store: Any, clock: Any, node: str, public_host: str = "",
                 refresh_every: float = REFRESH_EVERY) -> None:
        self.store = store
        self.clock = clock
        self.node = node
        self.public_host = public_host
        self.refresh_every = refresh_every
        self._links: dict[str, Link] = {}
        self._written: dict[str, tuple | None] = {}  # token -> the counters its row holds (None: not written)
        self._first: dict[str, defer.Deferred] = {}  # token -> its first write (until it ended)
        self._doomed: set[str] = set()  # tokens whose row delete failed: retried by refresh
        self._deleting: dict[str, defer.Deferred] = {}
        self._loop: task.LoopingCall | None = None
        self._busy = False

    def doc(self, link: Link) -> dict[str, Any]:
        return link_doc(link, self.node, self.public_host)

    # -- the manager's listeners ------------------------------------------------

    def opened(self, link: Link) -> None:
        """A link opened here: queue its row (see the module docstring)."""
        token = link.token
        self._links[token] = link
        self._written[token] = None
        d = self._write([link])
        self._first[token] = d
        d.addBoth(lambda _: _forget(self._first, token))
        link.on_closed(self.closed)

    def closed(self, link: Link, reason: str) -> None:
        token = link.token
        self._links.pop(token, None)
        self._written.pop(token, None)
        d = self._delete([token])
        self._deleting[token] = d
        d.addBoth(lambda _: _forget(self._deleting, token))

    def written(self, token: str) -> defer.Deferred:
        """Fires (with None, never fails) when the first write of ``token``'s row has ended."""
        return _quiet(self._first.get(token))

    def removed(self, token: str) -> defer.Deferred:
        """Fires (with None, never fails) when the delete of ``token``'s row has ended."""
        return _quiet(self._deleting.get(token))

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Delete this node's rows left by an earlier run, then start the refresh."""
        try:
            stale = await self.store.write(linksql.delete_node, self.node)
        except Exception:
            self.log.failure("could not delete this node's stale link rows; the refresh retries")
            self._doomed.add("*")
        else:
            if stale:
                self.log.info("deleted {count} link rows an earlier run of node {node} left",
                              count=stale, node=self.node)
        if self._loop is None and self.refresh_every > 0:
            self._loop = task.LoopingCall(self.refresh)
            self._loop.clock = self.clock
            self._loop.start(self.refresh_every, now=False)

    def stop(self) -> defer.Deferred:
        """Stop the refresh; fires when the row writes queued so far have ended."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        pending = [_quiet(d) for d in list(self._first.values()) + list(self._deleting.values())]
        return defer.gatherResults(pending).addCallback(lambda _: None)

    # -- the refresh ------------------------------------------------------------

    def refresh(self) -> defer.Deferred:
        """One write of the rows whose link changed (or whose write failed), and the failed deletes."""
        if self._busy:  # the last refresh is still waiting for the store: skip this tick
            return defer.succeed(None)
        waits = []
        if self._doomed:
            doomed, self._doomed = self._doomed, set()
            if "*" in doomed:
                doomed.discard("*")
                waits.append(self.store.write(linksql.delete_node, self.node).addErrback(
                    lambda _: self._doomed.add("*")))
            if doomed:
                waits.append(self._delete(sorted(doomed)))
        changed = [link for token, link in self._links.items()
                   if token not in self._first and self._written.get(token) != _snapshot(link)]
        if changed:
            waits.append(self._write(changed))
        if not waits:
            return defer.succeed(None)
        self._busy = True

        def done(_: object) -> None:
            self._busy = False

        return defer.gatherResults([_quiet(d) for d in waits]).addBoth(done)

    def _write(self, links: list[Link]) -> defer.Deferred:
        rows, snaps = [], {}
        for link in links:
            snaps[link.token] = _snapshot(link)
            rows.append((link.token, self.node, link.tenant, int(link.created_at * 1_000_000), self.doc(link)))
            self._written[link.token] = snaps[link.token]
        d = self.store.write(linksql.upsert, rows, size=256 * len(rows))

        def failed(failure: Any) -> None:
            for token in snaps:
                if token in self._written:
                    self._written[token] = None  # the next refresh writes it again
            self.log.warn("could not write {count} link rows ({error}); the refresh retries",
                          count=len(rows), error=failure.getErrorMessage())

        d.addErrback(failed)
        return d

    def _delete(self, tokens: list[str]) -> defer.Deferred:
        d = self.store.write(linksql.delete, tokens, self.node)

        def failed(failure: Any) -> None:
            self._doomed.update(tokens)
            self.log.warn("could not delete {count} link rows ({error}); the refresh retries",
                          count=len(tokens), error=failure.getErrorMessage())

        d.addErrback(failed)
        return d


def _forget(table: dict[str, Any], token: str) -> None:
    table.pop(token, None)


def _quiet(d: defer.Deferred | None) -> defer.Deferred:
    """A Deferred that fires with None when ``d`` fires either way (at once without ``d``)."""
    out: defer.Deferred = defer.Deferred()
    if d is None:
        out.callback(None)
        return out

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out
