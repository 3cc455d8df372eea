"""API keys, roles, grants, groups and tenants.

A key is 32 random bytes shown once as 64 hex characters; only its SHA-256
is stored.  The :class:`KeyRing` keeps every key in memory (looked up by
hash, so the secret itself is never compared), reloads when the store's key
revision changes (checked every 0.5 s, so a key revoked by the CLI stops
working within a second) and tells listeners which keys went away.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any, Callable, Iterable

import attrs
from twisted.internet.task import LoopingCall

from iotd import errors
from iotd.logs import Logger
from iotd.store import keys as keysql

RESOURCES = ("devices", "commands", "deviceLink", "packets", "readings", "apiKeys")
ACTIONS = ("create", "read", "update", "delete")
ROLES = ("admin", "read_only", "group")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
TOUCH_EVERY = 60.0  # seconds between lastUsedAt writes for one key


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.lower().encode("ascii")).hexdigest()


def new_secret() -> str:
    return secrets.token_bytes(32).hex()


@attrs.frozen
class ApiKey:
    id: str
    tenant: str
    name: str
    role: str
    groups: frozenset[str]
    permissions: frozenset[str]
    key_hash: str = attrs.field(repr=False)
    created_at: int = 0
    expires_at: int | None = None

    def allows(self, resource: str, action: str) -> bool:
        """May this key do ``action`` on ``resource`` (within its device scope)?"""
        if self.role == "admin" or action == "read":
            return True
        return f"{resource}:{action}" in self.permissions

    @property
    def limited(self) -> bool:
        """True when the key reaches only the devices of its groups."""
        return self.role == "group"

    def sees(self, device: Any) -> bool:
        """May this key read ``device`` (same tenant, and in its groups if limited)?"""
        if device.tenant != self.tenant:
            return False
        if self.role != "group":
            return True
        return not self.groups.isdisjoint(device.tags)

    def covers(self, role: str, groups: Iterable[str], permissions: Iterable[str]) -> bool:
        """Are the rights of a key with these attributes a subset of ours?"""
        rank = {"group": 1, "read_only": 2, "admin": 3}
        if rank[role] > rank[self.role]:
            return False
        if self.role == "group" and not set(groups) <= self.groups:
            return False
        return all(self.allows(*p.split(":", 1)) for p in permissions)

    def to_json(self) -> dict[str, Any]:
        from iotd.timefmt import iso

        out = {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "tenant": self.tenant,
            "groups": sorted(self.groups),
            "permissions": sorted(self.permissions),
            "createdAt": iso(self.created_at),
        }
        if self.expires_at is not None:
            out["expiresAt"] = iso(self.expires_at)
        return out


def validate_key_request(role: Any, groups: Any, permissions: Any, name: Any) -> None:
    """Raise :class:`errors.Invalid` naming the first bad field."""
    if role not in ROLES:
        raise errors.Invalid(f"role must be one of {', '.join(ROLES)}")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise errors.Invalid("name must be a string of 1-200 characters")
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise errors.Invalid("groups must be a list of non-empty strings")
    if role == "group" and not groups:
        raise errors.Invalid("groups: a group key needs at least one group")
    if not isinstance(permissions, list):
        raise errors.Invalid("permissions must be a list of 'resource:action' strings")
    for p in permissions:
        if not isinstance(p, str) or p.count(":") != 1:
            raise errors.Invalid("permissions must be a list of 'resource:action' strings")
        resource, action = p.split(":")
        if resource not in RESOURCES or action not in ACTIONS:
            raise errors.Invalid(f"permissions: unknown grant {p!r}")


def key_row(tenant: str, name: str, role: str, groups: Iterable[str], permissions: Iterable[str],
            now_us: int, expires_at: int | None = None) -> tuple[dict[str, Any], str]:
    """A new key's store row and its secret (shown once)."""
    secret = new_secret()
    row = {
        "id": "k" + secrets.token_hex(8),
        "tenant": tenant,
        "name": name,
        "role": role,
        "groups": sorted(set(groups)),
        "permissions": sorted(set(permissions)),
        "key_hash": hash_key(secret),
        "created_at": now_us,
        "expires_at": expires_at,
    }
    return row, secret


def _from_row(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=row["id"], tenant=row["tenant"], name=row["name"], role=row["role"],
        groups=frozenset(row["groups"]), permissions=frozenset(row["permissions"]),
        key_hash=row["key_hash"], created_at=row["created_at"], expires_at=row["expires_at"],
    )


def presented_key(header: Callable[[str], str | None], query: Callable[[str], str | None]) -> str | None:
    """The key a request carries: Bearer header, ``auth`` or ``token`` (header or query)."""
    value = header("authorization")
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    for name in ("token", "ithings-token"):
        value = header(name)
        if value:
            return value.strip()
    for name in ("auth", "token"):
        value = query(name)
        if value:
            return value
    return None


class KeyRing:
    """Every API key of the store, in memory, kept in step with the store."""

    log = Logger()
    POLL = 0.5

    def __init__(self, store: Any, clock: Any):
        self._store = store
        self._clock = clock
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        self._revision = -1
        self._touched: dict[str, float] = {}
        self._pending_touch: dict[str, int] = {}
        self._listeners: list[Callable[[str], None]] = []
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock

    async def start(self) -> None:
        await self.reload()
        self._loop.start(self.POLL, now=False).addErrback(
            lambda f: self.log.failure("key poll stopped", f)
        )

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def add_revoke_listener(self, fn: Callable[[str], None]) -> None:
        """``fn(key_id)`` is called when a key is revoked (here or by the CLI)."""
        self._listeners.append(fn)

    async def reload(self) -> None:
        revision, rows = await self._store.read(keysql.all_keys)
        self._apply(revision, rows)

    def _apply(self, revision: int, rows: list[dict[str, Any]]) -> None:
        keys = [_from_row(r) for r in rows]
        gone = set(self._by_id) - {k.id for k in keys}
        self._by_id = {k.id: k for k in keys}
        self._by_hash = {k.key_hash: k for k in keys}
        self._revision = revision
        for key_id in gone:
            self._revoked(key_id)

    def _revoked(self, key_id: str) -> None:
        self.log.info("api key {key_id} revoked", key_id=key_id)
        for fn in list(self._listeners):
            try:
                fn(key_id)
            except Exception:
                self.log.failure("revoke listener failed")

    async def _poll(self) -> None:
        try:
            revision = await self._store.read(keysql.revision)
            if revision != self._revision:
                await self.reload()
            if self._pending_touch:
                used, self._pending_touch = list(self._pending_touch.items()), {}
                await self._store.write(keysql.touch, used)
        except Exception:
            self.log.failure("key poll failed")

    def __len__(self) -> int:
        return len(self._by_id)

    def authenticate(self, secret: str | None) -> ApiKey | None:
        """The live key for ``secret``, or None (unknown, malformed or expired)."""
        if not secret or not _HEX64.match(secret):
            return None
        digest = hash_key(secret)
        key = self._by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.key_hash, digest):
            return None
        now = self._clock.seconds()
        now_us = int(now * 1_000_000)
        if key.expires_at is not None and now_us >= key.expires_at:
            return None
        if now - self._touched.get(key.id, -TOUCH_EVERY) >= TOUCH_EVERY:
            self._touched[key.id] = now
            self._pending_touch[key.id] = now_us
        return key

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def list(self, tenant: str) -> list[ApiKey]:
        return sorted((k for k in self._by_id.values() if k.tenant == tenant), key=lambda k: k.id)

    async def create(self, tenant: str, name: str, role: str, groups: Iterable[str] = (),
                     permissions: Iterable[str] = (), expires_at: int | None = None) -> tuple[ApiKey, str]:
        row, secret = key_row(tenant, name, role, groups, permissions,
                              int(self._clock.seconds() * 1_000_000), expires_at)
        await self._store.write(keysql.insert, row)
        key = _from_row(row)
        self._by_id[key.id] = key
        self._by_hash[key.key_hash] = key
        self.log.info("api key {key_id} created for tenant {tenant} role {role}",
                      key_id=key.id, tenant=tenant, role=role)
        return key, secret

    async def revoke(self, key_id: str, tenant: str) -> bool:
        removed = await self._store.write(keysql.delete, key_id, tenant)
        key = self._by_id.pop(key_id, None) if removed else None
        if key is not None:
            self._by_hash.pop(key.key_hash, None)
            self._revoked(key_id)
        return removed
