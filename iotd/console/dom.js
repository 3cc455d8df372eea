// Building the page: elements from data (text only, never HTML), the aria-live announcer, formats.

const SVG = "http://www.w3.org/2000/svg";

function build(el, props, children) {
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") el.textContent = String(value);
    else if (name === "class") el.setAttribute("class", value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "value" && "value" in el) el.value = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function h(tag, props, ...children) {
  return build(document.createElement(tag), props, children);
}

export function s(tag, props, ...children) {
  return build(document.createElementNS(SVG, tag), props, children);
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// Status changes are announced in the page's aria-live region (and shown there).
export function announce(message) {
  const region = document.getElementById("announcer");
  if (region) region.textContent = message;
}

// A view's alert line: the API's error, or nothing.
export function alertLine() {
  const el = h("p", { class: "error", role: "alert" });
  return {
    el,
    show(error) {
      el.textContent = error ? (error.text || String(error.message || error)) : "";
    },
  };
}

const pad = (n) => String(n).padStart(2, "0");

// "2026-12-03 06:07:35" in local time, from ISO text or milliseconds; "" when absent or bad.
export function fmtTime(value) {
  if (value === null || value === undefined || value === "") return "";
  const date = new Date(typeof value === "string" && /^\d+$/.test(value) ? Number(value) : value);
  if (Number.isNaN(date.getTime())) return "";
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
         `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

export function fmtBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function fmtSeconds(sec) {
  if (!Number.isFinite(sec) || sec < 0) return "";
  if (sec < 120) return `${Math.round(sec)} s`;
  if (sec < 7200) return `${Math.round(sec / 60)} min`;
  return `${Math.round(sec / 3600)} h`;
}

// Compact JSON for a table cell, cut at `max` characters.
export function short(value, max = 200) {
  let text;
  if (typeof value === "string") text = value;
  else {
    try {
      text = JSON.stringify(value);
    } catch {
      text = String(value);
    }
  }
  if (text === undefined) text = "";
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}

// A table with a header row; returns {table, body}.
export function table(caption, headings) {
  const body = h("tbody");
  const tableEl = h("table", {},
    caption ? h("caption", { text: caption }) : null,
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col", text: t })))),
    body);
  return { table: h("div", { class: "scroll" }, tableEl), body };
}

// An online dot with its word (the word is what screen readers and tests read).
export function stateCell(online) {
  const word = h("span", { class: "state", text: online ? "online" : "offline" });
  const dot = h("span", { class: online ? "dot on" : "dot", "aria-hidden": "true" });
  return {
    el: h("span", { class: "online" }, dot, word),
    set(on) {
      word.textContent = on ? "online" : "offline";
      dot.setAttribute("class", on ? "dot on" : "dot");
    },
  };
}

// "Live updates: on" / "connecting…" / "off (reconnecting)" for a view.
export function liveLine() {
  const el = h("p", { class: "live", "data-live": "off", text: "Live updates: connecting…" });
  return {
    el,
    set(state) {
      el.dataset.live = state;
      el.textContent = state === "on" ? "Live updates: on"
        : state === "down" ? "Live updates: off (reconnecting)" : "Live updates: connecting…";
    },
  };
}
