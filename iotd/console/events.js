// A live tail of the tenant's packets and readings (the tenant-wide event sockets), with pause.

import { enc } from "./api.js";
import { fmtTime, h, liveLine, short, table } from "./dom.js";
import { follow } from "./live.js";

const KEEP = 200;
const HELD = 1000;

export function eventsView(root, ctx) {
  root.append(h("h2", { text: "Events" }));
  if (ctx.me.role === "group") {
    root.append(h("p", { class: "error", role: "alert",
                         text: "The tenant's event tail needs an admin or read_only key; a group key sees its devices' events on each device's page." }));
    return () => {};
  }
  const live = liveLine();
  const pause = h("button", { type: "button", "aria-pressed": "false", text: "Pause" });
  const { table: tableEl, body } = table("Latest events", ["Time", "Kind", "Device", "Content"]);
  root.append(h("div", { class: "toolbar" }, pause), live.el, tableEl);
  let paused = false;
  let held = [];
  const up = { packets: false, readings: false };

  const row = (kind, e) => h("tr", { "data-kind": kind },
    h("td", { text: fmtTime(e.inserted_at) }),
    h("td", { text: kind }),
    h("td", {}, h("a", { href: "#/devices/" + enc(e.device_id), text: e.device_id })),
    h("td", { class: "data", text: short(kind === "reading" ? e.data : e.payload, 300) }));

  const show = (items) => {
    body.prepend(...items.reverse().map(([kind, e]) => row(kind, e)));
    while (body.children.length > KEEP) body.lastElementChild.remove();
  };

  const sockets = ["packets", "readings"].map((name) => follow(`/api/v1/${name}/socket`, {
    onEvents: (events) => {
      const items = events.map((e) => [name === "packets" ? "packet" : "reading", e.body]);
      if (paused) {
        held.push(...items);
        if (held.length > HELD) held = held.slice(-HELD);
        pause.textContent = `Resume (${held.length} new)`;
      } else show(items);
    },
    onState: (state) => {
      up[name] = state === "on";
      live.set(up.packets && up.readings ? "on" : state === "down" ? "down" : "connecting");
    },
  }));

  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume (0 new)" : "Pause";
    if (!paused) {
      show(held);
      held = [];
    }
  });

  return () => {
    for (const sock of sockets) sock.close();
  };
}
