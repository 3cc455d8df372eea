// One device: its fields, latest packets and readings (REST history, then live), a chart of
// each numeric reading field, its commands with the form, and its links.

import { api, enc, query } from "./api.js";
import { renderCharts } from "./chart.js";
import { commandsPanel } from "./commands.js";
import { alertLine, announce, fmtTime, h, liveLine, short, stateCell, table } from "./dom.js";
import { linkPanel } from "./linkpanel.js";
import { follow } from "./live.js";

const ROWS = 10;
const KEEP = 2000; // readings kept for the chart and the table

const FIELDS = [["name", "Name"], ["tags", "Tags"], ["host", "Host"], ["ports", "Ports"], ["pushId", "Push id"],
  ["productID", "Product"], ["deviceName", "Device name"], ["projectID", "Project"], ["areaID", "Area"],
  ["fields", "Fields"], ["interfaces", "Interfaces"], ["transport", "Commands via"], ["lastSeen", "Last seen"],
  ["lastAddress", "Last address"]];

function fieldText(name, value) {
  if (name === "transport") return value === "mqtt" ? "MQTT" : "push (polls)";
  if (value === null || value === undefined) return "—";
  if (name === "lastSeen") return fmtTime(value);
  if (name === "tags") return value.join(", ") || "—";
  return typeof value === "object" ? short(value, 400) : String(value);
}

// Events by id, newest first on the page; {add(items) -> changed, newest(n), all()}.
function eventList() {
  const byId = new Map();
  return {
    add(items) {
      let changed = false;
      for (const item of items) {
        if (!item || typeof item.id !== "number" || byId.has(item.id)) continue;
        byId.set(item.id, item);
        changed = true;
      }
      if (byId.size > KEEP) {
        const ids = [...byId.keys()].sort((a, b) => a - b);
        for (const id of ids.slice(0, byId.size - KEEP)) byId.delete(id);
      }
      return changed;
    },
    newest(n) {
      return [...byId.values()].sort((a, b) => b.id - a.id).slice(0, n);
    },
    all: () => [...byId.values()],
  };
}

export function deviceView(root, ctx, identifier) {
  const alert = alertLine();
  root.append(h("p", {}, h("a", { href: "#/devices", text: "All devices" })), alert.el);
  const cleanups = [];
  let gone = false;

  api("GET", `/api/v1/devices/${enc(identifier)}`).then(({ body: device }) => {
    if (!gone) show(device);
  }, (e) => {
    if (!gone) {
      root.append(h("h2", { text: identifier }));
      alert.show(e);
    }
  });

  function show(device) {
    const id = device.identifier;
    const live = liveLine();
    const state = stateCell(device.online);
    const fields = h("dl", { class: "fields" }, FIELDS.map(([name, label]) => [
      h("dt", { text: label }), h("dd", { "data-field": name, text: fieldText(name, device[name]) })]));
    const charts = h("div", { class: "charts", "aria-label": "Reading charts" });
    const readingsT = table("Latest readings", ["ID", "Measured", "Data"]);
    const packetsT = table("Latest packets", ["ID", "Received", "Interface", "Type", "Payload"]);
    const commands = commandsPanel(id, ctx);
    const links = linkPanel(device, ctx);
    root.append(h("h2", {}, id, " ", state.el), live.el,
      h("div", { class: "columns" },
        h("section", { class: "panel", "aria-labelledby": "fields-h" }, h("h3", { id: "fields-h", text: "Device" }), fields),
        links.el),
      h("section", { class: "panel", "aria-labelledby": "readings-h" },
        h("h3", { id: "readings-h", text: "Readings" }), charts, readingsT.table),
      commands.el,
      h("section", { class: "panel", "aria-labelledby": "packets-h" },
        h("h3", { id: "packets-h", text: "Packets" }), packetsT.table));

    const readings = eventList();
    const packets = eventList();
    const drawReadings = () => {
      renderCharts(charts, readings.all());
      readingsT.body.replaceChildren(...readings.newest(ROWS).map((r) => h("tr", { "data-reading": r.id },
        h("td", { class: "num", text: r.id }), h("td", { text: fmtTime(r.measured_at || r.inserted_at) }),
        h("td", { class: "data", text: short(r.data, 300) }))));
    };
    const drawPackets = () => {
      packetsT.body.replaceChildren(...packets.newest(ROWS).map((p) => h("tr", { "data-packet": p.id },
        h("td", { class: "num", text: p.id }), h("td", { text: fmtTime(p.inserted_at) }),
        h("td", { text: p.interface_id || "" }), h("td", { text: p.packet_type || "" }),
        h("td", { class: "data", text: short(p.payload, 300) }))));
    };
    drawReadings();
    drawPackets();

    // Live: each socket first, then its REST history (merged by id), so nothing falls in between.
    const socketsUp = { readings: false, packets: false };
    let subsState = ctx.subs.state;
    const showLive = () => live.set(subsState === "on" && socketsUp.readings && socketsUp.packets ? "on"
      : subsState === "down" ? "down" : "connecting");
    const history = async (kind, list, draw) => {
      try {
        const { body } = await api("GET", `/api/v1/devices/${enc(id)}/${kind}` + query({ limit: kind === "readings" ? 500 : ROWS }));
        if (!gone && list.add(body.items || [])) draw();
      } catch (e) {
        if (!gone) alert.show(e);
      }
    };
    for (const [kind, list, draw] of [["readings", readings, drawReadings], ["packets", packets, drawPackets]]) {
      const sock = follow(`/api/v1/devices/${enc(id)}/${kind}/socket`, {
        onEvents: (events) => {
          if (list.add(events.map((e) => e.body))) draw();
          if (kind === "readings") announce(`New reading from ${id}`);
        },
        onState: (up) => {
          socketsUp[kind] = up === "on";
          showLive();
          if (up === "on") history(kind, list, draw); // (again after a reconnect: merged by id)
        },
      });
      cleanups.push(() => sock.close());
    }
    const slide = setInterval(drawReadings, 30000); // the chart's window moves on
    cleanups.push(() => clearInterval(slide));

    let connEvents = 0;
    const reconcile = async () => { // after (re)subscribing: the state a missed event may have changed
      const seen = connEvents;
      try {
        const { body: fresh } = await api("GET", `/api/v1/devices/${enc(id)}`);
        if (!gone && seen === connEvents) state.set(fresh.online);
      } catch {
        /* the next reconnect tries again */
      }
    };
    cleanups.push(ctx.subs.watch("deviceConn", device, (ev) => {
      connEvents++;
      state.set(ev.status === 1);
      if (ev.status === 1) fields.querySelector('[data-field="lastSeen"]').textContent = fmtTime(ev.timestamp);
      announce(`${id} is ${ev.status === 1 ? "online" : "offline"}`);
    }));
    cleanups.push(ctx.subs.watch("deviceActionReport", device, (ev) => commands.onAction(ev)));
    cleanups.push(ctx.subs.onState((st) => {
      subsState = st;
      showLive();
      if (st === "on") { // (re)subscribed: read what happened meanwhile
        commands.load();
        reconcile();
      }
    }));
    commands.load();
    cleanups.push(() => commands.close(), () => links.close());
    links.load();
  }

  return () => {
    gone = true;
    for (const fn of cleanups) fn();
  };
}
