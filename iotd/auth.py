"""The key ring: every API key in memory, kept in step with the store.

What a key is and may do (roles, grants, groups, tenants) is
:mod:`iotd.apikeys`; its names are re-exported here for the callers that
reach keys through this module.  The :class:`KeyRing` keeps every key in memory, found by its
SHA-256 digest in a dict: the secret itself is never compared with
anything, and what a lookup's timing could tell is about a digest no caller
can steer.  The ring keeps in step with the store:

- An unknown well-formed key is looked up in the store before the 401
  (:meth:`KeyRing.lookup`), so a key created by ``iotd-admin`` or another
  node works on the very next request.  There is no negative cache (it
  would delay a key just created); instead lookups are batched: one read at
  a time, up to ``LOOKUP_BATCH`` digests each, identical keys share one
  entry, and at most ``MAX_WAITING`` digests wait (fixed-size entries, well
  under 1 MB); beyond that a lookup fails with 503.  Digests of keys revoked
  while known are remembered (``MAX_REVOKED`` of them): a revoked secret can
  never become valid again, so those answer 401 without a read.
- Every key write returns the revision it produced.  The ring remembers the
  newest revision it wrote or read and ignores any snapshot older than that,
  so a reload read before a revoke committed cannot bring the key back.
- The revision is checked every 0.5 s (one read: the keys come in the same
  snapshot when it changed), so a key revoked by the CLI stops working, and
  its sockets close with 4401, within a second.
- One timer on the injected clock fires at the earliest ``expiresAt``; an
  expired key is reported to the same listeners as a revoked one.
- ``lastUsedAt`` is written at most once a minute per key (``TOUCH_EVERY``,
  measured on the ring's clock against the stored value).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from iotd import errors, metrics
from iotd.apikeys import (ACTIONS, RESOURCES, ROLES, ApiKey, digest_of, from_row, hash_key, key_row,
                          new_secret, presented_key, validate_key_request)
from iotd.logs import Logger
from iotd.store import StoreUnavailable
from iotd.store import keys as keysql

__all__ = ["ACTIONS", "RESOURCES", "ROLES", "ApiKey", "KeyRing", "digest_of", "hash_key", "key_row",
           "new_secret", "presented_key", "validate_key_request"]

TOUCH_EVERY = 60.0  # seconds between lastUsedAt writes for one key
_TOUCH_EVERY_US = int(TOUCH_EVERY * 1_000_000)


class KeyRing:
    """Every API key of the store, in memory, kept in step with the store."""

    log = Logger()
    POLL = 0.5
    LOOKUP_BATCH = 500  # digests per lookup read
    MAX_WAITING = 10_000  # distinct digests waiting for a lookup
    MAX_REVOKED = 10_000  # digests of revoked keys answered 401 without a read
    STALE_RETRIES = 3  # lookup reads retried when a key write committed meanwhile

    def __init__(self, store: Any, clock: Any):
        self._store = store
        self._clock = clock
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        self._revision = -1  # the store revision the whole view reflects
        self._seen = -1  # the newest revision written or read: older snapshots are stale
        self._last_used: dict[str, int] = {}
        self._pending_touch: dict[str, int] = {}
        self._touch_refused = False
        self._listeners: list[Callable[[str], None]] = []
        self._revoked_hashes: dict[str, None] = {}  # insertion-ordered, bounded
        self._waiting: dict[str, list[defer.Deferred]] = {}
        self._looking = False
        self._expiry: list[tuple[int, str]] = []  # heap of (expires_at, key id)
        self._expiry_call: Any = None
        self._expired_until = self._now_us()  # expiries up to here have been reported
        self._stopped = False
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock
        self._write_listeners: list[Callable[[int], None]] = []
        self._polling = False
        self._poll_refused = False

    async def start(self) -> None:
        await self.reload()
        self._loop.start(self.POLL, now=False).addErrback(
            lambda f: self.log.failure("key poll stopped", f)
        )

    def stop(self) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None

    def add_revoke_listener(self, fn: Callable[[str], None]) -> None:
        """``fn(key_id)`` is called when a key is revoked (here or by the CLI) or expires."""
        self._listeners.append(fn)

    def _now_us(self) -> int:
        return int(self._clock.seconds() * 1_000_000)

    # -- snapshots and revisions ----------------------------------------------

    async def reload(self) -> None:
        revision, rows = await self._store.read(keysql.all_keys)
        self._apply(revision, rows)

    def _apply(self, revision: int, rows: list[dict[str, Any]]) -> bool:
        """Install a snapshot of every key, unless it is older than what the ring knows."""
        if revision < self._seen:
            self.log.debug("ignored a key snapshot of revision {revision} (ring at {seen})",
                           revision=revision, seen=self._seen)
            return False
        self._seen = self._revision = revision
        keys = [from_row(r) for r in rows]
        gone = [self._by_id[key_id] for key_id in set(self._by_id) - {k.id for k in keys}]
        self._by_id = {k.id: k for k in keys}
        self._by_hash = {k.key_hash: k for k in keys}
        for r in rows:
            self._remember_use(r["id"], r.get("last_used_at"))
        for key in gone:
            self._forget(key)
        self._rebuild_expiry()
        for key in gone:
            self._revoked(key.id)
        return True

    def _wrote(self, revision: int) -> None:
        """Our own write produced ``revision``."""
        if revision == self._revision + 1:
            self._revision = revision  # nothing else changed in between
        self._seen = max(self._seen, revision)
        for fn in list(self._write_listeners):
            fn(revision)

    def add_write_listener(self, fn: Callable[[int], None]) -> None:
        """``fn(revision)`` after each key write of this process (to tell the other nodes)."""
        self._write_listeners.append(fn)

    def poll_now(self) -> defer.Deferred:
        """Read the key changes now (another node wrote), instead of at the next poll."""
        return defer.Deferred.fromCoroutine(self._poll())

    def _install(self, key: ApiKey) -> None:
        self._by_id[key.id] = key
        self._by_hash[key.key_hash] = key
        if key.expires_at is not None and key.expires_at > self._expired_until:
            heapq.heappush(self._expiry, (key.expires_at, key.id))
            if self._expiry[0] == (key.expires_at, key.id):
                self._schedule_expiry()

    def _forget(self, key: ApiKey) -> None:
        self._by_id.pop(key.id, None)
        self._by_hash.pop(key.key_hash, None)
        self._last_used.pop(key.id, None)
        self._pending_touch.pop(key.id, None)
        self._revoked_hashes[key.key_hash] = None
        while len(self._revoked_hashes) > self.MAX_REVOKED:
            del self._revoked_hashes[next(iter(self._revoked_hashes))]

    def _revoked(self, key_id: str, why: str = "revoked") -> None:
        self.log.info("api key {key_id} " + why, key_id=key_id)
        for fn in list(self._listeners):
            try:
                fn(key_id)
            except Exception:
                self.log.failure("revoke listener failed")

    async def _poll(self) -> None:
        if self._polling:
            return
        self._polling = True
        try:
            await self._poll_once()
        finally:
            self._polling = False

    async def _poll_once(self) -> None:
        try:
            revision, rows = await self._store.read(keysql.changed_since, self._revision)
            if rows is not None:
                self._apply(revision, rows)
            if self._pending_touch:
                used, self._pending_touch = self._pending_touch, {}
                try:
                    await self._store.write(keysql.touch, list(used.items()))
                except StoreUnavailable:  # disk full, file gone: try again at the next poll
                    self._pending_touch = {**used, **self._pending_touch}
                    if not self._touch_refused:
                        self._touch_refused = True
                        self.log.warn("lastUsedAt not written: the store refuses writes")
                else:
                    self._touch_refused = False
        except StoreUnavailable as e:  # the store is down: say so once, not twice a second
            if not self._poll_refused:
                self._poll_refused = True
                self.log.warn("key poll: the store does not answer ({error}); keys as last read", error=e)
            return
        except Exception:
            self.log.failure("key poll failed")
            return
        if self._poll_refused:
            self._poll_refused = False
            self.log.info("key poll: the store answers again")

    # -- expiry ------------------------------------------------------------------

    def _rebuild_expiry(self) -> None:
        since = self._expired_until  # a key that expired since then is still reported
        self._expiry = [(k.expires_at, k.id) for k in self._by_id.values()
                        if k.expires_at is not None and k.expires_at > since]
        heapq.heapify(self._expiry)
        self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None
        if self._expiry and not self._stopped:
            delay = max(0.0, (self._expiry[0][0] - self._now_us()) / 1_000_000)
            self._expiry_call = self._clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._expiry_call = None
        now_us = self._expired_until = self._now_us()
        due = []
        while self._expiry and self._expiry[0][0] <= now_us:
            expires_at, key_id = heapq.heappop(self._expiry)
            key = self._by_id.get(key_id)
            if key is not None and key.expires_at == expires_at:
                due.append(key_id)
        if len(self._expiry) > 2 * len(self._by_id) + 16:  # entries of revoked keys
            self._rebuild_expiry()
        else:
            self._schedule_expiry()
        for key_id in due:
            self._revoked(key_id, "expired")

    # -- authentication ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The live key for ``secret``, or None (unknown, malformed or expired)."""
        digest = digest_of(secret)
        key = self._by_hash.get(digest) if digest is not None else None
        if key is None:
            return None
        now_us = self._now_us()
        if key.expired(now_us):
            return None
        last = self._last_used.get(key.id)
        if last is None or now_us - last >= _TOUCH_EVERY_US:
            self._last_used[key.id] = now_us
            self._pending_touch[key.id] = now_us
        return key

    def unknown(self, secret: str | None) -> bool:
        """Is ``secret`` well-formed but neither known nor revoked (worth a store lookup)?"""
        digest = digest_of(secret)
        return digest is not None and digest not in self._by_hash and digest not in self._revoked_hashes

    def lookup(self, secret: str) -> defer.Deferred:
        """Look ``secret`` up in the store; fires with its key (now in the ring) or None.

        Fails with :class:`errors.Unavailable` when too many lookups wait.
        """
        digest = digest_of(secret)
        if digest is None:
            return defer.succeed(None)
        if digest in self._by_hash:
            return defer.succeed(self._by_hash[digest])
        if digest not in self._waiting and len(self._waiting) >= self.MAX_WAITING:
            metrics.key_lookups.labels("refused").inc()
            return defer.fail(errors.Unavailable("too many unknown API keys are being looked up; retry"))
        d: defer.Deferred = defer.Deferred()
        self._waiting.setdefault(digest, []).append(d)
        if not self._looking:
            self._looking = True
            defer.Deferred.fromCoroutine(self._look_up_waiting()).addErrback(
                lambda f: self.log.failure("key lookup stopped", f))
        return d

    async def _look_up_waiting(self) -> None:
        try:
            while self._waiting:
                # Only the requests already waiting: a later one may carry a key committed after this read began.
                batch = {digest: len(waiters) for digest, waiters in
                         itertools.islice(self._waiting.items(), self.LOOKUP_BATCH)}
                failure = None
                try:
                    await self._read_keys(list(batch))
                except Exception:
                    self.log.failure("key lookup failed")
                    failure = errors.Unavailable("the store is unavailable")
                for digest, count in batch.items():
                    waiters = self._waiting.pop(digest)
                    if len(waiters) > count:
                        self._waiting[digest] = waiters[count:]
                    key = self._by_hash.get(digest)
                    outcome = "failed" if failure is not None else "found" if key is not None else "unknown"
                    metrics.key_lookups.labels(outcome).inc(count)
                    for d in waiters[:count]:
                        if failure is not None:
                            d.errback(failure)
                        else:
                            d.callback(key)
        finally:
            self._looking = False

    async def _read_keys(self, digests: list[str]) -> None:
        """Install the stored keys with these digests, from a snapshot no older than the ring."""
        for _ in range(self.STALE_RETRIES):
            revision, rows = await self._store.read(keysql.by_hashes, digests)
            if revision >= self._seen:
                break
        else:
            return  # key writes kept committing meanwhile: these requests get their 401
        self._seen = revision
        for row in rows:
            if row["key_hash"] not in self._by_hash:
                self._install(from_row(row))
                self._remember_use(row["id"], row.get("last_used_at"))

    # -- last use ----------------------------------------------------------------

    def _remember_use(self, key_id: str, used_at: int | None) -> None:
        if used_at is not None and used_at > self._last_used.get(key_id, -1):
            self._last_used[key_id] = used_at

    def last_used(self, key_id: str) -> int | None:
        """When the key last authenticated (micros; recorded at most once a minute), or None."""
        return self._last_used.get(key_id)

    # -- keys by id, and writes -------------------------------------------------

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def list(self, tenant: str) -> list[ApiKey]:
        return sorted((k for k in self._by_id.values() if k.tenant == tenant), key=lambda k: k.id)

    async def find(self, key_id: str, tenant: str) -> ApiKey | None:
        """The tenant's key with this id, also one the ring has not loaded yet (read, not installed)."""
        key = self._by_id.get(key_id)
        if key is None:
            row = await self._store.read(keysql.by_id, key_id)
            key = from_row(row) if row is not None else None
        return key if key is not None and key.tenant == tenant else None

    async def create(self, tenant: str, name: str, role: str, groups: Iterable[str] = (),
                     permissions: Iterable[str] = (), expires_at: int | None = None) -> tuple[ApiKey, str]:
        row, secret = key_row(tenant, name, role, groups, permissions, self._now_us(), expires_at)
        revision = await self._store.write(keysql.insert, row)
        self._wrote(revision)
        key = from_row(row)
        self._install(key)
        self.log.info("api key {key_id} created for tenant {tenant} role {role}",
                      key_id=key.id, tenant=tenant, role=role)
        return key, secret

    async def revoke(self, key_id: str, tenant: str) -> bool:
        revision = await self._store.write(keysql.delete, key_id, tenant)
        if revision is None:
            return False
        self._wrote(revision)
        key = self._by_id.get(key_id)
        if key is not None:
            self._forget(key)
            self._revoked(key_id)
        return True
