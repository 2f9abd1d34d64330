// A terminal in the browser: a PTY session of the sandbox's daemon (POST
// /api/v1/pty), driven over its websocket through the host's proxy, drawn by
// the vendored xterm.js. Frames (docs/terminals-and-tunnels.md): client → 0x00
// input, 0x01 cols rows (u16 BE) resize, 0x02 ready; server → 0x00 output,
// 0x03 exit code (i32 BE).
import { ApiError, call, openSocket, sendJson } from "./api.js";
import { clear, h, toast } from "./dom.js";

const enc = new TextEncoder();

function frame(op, payload) {
  const out = new Uint8Array(1 + payload.length);
  out[0] = op;
  out.set(payload, 1);
  return out;
}

function resizeFrame(cols, rows) {
  const b = new Uint8Array(5);
  const v = new DataView(b.buffer);
  v.setUint8(0, 0x01);
  v.setUint16(1, cols);
  v.setUint16(3, rows);
  return b;
}

async function createSession(sandbox, rows, cols) {
  for (const command of ["bash", "sh"]) {
    try {
      return await sendJson("POST", "/api/v1/pty", { command, rows, cols, env: { TERM: "xterm-256color" } }, { sandbox });
    } catch (e) {
      if (!(e instanceof ApiError && e.code === "COMMAND_NOT_FOUND")) throw e;
    }
  }
  throw new Error("neither bash nor sh is in this sandbox");
}

export function mountTerminal(el, sandbox) {
  let ws = null;
  let session = null;
  let stopped = false;
  const state = h("span", { class: "muted", id: "terminal-state" }, "connecting…");
  // xterm fits itself to its parent's box: the padding is on a frame around it.
  const screen = h("div", { class: "terminal-screen", id: "terminal" });
  const restart = h("button", { type: "button", id: "terminal-restart", class: "small" }, "New session");
  clear(el).append(h("div", { class: "title-row" }, state, restart), h("div", { class: "terminal" }, screen));

  const term = new globalThis.Terminal({
    cursorBlink: true,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, monospace",
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#101418", foreground: "#e6e6e6" },
  });
  const fit = new globalThis.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  fit.fit();

  const send = (bytes) => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(bytes); };
  term.onData((text) => send(frame(0x00, enc.encode(text))));
  term.onBinary((text) => send(frame(0x00, Uint8Array.from(text, (c) => c.charCodeAt(0) & 0xff))));
  term.onResize(({ cols, rows }) => send(resizeFrame(cols, rows)));
  const observer = new ResizeObserver(() => { try { fit.fit(); } catch (_) { /* hidden */ } });
  observer.observe(screen);

  async function connect() {
    if (ws) ws.close();
    term.reset();
    state.textContent = "connecting…";
    try {
      session = await createSession(sandbox, term.rows, term.cols);
    } catch (e) {
      state.textContent = `could not start a terminal: ${e.message}`;
      return;
    }
    if (stopped) return;
    const path = `/api/v1/pty/${encodeURIComponent(session.session_id)}/ws?token=${encodeURIComponent(session.token)}`;
    ws = openSocket(path, sandbox);
    const mine = ws;
    ws.onopen = () => {
      state.textContent = `session ${session.session_id} · ${session.command} · pid ${session.pid}`;
      send(resizeFrame(term.cols, term.rows));
      send(Uint8Array.of(0x02)); // READY: replay the history, then live output
      term.focus();
    };
    ws.onmessage = (ev) => {
      const data = new Uint8Array(ev.data);
      if (data[0] === 0x00) term.write(data.subarray(1));
      else if (data[0] === 0x03) {
        const code = new DataView(data.buffer, data.byteOffset + 1, 4).getInt32(0);
        state.textContent = `exited with code ${code}`;
      }
    };
    ws.onclose = (ev) => {
      if (mine !== ws || stopped) return;
      if (!state.textContent.startsWith("exited")) state.textContent = `disconnected (${ev.code}${ev.reason ? ` ${ev.reason}` : ""})`;
    };
  }
  restart.addEventListener("click", () => { dropSession(); connect(); });

  function dropSession() {
    if (!session) return Promise.resolve();
    const sid = session.session_id;
    session = null;
    return call("DELETE", `/api/v1/pty/${encodeURIComponent(sid)}`, { sandbox }).catch(() => {});
  }
  connect().catch((e) => toast(e.message));
  return () => {
    stopped = true;
    observer.disconnect();
    if (ws) ws.close();
    term.dispose();
    return dropSession(); // awaited before a suspend: a late DELETE would resume it
  };
}
