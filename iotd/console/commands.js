// A device's commands (status, attempts, response) and the form that queues one; the result
// appears when the device answers (deviceActionReport on the subscription socket).

import { api, enc, query } from "./api.js";
import { alertLine, announce, fmtTime, h, short, table } from "./dom.js";

const SHOWN = 20;
const FINISHED = new Set(["done", "failed", "cancelled", "expired"]);

// A command only moves forward (queued, sent, finished): an older read never undoes a newer one.
const rank = (cmd) => (FINISHED.has(cmd.status) ? 2 : cmd.status === "sent" ? 1 : 0);

function outcome(cmd) {
  if (cmd.response !== undefined && cmd.response !== null) return short(cmd.response, 300);
  if (cmd.error) return "error: " + short(cmd.error, 300);
  if (cmd.responseRaw !== undefined && cmd.responseRaw !== null) return short(cmd.responseRaw, 300);
  return "";
}

// Parses the Body field: empty = no body; else JSON (an object, array or string).
export function parseBody(text) {
  const trimmed = text.trim();
  if (!trimmed) return { ok: true, value: undefined };
  try {
    return { ok: true, value: JSON.parse(trimmed) };
  } catch (e) {
    return { ok: false, message: `Body is not JSON: ${e.message}` };
  }
}

export function commandsPanel(identifier, ctx) {
  const base = `/api/v1/devices/${enc(identifier)}/commands`;
  const alert = alertLine();
  const { table: tableEl, body } = table("Latest commands, newest first", ["ID", "Status", "Verb", "Endpoint", "Attempts", "Created",
                                                      "Finished", "Response"]);
  const el = h("section", { class: "panel", "aria-labelledby": "commands-h" },
    h("h3", { id: "commands-h", text: "Commands" }), alert.el, tableEl);
  const commands = new Map(); // id -> command
  let gone = false;

  function merge(cmd) {
    const before = commands.get(cmd.id);
    if (before && rank(before) > rank(cmd)) return false;
    commands.set(cmd.id, cmd);
    return true;
  }

  function render() {
    const newest = [...commands.values()].sort((a, b) => b.id - a.id).slice(0, SHOWN);
    body.replaceChildren(...newest.map((cmd) => h("tr", { "data-command": cmd.id, "data-status": cmd.status },
      h("td", { class: "num", text: cmd.id }),
      h("td", {}, h("span", { class: `status ${cmd.status}`, text: cmd.status })),
      h("td", { text: cmd.verb || "" }),
      h("td", { text: cmd.endpoint || "" }),
      h("td", { class: "num", text: cmd.attempts }),
      h("td", { text: fmtTime(cmd.createdAt) }),
      h("td", { text: fmtTime(cmd.finishedAt) }),
      h("td", { class: "response" }, outcome(cmd),
        cmd.status === "queued" && ctx.may("commands", "delete")
          ? h("button", { type: "button", class: "small", text: "Cancel", "aria-label": `Cancel command ${cmd.id}`,
                          onclick: () => cancel(cmd.id) })
          : null))));
    if (!commands.size) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted", text: "No commands yet." })));
  }

  function put(cmd) {
    if (!cmd || typeof cmd.id !== "number") return;
    const before = commands.get(cmd.id);
    if (!merge(cmd)) return;
    render();
    if (FINISHED.has(cmd.status) && (!before || before.status !== cmd.status)) {
      announce(`Command ${cmd.id} ${cmd.status}${cmd.status === "done" ? ": " + outcome(cmd) : ""}`);
    }
  }

  async function load() {
    try {
      let after;
      for (let pages = 0; pages < 10; pages++) { // oldest first: the newest are on the last page
        const { body: page } = await api("GET", base + query({ limit: 1000, after }));
        for (const cmd of page.items || []) merge(cmd);
        if (!page.next) break;
        after = page.next;
      }
      if (!gone) render();
    } catch (e) {
      if (!gone) alert.show(e);
    }
  }

  async function refresh(id) {
    try {
      const { body: cmd } = await api("GET", `/api/v1/commands/${enc(id)}`);
      if (!gone) put(cmd);
    } catch {
      /* gone (the device was deleted): the list shows what it last knew */
    }
  }

  async function cancel(id) {
    try {
      await api("DELETE", `/api/v1/commands/${enc(id)}`);
      refresh(id);
    } catch (e) {
      alert.show(e);
    }
  }

  if (ctx.may("commands", "create")) el.append(form(base, alert, put));
  render();
  return {
    el,
    load,
    onAction(ev) {
      const id = Number(ev.msgToken);
      if (Number.isInteger(id) && id > 0) refresh(id);
    },
    close() {
      gone = true;
    },
  };
}

function form(base, alert, put) {
  const verb = h("select", { id: "cmd-verb", name: "verb" }, h("option", { text: "POST" }), h("option", { text: "GET" }));
  const endpoint = h("input", { id: "cmd-endpoint", name: "endpoint", required: true, autocomplete: "off",
                                placeholder: "load_objects" });
  const bodyField = h("textarea", { id: "cmd-body", name: "body", rows: 3, spellcheck: "false",
                                    placeholder: '{"object": "users"}' });
  const wait = h("input", { id: "cmd-wait", name: "wait", type: "number", min: 0, max: 60, step: 1, value: "0" });
  const submit = h("button", { type: "submit", text: "Queue command" });
  const el = h("form", { class: "command-form", "aria-label": "Queue a command" },
    h("div", { class: "field" }, h("label", { for: "cmd-verb", text: "Verb" }), verb),
    h("div", { class: "field grow" }, h("label", { for: "cmd-endpoint", text: "Endpoint" }), endpoint),
    h("div", { class: "field wide" }, h("label", { for: "cmd-body", text: "Body" }), bodyField),
    h("div", { class: "field" }, h("label", { for: "cmd-wait", text: "Wait (s)" }), wait),
    submit);
  el.addEventListener("submit", async (e) => {
    e.preventDefault();
    alert.show(null);
    const parsed = parseBody(bodyField.value);
    if (!parsed.ok) {
      alert.show(parsed.message);
      return;
    }
    const command = { verb: verb.value, endpoint: endpoint.value.trim() };
    if (parsed.value !== undefined) command.body = parsed.value;
    const seconds = Number(wait.value || 0);
    submit.disabled = true;
    try {
      const { body: cmd } = await api("POST", base + query({ wait: seconds > 0 ? seconds : undefined }), command);
      put(cmd);
      if (cmd && !FINISHED.has(cmd.status)) announce(`Command ${cmd.id} ${cmd.status}`);
    } catch (err) {
      alert.show(err);
    } finally {
      submit.disabled = false;
    }
  });
  return el;
}
