"""One tenant's device indexes: sorted identifiers, identifiers by tag, tags by selector.

See :mod:`iotd.registry` for what they make cheap.  They change on writes
(put, delete, load), never per event.
"""

from __future__ import annotations

import bisect
from typing import Iterator

from iotd.device import Device


class TenantIndex:
    """One tenant's indexes (see the module docstring)."""

    __slots__ = ("ids", "tags", "selections")

    def __init__(self) -> None:
        self.ids: list[str] = []  # sorted identifiers
        self.tags: dict[str, list[str]] = {}  # tag -> sorted identifiers
        self.selections: dict[tuple[str, ...], dict[str, int]] = {}  # selector -> {tag: devices}

    def add(self, device: Device, ordered: bool = True) -> None:
        """Index ``device``; with ``ordered=False`` the lists are sorted later (:meth:`sort`)."""
        ident, tags = device.identifier, set(device.tags)
        insert_sorted(self.ids, ident, ordered)
        for tag in tags:
            insert_sorted(self.tags.setdefault(tag, []), ident, ordered)
        if tags:
            for sel in device.selectors:
                counts = self.selections.setdefault(sel, {})
                for tag in tags:
                    counts[tag] = counts.get(tag, 0) + 1

    def remove(self, device: Device) -> None:
        ident, tags = device.identifier, set(device.tags)
        remove_sorted(self.ids, ident)
        for tag in tags:
            idents = self.tags.get(tag)
            if idents is not None:
                remove_sorted(idents, ident)
                if not idents:
                    del self.tags[tag]
        if tags:
            for sel in device.selectors:
                counts = self.selections.get(sel)
                if counts is None:
                    continue
                for tag in tags:
                    left = counts.get(tag, 0) - 1
                    if left > 0:
                        counts[tag] = left
                    else:
                        counts.pop(tag, None)
                if not counts:
                    del self.selections[sel]

    def sort(self) -> None:
        self.ids.sort()
        for idents in self.tags.values():
            idents.sort()


def insert_sorted(idents: list[str], ident: str, ordered: bool) -> None:
    if not ordered:
        idents.append(ident)
        return
    at = bisect.bisect_left(idents, ident)
    if at == len(idents) or idents[at] != ident:
        idents.insert(at, ident)


def remove_sorted(idents: list[str], ident: str) -> None:
    at = bisect.bisect_left(idents, ident)
    if at < len(idents) and idents[at] == ident:
        del idents[at]


def idents_after(idents: list[str], after: str | None) -> Iterator[str]:
    """The identifiers of a sorted list strictly greater than ``after``, lazily (by position:
    ``islice`` would step over the skipped ones)."""
    at = bisect.bisect_right(idents, after) if after is not None else 0
    while at < len(idents):
        yield idents[at]
        at += 1
