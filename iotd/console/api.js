// The REST API and the websocket URLs, with the key from sessionStorage (never anywhere else).

const STORE = "iotd.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  // What the user sees: the API's own code and message.
  get text() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
}

export function getKey() {
  try {
    return sessionStorage.getItem(STORE);
  } catch {
    return null;
  }
}

export function setKey(key) {
  sessionStorage.setItem(STORE, key);
}

export function forgetKey() {
  try {
    sessionStorage.removeItem(STORE);
  } catch {
    /* storage disabled: nothing was kept */
  }
}

// A header value fetch() accepts (ISO-8859-1 without controls), or an explanation.
export function keyProblem(key) {
  if (!key) return "enter an API key";
  if (/[^\x20-\x7e]/.test(key)) return "an API key is made of plain ASCII characters";
  return null;
}

// {status, body} of one REST call; throws ApiError (the API's {"error": {code, message}}).
export async function api(method, path, body, key = getKey()) {
  if (!key) throw new ApiError(0, "signed_out", "signed out"); // (work left over from a closed view)
  const headers = { Authorization: "Bearer " + key };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp, text;
  try {
    resp = await fetch(path, init);
    text = await resp.text();
  } catch (e) {
    throw new ApiError(0, "network", `iotd did not answer (${e.message})`);
  }
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!resp.ok) {
    const err = data && typeof data === "object" && data.error ? data.error : {};
    const error = new ApiError(resp.status, err.code || `http_${resp.status}`,
                               err.message || resp.statusText || "request failed");
    if (resp.status === 401 && key === getKey()) {
      window.dispatchEvent(new CustomEvent("iotd-unauthorized", { detail: error }));
    }
    throw error;
  }
  return { status: resp.status, body: data };
}

// Asks iotd whether the key still works: a 401 signs the console out (a socket closed with 4401).
export function checkKey() {
  api("GET", "/api/v1/api-keys/self").catch(() => {});
}

// "/api/v1/devices/" + encoded identifier, etc.
export function enc(value) {
  return encodeURIComponent(String(value));
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") q.set(name, String(value));
  }
  const text = q.toString();
  return text ? "?" + text : "";
}

// A ws:// (wss:// behind TLS) URL on this origin.
export function socketUrl(path, params) {
  const url = new URL(path + query(params), location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// Runs at most n of the given async jobs at once.
export function limiter(n) {
  let running = 0;
  const waiting = [];
  const next = () => {
    if (running >= n || !waiting.length) return;
    running++;
    const [job, resolve, reject] = waiting.shift();
    job().then(resolve, reject).finally(() => {
      running--;
      next();
    });
  };
  return (job) => new Promise((resolve, reject) => {
    waiting.push([job, resolve, reject]);
    next();
  });
}
