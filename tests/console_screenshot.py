"""Make the README's screenshot of the console's device view: ``python tests/console_screenshot.py
docs/console-device.png`` (a fresh ``twistd iotd`` in a temporary directory, a device with a
quarter hour of readings, a command answered by a push device, an open link)."""

from __future__ import annotations

import math
import sys
import tempfile
import time

from playwright.sync_api import expect, sync_playwright

from console_helpers import TIMEOUT_MS, PushDevice, launch
from daemon_process import DaemonProcess


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000000Z"


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, DaemonProcess(tmp) as d:
        key = d.admin_key
        d.request("PUT", "/api/v1/devices/GATE-01", {
            "name": "Main gate", "pushId": 478435, "host": "192.0.2.10", "ports": {"default": 502},
            "tags": ["building-a"], "projectID": "p1", "fields": {"serial": "X1"}}, key=key)
        now = time.time()
        readings = [{"data": {"temperature": round(21 + 1.5 * math.sin(i / 5), 2),
                              "humidity": round(44 + 6 * math.cos(i / 7), 1)},
                     "measured_at": iso(now - 870 + i * 30)} for i in range(30)]
        d.request("POST", "/api/v1/devices/GATE-01/readings", readings, key=key)
        d.request("POST", "/api/v1/devices/GATE-01/packets", [{"payload": {"door": "closed", "n": n}} for n in range(3)],
                  key=key)
        device = PushDevice(d.url, 478435)
        device.poll()
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(d.url + "/")
            page.get_by_label("API key").fill(key)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("link", name="GATE-01", exact=True).click()
            expect(page.get_by_text("Live updates: on")).to_be_visible()
            page.get_by_label("Endpoint").fill("load_objects")
            page.get_by_label("Body").fill('{"object": "users"}')
            page.get_by_role("button", name="Queue command").click()
            expect(page.locator("tr[data-command]")).to_have_count(1)
            device.poll()
            device.answer("load_objects", {"users": [{"id": 1, "name": "Walter White"}]})
            expect(page.locator("tr[data-command] .status")).to_have_text("done")
            page.get_by_role("button", name="Open link").click()
            expect(page.locator("ul.links li[data-token]")).to_have_count(1)
            d.request("POST", "/api/v1/devices/GATE-01/readings",
                      {"data": {"temperature": 21.4, "humidity": 47.0}}, key=key)
            expect(page.locator("tr[data-reading]").first).to_contain_text("21.4")
            page.screenshot(path=out, full_page=True)
            browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/console-device.png")
