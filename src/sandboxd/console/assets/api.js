// Every call the console makes: the host's public API, the way the SDK calls it.
// The key lives in this tab's sessionStorage only and is sent as
// "Authorization: Bearer"; it is never put in a URL and never logged.

const KEY = "sandboxd.console.key";
const NS = "sandboxd.console.namespace";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get namespace() { return sessionStorage.getItem(NS) || "default"; },
  get loggedIn() { return sessionStorage.getItem(KEY) !== null; },
  login(key, namespace) {
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(NS, namespace || "default");
  },
  logout() { sessionStorage.removeItem(KEY); sessionStorage.removeItem(NS); },
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code || "";
  }
}

// Listeners told when the host says the key is wrong (401): the page asks again.
const unauthorized = [];
export function onUnauthorized(fn) { unauthorized.push(fn); }

function headers(extra, sandbox) {
  const h = new Headers(extra || {});
  if (session.key) h.set("Authorization", `Bearer ${session.key}`);
  if (sandbox) h.set("X-Tensorlake-Sandbox-Id", sandbox);
  return h;
}

async function failure(resp) {
  let code = "", message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    code = body.code || "";
    message = body.error || body.message || message;
  } catch (_) { /* not JSON: keep the status */ }
  if (resp.status === 401) unauthorized.forEach((fn) => fn(message));
  return new ApiError(resp.status, code, message);
}

// fetch() with the key; a JSON body gets its content type (the host requires it).
export async function call(method, path, { json, body, sandbox, signal, accept } = {}) {
  const init = { method, headers: headers(accept ? { Accept: accept } : {}, sandbox), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers.set("Content-Type", "application/json");
  } else if (body !== undefined) {
    init.body = body;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  return resp;
}

export async function getJson(path, opts) {
  return (await call("GET", path, opts)).json();
}

export async function sendJson(method, path, json, opts = {}) {
  const resp = await call(method, path, { ...opts, json });
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

// The lifecycle routes of this namespace.
export const ns = (rest = "") => `/v1/namespaces/${encodeURIComponent(session.namespace)}${rest}`;

// Server-sent events over fetch() (EventSource cannot send the key):
// onEvent(name, data) for each event until the stream ends or signal aborts.
export async function followSse(path, sandbox, onEvent, signal) {
  const resp = await call("GET", path, { sandbox, signal, accept: "text/event-stream" });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// The terminal's websocket through the host's proxy. A browser cannot set its
// headers, so the key and the sandbox id ride in the subprotocol list; the
// host turns them back into headers and answers "sandboxd.console.v1".
export function openSocket(path, sandbox) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const protocols = ["sandboxd.console.v1", `sandboxd.sandbox.${sandbox}`];
  if (session.key) protocols.push(`sandboxd.key.${base64url(session.key)}`);
  const ws = new WebSocket(`${scheme}//${location.host}${path}`, protocols);
  ws.binaryType = "arraybuffer";
  return ws;
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  bytes.forEach((b) => { bin += String.fromCharCode(b); });
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
