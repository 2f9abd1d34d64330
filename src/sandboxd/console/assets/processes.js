// A sandbox's processes: the list (refreshed), start one, signal/kill, and
// follow one's output live (the daemon's SSE follow, read with fetch()).
import { call, followSse, getJson, sendJson } from "./api.js";
import { clear, epochMs, h, toast } from "./dom.js";

const REFRESH_MS = 2000;
const MAX_LINES = 5000; // the pane keeps the last lines only

// A command line as a shell would take it back (as `sandboxd ps` shows it):
// `sh -c 'echo a; echo b'`, not `sh -c echo a; echo b`.
function shellWord(a) {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`;
}

export function mountProcesses(el, sandbox) {
  let stopped = false;
  let timer = null;
  let following = null; // { pid, abort }
  const rows = h("tbody", { id: "process-rows" });
  const cmd = h("input", { id: "process-command", placeholder: "sh -c command, e.g. for i in 1 2 3; do echo $i; sleep 1; done", spellcheck: "false" });
  const start = h("form", { class: "inline-form", id: "process-start" },
    h("label", { class: "grow" }, "Command", cmd), h("button", { type: "submit" }, "Start"));
  const outTitle = h("h3", { id: "output-title" }, "Output");
  const out = h("pre", { class: "output", id: "process-output" });
  clear(el).append(
    start,
    h("table", { class: "grid", id: "processes" },
      h("thead", {}, h("tr", {}, ["PID", "Name", "Status", "Exit", "Started", "Command", ""].map((t) => h("th", {}, t)))),
      rows),
    outTitle, out);

  start.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!cmd.value.trim()) return;
    try {
      const p = await sendJson("POST", "/api/v1/processes", { command: "sh", args: ["-c", cmd.value] }, { sandbox });
      cmd.value = "";
      follow(p.pid);
      refresh();
    } catch (e) { toast(`start: ${e.message}`); }
  });

  async function follow(pid) {
    if (following) following.abort.abort();
    const abort = new AbortController();
    following = { pid, abort };
    clear(out);
    outTitle.textContent = `Output of ${pid} (following)`;
    markSelected();
    const add = (text, cls) => {
      out.append(h("span", { class: cls }, `${text}\n`));
      while (out.childNodes.length > MAX_LINES) out.removeChild(out.firstChild);
      out.scrollTop = out.scrollHeight;
    };
    try {
      await followSse(`/api/v1/processes/${encodeURIComponent(pid)}/output/follow`, sandbox, (name, data) => {
        if (name === "output") add(data.line, data.stream === "stderr" ? "stderr" : "stdout");
        else if (name === "dropped") add(`[${data.dropped_bytes} bytes dropped before this]`, "note");
      }, abort.signal);
      if (following && following.abort === abort) {
        outTitle.textContent = `Output of ${pid} (ended)`;
        refresh(); // its row says how it ended now, not at the next tick
      }
    } catch (e) {
      if (e.name !== "AbortError" && !stopped) toast(`follow: ${e.message}`);
    }
  }

  function markSelected() {
    for (const tr of rows.querySelectorAll("tr")) tr.classList.toggle("selected", following && tr.dataset.pid === String(following.pid));
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const { processes } = await getJson("/api/v1/processes", { sandbox });
      if (stopped) return;
      clear(rows);
      for (const p of processes) {
        const live = p.status === "running" || p.status === "starting";
        const kill = h("button", { type: "button", class: "small", disabled: !live, onclick: async () => {
          try { await call("DELETE", `/api/v1/processes/${p.pid}`, { sandbox }); } catch (e) { toast(`kill: ${e.message}`); }
          refresh();
        } }, "Kill");
        const name = p.managed && p.managed.name ? p.managed.name : "";
        rows.append(h("tr", { dataset: { pid: String(p.pid) }, class: "clickable", onclick: (ev) => { if (ev.target.tagName !== "BUTTON") follow(p.pid); } },
          h("td", { class: "num" }, String(p.pid)),
          h("td", {}, name),
          h("td", {}, p.status),
          h("td", { class: "num" }, p.exit_code === null ? (p.signal ? `sig ${p.signal}` : "") : String(p.exit_code)),
          h("td", {}, p.started_at ? new Date(epochMs(p.started_at)).toLocaleTimeString() : ""),
          h("td", { class: "mono" }, [p.command, ...(p.args || [])].map(shellWord).join(" ")),
          h("td", {}, kill)));
      }
      if (!processes.length) rows.append(h("tr", {}, h("td", { colspan: "7", class: "muted" }, "No processes.")));
      markSelected();
    } catch (e) {
      if (!stopped) toast(`processes: ${e.message}`);
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    if (following) following.abort.abort();
  };
}
