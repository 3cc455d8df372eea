#!/usr/bin/env python3
"""Follow an iotd (or ELEMENT) event socket and never miss an event.

    pip install websockets
    python examples/element_client.py ws://127.0.0.1:8080/api/v1/devices/GATE-01/readings/socket \\
        --key "$(cat var/admin.key)" [--after 2026-11-23T18:30:00.123456Z] [--preload device]

Prints one JSON line per event.  On any disconnect (network, daemon restart,
close 1008 "too slow", 4000 "replay limit") it reconnects with
``after`` = the ``inserted_at`` of the last event it printed, so the server
replays exactly what was missed.  It stops on 4401 (key revoked) and on an
HTTP 401/403/404 at the handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from urllib.parse import urlencode

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

FATAL_CLOSE = {4401}  # key revoked: reconnecting will not help
FATAL_STATUS = {400, 401, 403, 404}


def socket_url(base: str, key: str, after: str | None, preload: str | None) -> str:
    query = {"auth": key}
    if after:
        query["after"] = after
    if preload:
        query["preload"] = preload
    return f"{base}?{urlencode(query)}"


async def follow(base: str, key: str, after: str | None = None, preload: str | None = None) -> None:
    delay = 1.0
    while True:
        url = socket_url(base, key, after, preload)
        try:
            # websockets sends an RFC ping every 20 s: that keeps the socket out of the idle timeout
            async with websockets.connect(url, max_size=None, proxy=None) as ws:
                delay = 1.0
                async for message in ws:
                    if message == "pong":
                        continue
                    for event in json.loads(message):  # a frame is an array of events
                        print(json.dumps(event), flush=True)
                        after = event["body"]["inserted_at"]  # the exact resume point
                # a normal close (1000 idle, 1001 daemon stopping) ends the loop quietly
                print(f"closed {ws.close_code} {ws.close_reason}; resuming after {after}", file=sys.stderr)
        except InvalidStatus as e:
            status = e.response.status_code
            print(f"handshake refused: HTTP {status} {e.response.body[:200]!r}", file=sys.stderr)
            if status in FATAL_STATUS:
                return
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else 1006
            reason = e.rcvd.reason if e.rcvd is not None else ""
            print(f"closed {code} {reason}; resuming after {after}", file=sys.stderr)
            if code in FATAL_CLOSE:
                return
            if code in (1008, 4000):  # too slow / replay limit: come back at once
                continue
        except OSError as e:
            print(f"cannot connect: {e}", file=sys.stderr)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="ws://host:port/api/v1/.../socket")
    parser.add_argument("--key", required=True, help="API key (64 hex characters)")
    parser.add_argument("--after", help="replay events inserted after this ISO 8601 time")
    parser.add_argument("--preload", help="e.g. device,device.fields or packet.interface")
    args = parser.parse_args()
    try:
        asyncio.run(follow(args.url, args.key, args.after, args.preload))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
