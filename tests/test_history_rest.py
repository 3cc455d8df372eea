"""REST history: paging with the cursor, windows, scopes and permissions as the sockets', ``pruned``."""

from __future__ import annotations

from urllib.parse import quote

import pytest_twisted

from iotd.timefmt import parse_iso


async def readings(daemon, device: str, count: int) -> list[dict]:
    items = [{"data": {"n": n}} for n in range(count)]
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/readings", items)
    assert status == 201, stored
    return stored


async def packets(daemon, device: str, count: int) -> list[dict]:
    items = [{"payload": {"n": n}} for n in range(count)]
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/packets", items)
    assert status == 201, stored
    return stored


async def get(daemon, path: str, key: str | None = None) -> tuple[int, dict]:
    return await daemon.request("GET", path, key=key)


async def walk(daemon, path: str, key: str | None = None) -> tuple[list[dict], int]:
    """Every item through ``next`` cursors, and how many pages it took."""
    items, pages, url = [], 0, path
    sep = "&" if "?" in path else "?"
    while True:
        status, body = await get(daemon, url, key)
        assert status == 200, body
        items += body["items"]
        pages += 1
        if "next" not in body:
            return items, pages
        url = f"{path}{sep}cursor={quote(body['next'])}"


@pytest_twisted.ensureDeferred
async def test_paging_250_readings_returns_each_once_in_order(daemon):
    await daemon.put_device("gate-01")
    await daemon.put_device("gate-02")
    stored = await readings(daemon, "gate-01", 250)
    await readings(daemon, "gate-02", 30)  # another device's readings are not in the scope
    before = stored[0]["inserted_at"]

    items, pages = await walk(daemon, "/api/v1/devices/gate-01/readings?limit=100")
    assert pages == 3
    assert items == stored[::-1]  # newest first by default, items exactly the stored bodies

    items, pages = await walk(daemon, f"/api/v1/devices/gate-01/readings?after_id=0&limit=100")
    assert pages == 3 and [i["id"] for i in items] == [s["id"] for s in stored]

    # `after` is exclusive and turns the order to oldest first; `order` overrides it
    items, _ = await walk(daemon, f"/api/v1/devices/gate-01/readings?after={quote(before)}&limit=70")
    assert items == stored[1:]
    items, _ = await walk(daemon, f"/api/v1/devices/gate-01/readings?after={quote(before)}&order=desc&limit=70")
    assert items == stored[1:][::-1]
    # events arriving while a client pages oldest first are on its later pages
    status, first = await get(daemon, "/api/v1/devices/gate-01/readings?after_id=0&limit=200")
    more = await readings(daemon, "gate-01", 3)
    status, second = await get(daemon, f"/api/v1/devices/gate-01/readings?cursor={quote(first['next'])}&limit=200")
    assert [i["id"] for i in first["items"] + second["items"]] == [s["id"] for s in stored + more]
    assert "next" not in second


@pytest_twisted.ensureDeferred
async def test_before_bounds_the_window_and_the_cursor_keeps_it(daemon):
    await daemon.put_device("gate-01")
    stored = await packets(daemon, "gate-01", 20)
    cut = stored[15]["inserted_at"]
    items, pages = await walk(daemon, f"/api/v1/devices/gate-01/packets?before={quote(cut)}&limit=4")
    assert pages == 4 and items == stored[:15][::-1]
    items, _ = await walk(daemon, f"/api/v1/devices/gate-01/packets?after={quote(stored[2]['inserted_at'])}"
                                  f"&before={quote(cut)}&limit=5")
    assert items == stored[3:15]
    await packets(daemon, "gate-01", 2)  # later than `before`: never in that window
    items, _ = await walk(daemon, f"/api/v1/devices/gate-01/packets?before={quote(cut)}&order=asc&limit=6")
    assert items == stored[:15]
    # a `before` later than every event: everything stored up to now
    status, body = await get(daemon, "/api/v1/devices/gate-01/packets?before=2999-01-01T00:00:00Z&limit=1000")
    assert status == 200 and len(body["items"]) == 22


@pytest_twisted.ensureDeferred
async def test_tag_stream_and_tenant_scopes(daemon):
    await daemon.put_device("a-1", tags=["north"])
    await daemon.put_device("a-2", tags=["north", "south"])
    await daemon.put_device("b-1", tags=["south"])
    stored = {d: await readings(daemon, d, 3) for d in ("a-1", "a-2", "b-1")}
    await packets(daemon, "b-1", 2)
    status, body = await get(daemon, "/api/v1/tags/north/readings?after_id=0&limit=4")
    assert status == 200 and len(body["items"]) == 4 and "next" in body
    items, _ = await walk(daemon, "/api/v1/tags/north/readings?after_id=0&limit=4")
    assert items == stored["a-1"] + stored["a-2"]
    status, _ = await daemon.request("PUT", "/api/v1/streams/s1", {"devices": ["B-1"], "tags": ["north"]})
    assert status == 201
    items, _ = await walk(daemon, "/api/v1/streams/s1/readings?limit=2&order=asc")
    assert items == stored["a-1"] + stored["a-2"] + stored["b-1"]
    items, _ = await walk(daemon, "/api/v1/readings?limit=5")
    assert items == (stored["a-1"] + stored["a-2"] + stored["b-1"])[::-1]
    status, body = await get(daemon, "/api/v1/packets")
    assert status == 200 and [i["device_id"] for i in body["items"]] == ["B-1", "B-1"]
    # a device's events: every kind, each item with its kind
    status, body = await get(daemon, "/api/v1/devices/b-1/events?order=asc")
    assert status == 200
    assert [i["kind"] for i in body["items"]] == ["reading"] * 3 + ["packet"] * 2
    assert [i["body"] for i in body["items"][:3]] == stored["b-1"]
    for path in ("/api/v1/devices/nope/readings", "/api/v1/tags/nope/packets", "/api/v1/streams/nope/readings"):
        status, body = await get(daemon, path)
        assert status == 404 and body["error"]["code"] == "not_found", path


@pytest_twisted.ensureDeferred
async def test_group_key_is_refused_outside_its_groups_and_tenant_wide(daemon):
    await daemon.put_device("a-1", tags=["north"])
    await daemon.put_device("b-1", tags=["south"])
    stored = await readings(daemon, "a-1", 2)
    await readings(daemon, "b-1", 2)
    group = await daemon.new_key("group", groups=["north"])
    for path in ("/api/v1/devices/b-1/readings", "/api/v1/devices/b-1/events", "/api/v1/tags/south/readings",
                 "/api/v1/readings", "/api/v1/packets"):
        status, body = await get(daemon, path, key=group)
        assert status == 403 and body["error"]["code"] == "forbidden", (path, body)
    status, body = await get(daemon, "/api/v1/devices/a-1/readings?order=asc", key=group)
    assert status == 200 and body["items"] == stored
    status, body = await get(daemon, "/api/v1/tags/north/readings?order=asc", key=group)
    assert status == 200 and body["items"] == stored
    status, _ = await daemon.request("PUT", "/api/v1/streams/both", {"devices": ["A-1", "B-1"]})
    status, body = await get(daemon, "/api/v1/streams/both/readings?order=asc", key=group)
    assert status == 200 and body["items"] == stored  # only the devices the key may read
    # a read_only key reads the tenant; a key without readings:read does not read readings
    reader = await daemon.new_key("read_only")
    status, body = await get(daemon, "/api/v1/readings?limit=1", key=reader)
    assert status == 200 and len(body["items"]) == 1
    status, body = await get(daemon, "/api/v1/readings", key="0" * 64)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    other = await daemon.new_key("admin", tenant="other")
    status, body = await get(daemon, "/api/v1/devices/a-1/readings", key=other)
    assert status == 404
    status, body = await get(daemon, "/api/v1/readings", key=other)
    assert status == 200 and body["items"] == []


@pytest_twisted.ensureDeferred
async def test_pruned_is_true_when_retention_removed_what_lay_after_after(daemon):
    await daemon.put_device("gate-01")
    stored = await readings(daemon, "gate-01", 6)
    status, body = await get(daemon, f"/api/v1/devices/gate-01/readings?after={quote(stored[0]['inserted_at'])}")
    assert status == 200 and "pruned" not in body and len(body["items"]) == 5
    assert await daemon.ctx.events.prune(parse_iso(stored[3]["inserted_at"])) == 3
    for query in (f"after={quote(stored[0]['inserted_at'])}", "after=2000-01-01T00:00:00Z",
                  f"after_id={stored[1]['id']}"):
        status, body = await get(daemon, f"/api/v1/devices/gate-01/readings?{query}&limit=2")
        assert status == 200 and body["pruned"] is True and body["items"] == stored[3:5], query
        status, body = await get(daemon, f"/api/v1/devices/gate-01/readings?cursor={quote(body['next'])}")
        assert body["items"] == stored[5:]
    # from the newest pruned event on, nothing is missing
    for query in (f"after={quote(stored[2]['inserted_at'])}", f"after_id={stored[2]['id']}",
                  ""):
        status, body = await get(daemon, f"/api/v1/devices/gate-01/readings?{query}")
        assert status == 200 and "pruned" not in body and len(body["items"]) == 3, query


@pytest_twisted.ensureDeferred
async def test_bad_query_is_a_400_naming_the_parameter(daemon):
    await daemon.put_device("gate-01")
    cases = {
        "after=yesterday": ("invalid_after", "after"),
        "before=2026-13-01": ("invalid_before", "before"),
        "order=up": ("invalid_query", "order"),
        "limit=0": ("bad_request", "limit"),
        "limit=1001": ("bad_request", "limit"),
        "after_id=-1": ("bad_request", "after_id"),
        "after_id=x": ("bad_request", "after_id"),
        "after=2026-01-01T00:00:00Z&after_id=3": ("invalid_query", "after_id"),
        "cursor=nonsense": ("invalid_cursor", "cursor"),
        "cursor=eyJvIjoieCJ9": ("invalid_cursor", "cursor"),
    }
    for query, (code, word) in cases.items():
        status, body = await get(daemon, f"/api/v1/devices/gate-01/packets?{query}")
        assert status == 400 and body["error"]["code"] == code and word in body["error"]["message"], (query, body)
