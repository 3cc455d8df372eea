"""API keys as the rest of iotd sees them: roles, grants, groups, tenants, and who may do what.

A key is 32 random bytes shown once as 64 hex characters; only its SHA-256
is stored (:func:`hash_key`).  :class:`ApiKey` answers the permission
questions (:meth:`~ApiKey.allows`, :meth:`~ApiKey.sees`,
:meth:`~ApiKey.covers`); :func:`presented_key` finds the key a request
carries.  The keys in memory, kept in step with the store, are
:class:`iotd.auth.KeyRing`'s.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any, Callable, Iterable

import attrs

from iotd import errors

RESOURCES = ("devices", "commands", "deviceLink", "packets", "readings", "apiKeys")
ACTIONS = ("create", "read", "update", "delete")
ROLES = ("admin", "read_only", "group")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


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

    def covers_key(self, other: ApiKey) -> bool:
        """Are ``other``'s rights a subset of ours (same tenant)?"""
        return other.tenant == self.tenant and self.covers(other.role, other.groups, other.permissions)

    def outlived_by(self, expires_at: int | None) -> bool:
        """Would a key expiring at ``expires_at`` (None: never) outlive this one?"""
        if self.expires_at is None:
            return False
        return expires_at is None or expires_at > self.expires_at

    def expired(self, now_us: int) -> bool:
        return self.expires_at is not None and now_us >= self.expires_at

    def to_json(self, last_used_at: int | None = None) -> dict[str, Any]:
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
        if last_used_at is not None:
            out["lastUsedAt"] = iso(last_used_at)
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


def from_row(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=row["id"], tenant=row["tenant"], name=row["name"], role=row["role"],
        groups=frozenset(row["groups"]), permissions=frozenset(row["permissions"]),
        key_hash=row["key_hash"], created_at=row["created_at"], expires_at=row["expires_at"],
    )


def digest_of(secret: str | None) -> str | None:
    """The SHA-256 hex digest of a well-formed key (64 hex digits, any case), else None."""
    if not secret or not _HEX64.match(secret):
        return None
    return hash_key(secret)


def presented_key(header: Callable[[str], str | None], query: Callable[[str], str | None]) -> str | None:
    """The key a request carries: Bearer header, ``ithings-token``/``token`` header, then query
    ``auth``, ``ithings-token``, ``token`` (``ithings-`` before the plain name, as iThings does)."""
    value = header("authorization")
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    for name in ("ithings-token", "token"):
        value = header(name)
        if value:
            return value.strip()
    for name in ("auth", "ithings-token", "token"):
        value = query(name)
        if value:
            return value
    return None
