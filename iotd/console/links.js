// Every open link: protocol, device, client, bytes each way, idle time; refreshed every 2 s.

import { api, enc } from "./api.js";
import { alertLine, announce, fmtBytes, fmtSeconds, h, table } from "./dom.js";
import { linkAddress } from "./linkpanel.js";

const EVERY = 2000;

function client(link) {
  return link.source ? `${link.source.host}:${link.source.port}` : "any (first to connect)";
}

export function linksView(root, ctx) {
  const alert = alertLine();
  const summary = h("p", { class: "summary" });
  const { table: tableEl, body } = table("Open links", ["Address", "Protocol", "Device", "Client", "Bytes up",
                                                        "Bytes down", "Idle", ""]);
  root.append(h("h2", { text: "Links" }), alert.el, summary, tableEl);
  let gone = false;
  let busy = false;

  async function load() {
    if (busy) return;
    busy = true;
    try {
      const { body: list } = await api("GET", "/api/v1/devicelink");
      if (gone) return;
      alert.show(null);
      const items = list.items || [];
      const now = Date.now();
      body.replaceChildren(...items.map((link) => h("tr", { "data-token": link.token },
        h("td", { text: linkAddress(link) }),
        h("td", { text: link.protocol || "" }),
        h("td", {}, h("a", { href: "#/devices/" + enc(link.device), text: link.device })),
        h("td", { text: client(link) }),
        h("td", { class: "num bytes-up", text: fmtBytes(link.bytesUp) }),
        h("td", { class: "num bytes-down", text: fmtBytes(link.bytesDown) }),
        h("td", { class: "idle", text: fmtSeconds((now - Date.parse(link.lastActivity || link.createdAt)) / 1000) }),
        h("td", {}, ctx.may("deviceLink", "delete")
          ? h("button", { type: "button", text: "Close link", onclick: () => close(link) }) : null))));
      summary.textContent = `${items.length} open link${items.length === 1 ? "" : "s"}`;
    } catch (e) {
      if (!gone) alert.show(e);
    } finally {
      busy = false;
    }
  }

  async function close(link) {
    try {
      await api("DELETE", `/api/v1/devicelink/${enc(link.token)}`);
      announce(`Link ${linkAddress(link)} closed`);
      load();
    } catch (e) {
      alert.show(e);
    }
  }

  load();
  const timer = setInterval(load, EVERY);
  return () => {
    gone = true;
    clearInterval(timer);
  };
}
