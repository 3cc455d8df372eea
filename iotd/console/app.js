// The console: sign-in (the key lives in sessionStorage only), the router, the live socket.

import { api, forgetKey, getKey, keyProblem, setKey } from "./api.js";
import { deviceView } from "./device.js";
import { devicesView } from "./devices.js";
import { alertLine, announce, clear, h } from "./dom.js";
import { eventsView } from "./events.js";
import { linksView } from "./links.js";
import { Subscriptions } from "./live.js";

const $ = (id) => document.getElementById(id);
let ctx = null; // {me, subs, may} while signed in
let unmount = () => {};

// What the key may do, as iotd decides it (iotd.apikeys.ApiKey.allows).
function mayFor(me) {
  const grants = new Set(me.permissions || []);
  return (resource, action) => me.role === "admin" || action === "read" || grants.has(`${resource}:${action}`);
}

function route() {
  if (!ctx) return;
  unmount();
  unmount = () => {};
  const view = clear($("view"));
  const hash = location.hash || "#/devices";
  const parts = hash.slice(2).split("/");
  for (const a of document.querySelectorAll("#nav a")) {
    a.toggleAttribute("aria-current", a.getAttribute("href") === `#/${parts[0]}`);
    if (a.hasAttribute("aria-current")) a.setAttribute("aria-current", "page");
  }
  try {
    if (parts[0] === "devices" && parts.length > 1 && parts[1]) {
      let identifier;
      try {
        identifier = decodeURIComponent(parts.slice(1).join("/"));
      } catch {
        identifier = parts.slice(1).join("/");
      }
      unmount = deviceView(view, ctx, identifier);
    } else if (parts[0] === "links") unmount = linksView(view, ctx);
    else if (parts[0] === "events") unmount = eventsView(view, ctx);
    else unmount = devicesView(view, ctx);
  } catch (e) {
    view.append(h("p", { class: "error", role: "alert", text: `This page failed: ${e.message}` }));
  }
}

function showSignedIn(me) {
  const subs = new Subscriptions();
  ctx = { me, subs, may: mayFor(me) };
  subs.connect();
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("whoami").textContent = `${me.name} (${me.role}${me.groups && me.groups.length ? ": " + me.groups.join(", ") : ""})`;
  route();
}

function showSignIn(error) {
  unmount();
  unmount = () => {};
  if (ctx) ctx.subs.close();
  ctx = null;
  clear($("view"));
  $("nav").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  signinAlert.show(error || null);
  $("apikey").focus();
}

const signinAlert = alertLine();

async function signIn(key) {
  const problem = keyProblem(key);
  if (problem) {
    signinAlert.show(problem);
    return;
  }
  const button = $("signin-button");
  button.disabled = true;
  try {
    const { body: me } = await api("GET", "/api/v1/api-keys/self", undefined, key);
    setKey(key);
    $("apikey").value = "";
    announce(`Signed in as ${me.name} (${me.role})`);
    showSignedIn(me);
  } catch (e) {
    signinAlert.show(e);
    announce(`Sign-in failed: ${e.text}`);
  } finally {
    button.disabled = false;
  }
}

function signOut(reason) {
  forgetKey();
  showSignIn(reason);
  announce(reason ? `Signed out: ${reason.text || reason}` : "Signed out");
}

function start() {
  $("signin").append(signinAlert.el);
  $("signin").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("apikey").value.trim());
  });
  $("signout").addEventListener("click", () => signOut(null));
  window.addEventListener("hashchange", route);
  window.addEventListener("iotd-unauthorized", (e) => {
    if (ctx) signOut(e.detail);
  });
  const key = getKey();
  if (!key) {
    showSignIn(null);
    return;
  }
  api("GET", "/api/v1/api-keys/self", undefined, key).then(({ body: me }) => showSignedIn(me), (e) => {
    if (e.status === 401) forgetKey();
    showSignIn(e);
  });
}

start();
