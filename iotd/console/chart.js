// A small live chart (plain SVG) of each numeric field of a device's readings, last 15 minutes.

import { fmtTime, h, s } from "./dom.js";

export const WINDOW_MS = 15 * 60 * 1000;
const W = 320;
const H = 90;
const PAD = 4;

export function readingTime(reading) {
  const t = Date.parse(reading.measured_at || reading.inserted_at);
  return Number.isNaN(t) ? null : t;
}

// {field: [[time, value], ...]} of the readings inside the window, oldest first.
export function series(readings, now) {
  const out = {};
  for (const r of readings) {
    const t = readingTime(r);
    if (t === null || t < now - WINDOW_MS || !r.data || typeof r.data !== "object") continue;
    for (const [field, value] of Object.entries(r.data)) {
      if (typeof value !== "number" || !Number.isFinite(value)) continue;
      (out[field] ||= []).push([t, value]);
    }
  }
  for (const points of Object.values(out)) points.sort((a, b) => a[0] - b[0]);
  return out;
}

function chart(field, points, now) {
  const values = points.map((p) => p[1]);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const x = (t) => PAD + ((t - (now - WINDOW_MS)) / WINDOW_MS) * (W - 2 * PAD);
  const y = (v) => H - PAD - ((v - lo) / (hi - lo)) * (H - 2 * PAD);
  const coords = points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const [lastT, lastV] = points[points.length - 1];
  const label = `${field}: ${points.length} reading${points.length === 1 ? "" : "s"} in the last 15 minutes, ` +
                `latest ${lastV} at ${fmtTime(lastT)}`;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart" },
    s("title", { text: label }),
    s("line", { x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD, class: "axis" }),
    s("polyline", { points: coords, class: "series" }),
    s("circle", { cx: x(lastT).toFixed(1), cy: y(lastV).toFixed(1), r: 3, class: "last" }),
    s("text", { x: PAD, y: 12, class: "tick", text: String(hi) }),
    s("text", { x: PAD, y: H - PAD - 2, class: "tick", text: String(lo) }));
  return h("figure", { class: "chart", "data-field": field },
    svg, h("figcaption", {}, h("strong", { text: field }), ` ${lastV}`,
                         h("span", { class: "muted", text: ` (min ${Math.min(...values)}, max ${Math.max(...values)})` })));
}

// Replaces the container's charts with one per numeric field.
export function renderCharts(container, readings, now = Date.now()) {
  const fields = series(readings, now);
  const names = Object.keys(fields).sort();
  if (!names.length) {
    container.replaceChildren(h("p", { class: "muted", text: "No numeric readings in the last 15 minutes." }));
    return;
  }
  container.replaceChildren(...names.map((name) => chart(name, fields[name], now)));
}
