// The device table: identifier, name, tags, online dot, last seen, unfinished commands;
// filtered by tag (REST) and text (this page), paged through the REST list, dots live.

import { api, enc, limiter, query } from "./api.js";
import { alertLine, announce, fmtTime, h, liveLine, stateCell, table } from "./dom.js";

const PAGE = 50;
const UNFINISHED = ["queued", "sent"];

export function devicesView(root, ctx) {
  const alert = alertLine();
  const live = liveLine();
  const tag = h("input", { id: "tag-filter", name: "tag", autocomplete: "off" });
  const text = h("input", { id: "text-filter", name: "text", type: "search", autocomplete: "off" });
  const { table: tableEl, body } = table("Devices", ["Identifier", "Name", "Tags", "Online", "Last seen",
                                                     "Unfinished commands"]);
  const prev = h("button", { type: "button", text: "Previous page", disabled: true });
  const next = h("button", { type: "button", text: "Next page", disabled: true });
  const summary = h("p", { class: "summary" });
  const filters = h("form", { class: "filters", role: "search" },
    h("label", { for: "tag-filter", text: "Tag" }), tag,
    h("label", { for: "text-filter", text: "Filter" }), text,
    h("button", { type: "submit", text: "Apply" }),
    h("button", { type: "button", text: "Refresh", onclick: () => load(cursor) }));
  root.append(h("h2", { text: "Devices" }), filters, live.el, alert.el, summary, tableEl,
              h("div", { class: "pager" }, prev, next));

  const counts = limiter(4);
  let rows = new Map(); // identifier -> {tr, state, seen, unfinished}
  let unwatch = [];
  let cursors = []; // the `after` of each earlier page
  let cursor = null;
  let gone = false;
  let generation = 0;

  async function load(after) {
    const mine = ++generation;
    alert.show(null);
    try {
      const { body: page } = await api("GET", "/api/v1/devices" + query({ limit: PAGE, tag: tag.value.trim(), after }));
      if (gone || mine !== generation) return;
      cursor = after;
      render(page.items || []);
      next.disabled = !page.next;
      next.dataset.after = page.next || "";
      prev.disabled = !cursors.length;
    } catch (e) {
      if (!gone && mine === generation) alert.show(e);
    }
  }

  function render(items) {
    for (const off of unwatch) off();
    unwatch = [];
    rows = new Map();
    body.replaceChildren();
    for (const device of items) {
      const state = stateCell(device.online);
      const seen = h("td", { text: fmtTime(device.lastSeen) });
      const unfinished = h("td", { class: "num", text: "…" });
      const tr = h("tr", { "data-device": device.identifier },
        h("th", { scope: "row" }, h("a", { href: "#/devices/" + enc(device.identifier), text: device.identifier })),
        h("td", { text: device.name || "" }),
        h("td", { text: (device.tags || []).join(", ") }),
        h("td", {}, state.el), seen, unfinished);
      const row = { device, tr, state, seen, unfinished, version: 0 };
      rows.set(device.identifier, row);
      body.append(tr);
      unwatch.push(ctx.subs.watch("deviceConn", device, (ev) => connChanged(row, ev)));
      unwatch.push(ctx.subs.watch("deviceActionReport", device, () => countUnfinished(row)));
      countUnfinished(row);
    }
    filter();
  }

  function connChanged(row, ev) {
    row.version++;
    const online = ev.status === 1;
    row.state.set(online);
    if (online) row.seen.textContent = fmtTime(ev.timestamp);
    announce(`${row.device.identifier} is ${online ? "online" : "offline"}`);
  }

  async function countUnfinished(row) {
    let total = 0;
    let more = false;
    try {
      for (const status of UNFINISHED) {
        const path = `/api/v1/devices/${enc(row.device.identifier)}/commands` + query({ status, limit: 1000 });
        const current = () => !gone && rows.get(row.device.identifier) === row; // not left or re-rendered
        const { body: page } = await counts(() => (current() ? api("GET", path) : Promise.reject(new Error("gone"))));
        total += (page.items || []).length;
        more = more || Boolean(page.next);
      }
    } catch {
      if (!gone) row.unfinished.textContent = "?";
      return;
    }
    if (!gone) row.unfinished.textContent = more ? `${total}+` : String(total);
  }

  // After the socket (re)subscribed: read the page again, so no change between the list and
  // the subscription is missed.
  async function reconcile() {
    const before = new Map([...rows].map(([id, row]) => [id, row.version]));
    try {
      const { body: page } = await api("GET", "/api/v1/devices" + query({ limit: PAGE, tag: tag.value.trim(), after: cursor }));
      for (const device of page.items || []) {
        const row = rows.get(device.identifier);
        if (!row || row.version !== before.get(device.identifier)) continue; // a live event is newer
        row.state.set(device.online);
        row.seen.textContent = fmtTime(device.lastSeen);
      }
    } catch {
      /* the next reconnect tries again */
    }
  }

  function filter() {
    const needle = text.value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows.values()) {
      const hay = `${row.device.identifier} ${row.device.name || ""} ${(row.device.tags || []).join(" ")}`.toLowerCase();
      const show = !needle || hay.includes(needle);
      row.tr.hidden = !show;
      if (show) shown++;
    }
    summary.textContent = rows.size ? `${shown} of ${rows.size} devices on this page` : "No devices";
  }

  filters.addEventListener("submit", (e) => {
    e.preventDefault();
    cursors = [];
    load(null);
  });
  text.addEventListener("input", filter);
  next.addEventListener("click", () => {
    cursors.push(cursor);
    load(next.dataset.after || null);
  });
  prev.addEventListener("click", () => load(cursors.pop() ?? null));
  const offState = ctx.subs.onState((state) => {
    live.set(state);
    if (state === "on" && rows.size) reconcile();
  });
  load(null);

  return () => {
    gone = true;
    offState();
    for (const off of unwatch) off();
  };
}
