"""For the console's browser tests: Debian's Chromium through Playwright, a page that records every
JavaScript error, and a push device that polls and answers by hand (synchronous HTTP)."""

from __future__ import annotations

import json
import os
import re
import urllib.request
import uuid
from typing import Any

CHROMIUM = "/usr/bin/chromium"  # Debian's; `playwright install` cannot download browsers here
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000  # generous: a loaded 2-core machine


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)


class Errors:
    """Every uncaught exception and console error of a page (``allowed`` patterns excepted)."""

    def __init__(self, page: Any):
        self.seen: list[str] = []
        self.allowed: list[re.Pattern] = []
        page.on("pageerror", lambda e: self.seen.append(f"pageerror: {e}"))
        page.on("console", lambda m: self.seen.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.seen if not any(p.search(e) for p in self.allowed)]


class PushDevice:
    """A Control iD-like device: ``poll()`` once; ``answer(response)`` posts the result as the
    firmware does (``response`` as a JSON-encoded string)."""

    def __init__(self, base: str, device_id: int):
        self.base = base
        self.device_id = device_id
        self.uuid = str(uuid.uuid4())

    def poll(self) -> Any:
        url = f"{self.base}/push?deviceId={self.device_id}&uuid={self.uuid}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def answer(self, endpoint: str, response: Any) -> None:
        url = f"{self.base}/result?deviceId={self.device_id}&uuid={self.uuid}&endpoint={endpoint}"
        data = json.dumps({"response": json.dumps(response)}).encode()
        req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


def shot(page: Any, tmp_path: Any, name: str) -> str:
    """Save a screenshot of the flow under the test's tmp dir (the tests never compare pixels)."""
    path = os.path.join(str(tmp_path), f"{name}.png")
    page.screenshot(path=path, full_page=True)
    assert os.path.getsize(path) > 0
    return path
