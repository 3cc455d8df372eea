// The live sockets: one subscription socket (iThings protocol) for the whole console, and the
// ELEMENT event sockets (packets, readings) a view follows.

import { checkKey, getKey, socketUrl } from "./api.js";

const CONNECT = "/api/v1/system/common/websocket/connect";

// Closes a socket without the browser's "closed before the connection is established" error.
function shut(ws) {
  ws.onmessage = ws.onclose = null;
  if (ws.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close(1000);
  else {
    ws.onopen = null;
    ws.close(1000);
  }
}

// Identity of a device in the subscription protocol (its identifier when unset).
export function identity(device) {
  return { productID: device.productID || device.identifier, deviceName: device.deviceName || device.identifier };
}

function idKey(productID, deviceName) {
  return `${productID}\u0000${deviceName}`;
}

// subs.watch(code, device, fn) -> unwatch; fn(body) for each down.pub of that code and device.
// subs.onState(fn) -> off; fn("on" | "connecting" | "down"): "on" once every watch is acknowledged.
export class Subscriptions {
  constructor() {
    this.watches = new Map(); // code + identity -> {code, params, fns}
    this.listeners = new Set();
    this.pending = []; // watches sent and not yet answered, in order
    this.ws = null;
    this.ready = false; // the connect reply came
    this.closed = false;
    this.delay = 1000;
    this.state = "connecting";
  }

  watch(code, device, fn) {
    const params = identity(device);
    const key = `${code}\u0000${idKey(params.productID, params.deviceName)}`;
    let entry = this.watches.get(key);
    if (!entry) {
      entry = { code, params, fns: new Set() };
      this.watches.set(key, entry);
      this.send("up.sub", entry);
    }
    entry.fns.add(fn);
    this.connect();
    return () => {
      entry.fns.delete(fn);
      if (!entry.fns.size && this.watches.get(key) === entry) {
        this.watches.delete(key);
        this.send("up.unSub", entry);
      }
    };
  }

  onState(fn) {
    this.listeners.add(fn);
    fn(this.state);
    return () => this.listeners.delete(fn);
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    for (const fn of [...this.listeners]) fn(state);
  }

  send(type, entry) {
    if (!this.ws || !this.ready || this.ws.readyState !== WebSocket.OPEN) return; // sent on (re)connect
    this.ws.send(JSON.stringify({ type, body: { code: entry.code, params: entry.params } }));
    if (type === "up.sub") {
      this.pending.push(entry);
      this.setState("connecting");
    }
  }

  connect() {
    if (this.ws || this.closed) return;
    const ws = new WebSocket(socketUrl(CONNECT, { token: getKey() }));
    this.ws = ws;
    this.ready = false;
    this.pending = [];
    ws.onmessage = (msg) => this.received(msg.data);
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ready = false;
      if (this.closed) return;
      this.setState("down");
      if (e.code === 4401) {
        checkKey(); // revoked or expired: the 401 signs out
        return;
      }
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 15000);
    };
  }

  received(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (!this.ready) {
      if (msg.code !== 200) return;
      this.ready = true;
      this.delay = 1000;
      for (const entry of this.watches.values()) this.send("up.sub", entry);
      if (!this.pending.length) this.setState("on");
      return;
    }
    if (msg.type === "down.subRet" || msg.type === "up.sub") {
      this.pending.shift();
      if (!this.pending.length) this.setState("on");
    } else if (msg.type === "down.pub" && msg.body && typeof msg.body === "object") {
      const who = msg.body.device || msg.body; // devicePublish has the identity at the top
      const key = `${msg.path}\u0000${idKey(who.productID, who.deviceName)}`;
      const entry = this.watches.get(key);
      if (entry) for (const fn of [...entry.fns]) fn(msg.body);
    }
  }

  close() {
    this.closed = true;
    this.listeners.clear();
    this.watches.clear();
    if (this.ws) shut(this.ws);
    this.ws = null;
  }
}

// Follows an event socket: onEvents([{event, body}]) for each frame, onState("on" | "down").
// Reconnects with after = the last inserted_at seen, so nothing is missed or repeated.
export function follow(path, { onEvents, onState }) {
  let ws = null;
  let closed = false;
  let after = null;
  let delay = 1000;
  let timer = null;
  const pinger = setInterval(() => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send("ping"); // idle_timeout is 60 s
  }, 20000);

  const open = () => {
    if (closed) return;
    const sock = new WebSocket(socketUrl(path, { auth: getKey(), after }));
    ws = sock;
    sock.onopen = () => {
      delay = 1000;
      onState("on");
    };
    sock.onmessage = (msg) => {
      if (typeof msg.data !== "string" || msg.data === "pong") return;
      let events;
      try {
        events = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (!Array.isArray(events)) return;
      events = events.filter((e) => e && e.body && typeof e.body === "object");
      for (const e of events) if (e.body.inserted_at) after = e.body.inserted_at;
      if (events.length) onEvents(events);
    };
    sock.onclose = (e) => {
      if (ws !== sock || closed) return;
      ws = null;
      onState("down");
      if (e.code === 4401) {
        checkKey(); // revoked or expired: the 401 signs out
        return;
      }
      timer = setTimeout(open, delay);
      delay = Math.min(delay * 2, 30000);
    };
  };
  open();
  return {
    close() {
      closed = true;
      clearInterval(pinger);
      clearTimeout(timer);
      if (ws) shut(ws);
      ws = null;
    },
  };
}
