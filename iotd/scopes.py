"""Event scopes (device, tag, stream, the whole tenant): who may open one, which devices it covers.

One place for the rules the event sockets (:mod:`iotd.ws.element_job`) and
the history endpoints (:mod:`iotd.web.history`) share, so both refuse and
choose exactly alike:

- the key needs ``read`` on the kind's resource (:data:`RESOURCES`);
- the whole tenant (``mandate``) is for ``admin`` and ``read_only`` keys only
  (a group key gets 403);
- a device the key may not read is 403 (unknown: 404); a tag outside a group
  key's groups is 403 (unknown: 404); an unknown stream is 404, and a stream
  read by a group key covers only the devices the key may read.

Membership (tags, streams) is looked up when asked, so registry changes apply
at once.  Nothing here walks every device: a tag's devices come from the
registry's tag index, a stream's from its device list and its tags' indexes.
"""

from __future__ import annotations

from typing import Any, Iterable

from iotd import errors

SCOPES = ("mandate", "device", "tag", "stream")
# event kind -> the resource whose `read` it needs
RESOURCES = {"packet": "packets", "reading": "readings", "action": "commands",
             "ota": "devices", "conn": "devices"}


def check_read(key: Any, kind: str) -> None:
    """403 unless ``key`` may read events of ``kind``."""
    resource = RESOURCES[kind]
    if not key.allows(resource, "read"):
        raise errors.Forbidden(f"this key lacks {resource}:read")


def open_scope(registry: Any, key: Any, scope: str, target: str | None) -> str:
    """The scope's canonical target ("" for the tenant) if ``key`` may read it; else 403/404."""
    tenant = key.tenant
    if scope == "mandate":
        if key.role not in ("admin", "read_only"):
            raise errors.Forbidden("tenant-wide events need an admin or read_only key")
        return ""
    assert target is not None
    if scope == "device":
        device = registry.get(tenant, target)
        if device is None:
            raise errors.NotFound(f"no device {errors.short(target)}")
        if not key.sees(device):
            raise errors.Forbidden(f"this key may not read device {device.identifier}")
        return device.identifier
    if scope == "tag":
        if key.limited and target not in key.groups:
            raise errors.Forbidden(f"tag {errors.short(target)} is not one of this key's groups")
        if not registry.has_tag(tenant, target):
            raise errors.NotFound(f"no tag {errors.short(target)}")
        return target
    if registry.stream(tenant, target) is None:
        raise errors.NotFound(f"no stream {errors.short(target)}")
    return target


def wants(registry: Any, key: Any, scope: str, target: str, event: Any, device: Any) -> bool:
    """Does the scope (read with ``key``) take ``event`` of ``device`` (None: unknown)?"""
    if key.limited and (device is None or not key.sees(device)):
        return False
    if scope == "mandate":
        return True
    if scope == "device":
        return event.device == target
    if scope == "tag":
        return device is not None and target in device.tags
    stream = registry.stream(key.tenant, target)
    if stream is None:
        return False
    return stream.names(event.device) or (device is not None and stream.contains(device))


def devices_of(registry: Any, key: Any, scope: str, target: str) -> Iterable[str] | None:
    """The identifiers whose stored events the scope covers for ``key`` (None: every device of the tenant)."""
    tenant = key.tenant
    if scope == "mandate":
        return None
    if scope == "device":
        return [target]
    if scope == "tag":
        return [d.identifier for d in registry.tagged(tenant, target) if key.sees(d)]
    stream = registry.stream(tenant, target)
    if stream is None:
        return []
    chosen = {d.identifier for tag in stream.tags for d in registry.tagged(tenant, tag) if key.sees(d)}
    for ident in stream.devices:
        device = registry.get(tenant, ident)
        if not key.limited or (device is not None and key.sees(device)):
            chosen.add(ident)
    return sorted(chosen)
