// One sandbox: what it is, its actions, its usage, and tabs for its processes,
// files and a terminal (each tab talks to the sandbox's daemon through the
// host's /api/v1/* proxy, naming the sandbox with X-Tensorlake-Sandbox-Id).
import { ApiError, call, getJson, ns } from "./api.js";
import { age, clear, epochMs, h, statusBadge, toast } from "./dom.js";
import { mountFiles } from "./files.js";
import { mountProcesses } from "./processes.js";
import { labelChips } from "./sandboxes.js";
import { mountTerminal } from "./terminal.js";
import { fetchUsage, usagePanel } from "./usage.js";

const REFRESH_MS = 2000;
const TABS = { processes: mountProcesses, files: mountFiles, terminal: mountTerminal };

export function mountSandbox(view, id, tab) {
  let stopped = false;
  let timer = null;
  let unmountTab = null;
  let info = null;
  const path = ns(`/sandboxes/${encodeURIComponent(id)}`);
  const title = h("h1", {}, id);
  const facts = h("div", { class: "facts", id: "facts" });
  const actions = h("div", { class: "actions" });
  const usageSlot = h("div", { id: "usage-slot" });
  const tabBar = h("nav", { class: "tabs" });
  const tabBody = h("div", { class: "tab-body" });
  clear(view).append(
    h("p", {}, h("a", { href: "#/sandboxes" }, "← Sandboxes")),
    h("div", { class: "title-row" }, title, actions),
    facts, usageSlot, tabBar, tabBody);

  // A tab reaches the daemon through the proxy, and the proxy resumes a
  // suspended sandbox for any request: so tabs run only while it runs, and are
  // stopped (their terminal session deleted) before a suspend or terminate.
  async function stopTab(why) {
    if (unmountTab) {
      const done = unmountTab();
      unmountTab = null;
      await done;
    }
    clear(tabBody).append(h("p", { class: "muted", id: "tab-paused" }, why));
  }
  function button(label, id_, fn) {
    return h("button", { type: "button", id: id_, onclick: async (ev) => {
      ev.target.disabled = true;
      try { await fn(); } catch (e) { toast(`${label.toLowerCase()}: ${e.message}`); }
      ev.target.disabled = false;
      refresh();
    } }, label);
  }
  // Terminate asks twice: the first click arms it for a few seconds.
  const terminate = h("button", { type: "button", id: "terminate", class: "danger" }, "Terminate");
  terminate.addEventListener("click", async () => {
    if (!terminate.dataset.armed) {
      terminate.dataset.armed = "1";
      terminate.textContent = "Confirm terminate";
      setTimeout(() => { delete terminate.dataset.armed; terminate.textContent = "Terminate"; }, 5000);
      return;
    }
    terminate.disabled = true;
    try {
      await stopTab("Terminating…");
      await call("DELETE", path);
      toast(`terminated ${id}`, "ok");
    } catch (e) { toast(`terminate: ${e.message}`); }
    terminate.disabled = false;
    refresh();
  });
  actions.append(
    button("Suspend", "suspend", async () => {
      await stopTab("Suspending…");
      await call("POST", `${path}/suspend`);
    }),
    button("Resume", "resume", () => call("POST", `${path}/resume`)),
    terminate);

  for (const name of Object.keys(TABS)) {
    tabBar.append(h("a", { href: `#/sandbox/${encodeURIComponent(id)}/${name}`, id: `tab-${name}`, class: name === tab ? "active" : "" },
      name[0].toUpperCase() + name.slice(1)));
  }

  function showFacts(s) {
    title.textContent = s.name ? `${s.name}` : s.id;
    const row = (k, v) => h("div", { class: "kv" }, h("span", { class: "muted" }, k), h("span", {}, v));
    clear(facts).append(
      row("status", statusBadge(s.status)),
      row("id", h("span", { class: "mono" }, s.id)),
      s.node ? row("node", s.node) : "", // a fleet's front says where it runs
      row("image", s.image),
      row("cpus", s.resources ? String(s.resources.cpus) : "–"),
      row("memory", s.resources ? `${s.resources.memory_mb} MB` : "–"),
      row("disk", s.resources && s.resources.disk_mb ? `${s.resources.disk_mb} MB` : "–"),
      row("created", `${new Date(epochMs(s.created_at)).toLocaleString()} (${age(s.created_at)} ago)`),
      s.pool_id ? row("pool", s.pool_id) : "",
      s.termination_reason ? row("reason", s.termination_reason) : "",
      s.labels && Object.keys(s.labels).length ? row("labels", labelChips(s.labels)) : "");
    const live = ["running", "suspended", "suspending", "snapshotting", "pending"].includes(s.status);
    actions.querySelector("#suspend").disabled = s.status !== "running";
    actions.querySelector("#resume").disabled = s.status !== "suspended";
    terminate.disabled = !live;
    if (!live) { delete terminate.dataset.armed; terminate.textContent = "Terminate"; }
    facts.dataset.refreshes = String(Number(facts.dataset.refreshes || 0) + 1);
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      info = await getJson(path);
      if (stopped) return;
      showFacts(info);
      const usage = info.status === "running" ? await fetchUsage(id) : null;
      if (stopped) return;
      clear(usageSlot);
      if (usage && usage.current) usageSlot.append(usagePanel(usage));
      if (info.status === "running") {
        if (!unmountTab) unmountTab = TABS[tab](tabBody, id);
      } else {
        const why = info.status === "suspended"
          ? "The sandbox is suspended: resume it to see its processes, files and terminal."
          : `The sandbox is ${info.status}: its processes, files and terminal are reachable while it runs.`;
        await stopTab(why);
      }
    } catch (e) {
      if (stopped) return;
      if (e instanceof ApiError && e.status === 404) {
        clear(facts).append(h("p", { class: "error" }, `No sandbox ${id} in this namespace.`));
        return;
      }
      toast(e.message);
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    if (unmountTab) unmountTab();
  };
}
