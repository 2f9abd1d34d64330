// The sandbox list: refreshes itself every 2 s while it is shown.
import { getJson, ns, sendJson } from "./api.js";
import { age, clear, h, statusBadge, toast } from "./dom.js";
import { fetchUsage, usageCell } from "./usage.js";

const REFRESH_MS = 2000;
// Usage is one request per sandbox: asked for the first rows only, so a big
// fleet's list costs the host one list call and a bounded number of reads.
const USAGE_ROWS = 50;

export function parseLabels(text) {
  const out = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const eq = part.indexOf("=");
    if (eq <= 0) throw new Error(`label ${JSON.stringify(part)} is not key=value`);
    out[part.slice(0, eq).trim()] = part.slice(eq + 1).trim();
  }
  return out;
}

export function labelChips(labels) {
  if (!labels || typeof labels !== "object") return "";
  return h("span", { class: "labels" },
    Object.entries(labels).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`)));
}

function createForm(onCreated) {
  const field = (label, input) => h("label", {}, label, input);
  const image = h("input", { name: "image", value: "default", spellcheck: "false" });
  const name = h("input", { name: "name", placeholder: "optional", spellcheck: "false" });
  const cpus = h("input", { name: "cpus", type: "number", min: "0.1", step: "0.1", value: "1" });
  const memory = h("input", { name: "memory_mb", type: "number", min: "64", step: "64", value: "512" });
  const timeout = h("input", { name: "timeout_secs", type: "number", min: "0", placeholder: "none" });
  const labels = h("input", { name: "labels", placeholder: "team=a, env=dev", spellcheck: "false" });
  const submit = h("button", { type: "submit", id: "create-submit" }, "Create");
  const form = h("form", { class: "inline-form", id: "create-form" },
    field("Image", image), field("Name", name), field("CPUs", cpus), field("Memory MB", memory),
    field("Timeout s", timeout), field("Labels", labels), submit);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {
      image: image.value.trim() || undefined,
      resources: { cpus: Number(cpus.value), memory_mb: Number(memory.value) },
      wait: false, // the list shows it pending, then running
    };
    if (name.value.trim()) body.name = name.value.trim();
    if (timeout.value) body.timeout_secs = Number(timeout.value);
    submit.disabled = true;
    try {
      if (labels.value.trim()) body.labels = parseLabels(labels.value);
      const out = await sendJson("POST", ns("/sandboxes"), body);
      toast(`created ${out.sandbox_id}`, "ok");
      onCreated();
    } catch (e) {
      toast(`create: ${e.message}`);
    } finally {
      submit.disabled = false;
    }
  });
  return h("details", { class: "card", id: "create" }, h("summary", {}, "New sandbox"), form);
}

export function mountSandboxes(view) {
  let timer = null;
  let stopped = false;
  const body = h("tbody", { id: "sandbox-rows" });
  const note = h("p", { class: "muted", id: "sandbox-count" });
  // A fleet's front says which node runs each sandbox: a column only then.
  const nodeHead = h("th", { id: "node-column", hidden: true }, "Node");
  const heads = ["Status", "Name", "ID"].map((t) => h("th", {}, t));
  const rest = ["Image", "CPUs", "Memory", "Age", "Labels", "Usage"].map((t) => h("th", {}, t));
  const table = h("table", { class: "grid", id: "sandboxes" },
    h("thead", {}, h("tr", {}, heads, nodeHead, rest)),
    body);
  clear(view).append(h("h1", {}, "Sandboxes"), createForm(() => refresh()), note, table);

  async function refresh() {
    clearTimeout(timer);
    try {
      const { sandboxes } = await getJson(ns("/sandboxes"));
      const usages = await Promise.all(sandboxes.map((s, i) => (s.status === "running" && i < USAGE_ROWS ? fetchUsage(s.id) : null)));
      if (stopped) return;
      clear(body);
      const fleet = sandboxes.some((s) => s.node);
      nodeHead.hidden = !fleet;
      sandboxes.forEach((s, i) => {
        const link = `#/sandbox/${encodeURIComponent(s.id)}`;
        body.append(h("tr", { dataset: { id: s.id } },
          h("td", {}, statusBadge(s.status)),
          h("td", {}, h("a", { href: link }, s.name || "–")),
          h("td", {}, h("a", { href: link, class: "mono" }, s.id)),
          h("td", { class: "node", hidden: !fleet }, s.node || "–"),
          h("td", {}, s.image),
          h("td", { class: "num" }, s.resources ? s.resources.cpus : "–"),
          h("td", { class: "num" }, s.resources ? `${s.resources.memory_mb} MB` : "–"),
          h("td", { class: "num" }, age(s.created_at)),
          h("td", {}, labelChips(s.labels)),
          h("td", {}, usageCell(usages[i]))));
      });
      if (!sandboxes.length) body.append(h("tr", {}, h("td", { colspan: fleet ? "10" : "9", class: "muted" }, "No live sandboxes in this namespace.")));
      note.textContent = `${sandboxes.length} live · refreshed ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      if (!stopped) note.textContent = `could not list: ${e.message}`;
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}
