// A device's links: "Open link" (protocol, port) shows host:port and the token, "Close link" ends it.

import { api, enc } from "./api.js";
import { alertLine, announce, h } from "./dom.js";

export function linkAddress(link) {
  return `${link.host || location.hostname}:${link.port}`;
}

export function linkPanel(device, ctx) {
  const alert = alertLine();
  const list = h("ul", { class: "links" });
  const el = h("section", { class: "panel", "aria-labelledby": "link-h" },
    h("h3", { id: "link-h", text: "Link" }), alert.el, list);
  const links = new Map(); // token -> link
  let gone = false;

  function render() {
    list.replaceChildren(...[...links.values()].map((link) => h("li", { "data-token": link.token },
      h("span", { class: "address", text: linkAddress(link) }), " ",
      h("span", { class: "muted", text: `${link.protocol || "tcp"} to port ${link.devicePort ?? ""}` }), " ",
      h("span", {}, "token ", h("code", { class: "token", text: link.token })), " ",
      ctx.may("deviceLink", "delete")
        ? h("button", { type: "button", text: "Close link", onclick: () => close(link.token) }) : null)));
    if (!links.size) list.append(h("li", { class: "muted", text: "No open link." }));
  }

  async function load() {
    try {
      const { body } = await api("GET", "/api/v1/devicelink");
      if (gone) return;
      links.clear();
      for (const link of body.items || []) {
        if (String(link.device).toLowerCase() === device.identifier.toLowerCase()) links.set(link.token, link);
      }
      render();
    } catch (e) {
      if (!gone) alert.show(e);
    }
  }

  async function close(token) {
    alert.show(null);
    try {
      await api("DELETE", `/api/v1/devicelink/${enc(token)}`);
      const link = links.get(token);
      links.delete(token);
      render();
      announce(`Link ${link ? linkAddress(link) : ""} closed`);
    } catch (e) {
      alert.show(e);
    }
  }

  if (ctx.may("deviceLink", "create")) {
    const protocol = h("select", { id: "link-protocol", name: "protocol" },
      h("option", { text: "tcp" }), h("option", { text: "udp" }));
    const port = h("input", { id: "link-port", name: "port", type: "number", min: 1, max: 65535,
                              placeholder: String((device.ports || {}).default ?? "") });
    const submit = h("button", { type: "submit", text: "Open link" });
    const form = h("form", { class: "link-form", "aria-label": "Open a link" },
      h("div", { class: "field" }, h("label", { for: "link-protocol", text: "Protocol" }), protocol),
      h("div", { class: "field" }, h("label", { for: "link-port", text: "Device port" }), port),
      submit);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      alert.show(null);
      const request = { protocol: protocol.value };
      if (port.value) request.devicePort = Number(port.value);
      submit.disabled = true;
      try {
        const { body: link } = await api("POST", `/api/v1/devicelink/${enc(device.identifier)}`, request);
        links.set(link.token, link);
        render();
        announce(`Link open at ${linkAddress(link)}`);
      } catch (err) {
        alert.show(err);
      } finally {
        submit.disabled = false;
      }
    });
    el.append(form);
  }
  render();
  const timer = setInterval(load, 5000);
  return {
    el,
    load,
    close() {
      gone = true;
      clearInterval(timer);
    },
  };
}
