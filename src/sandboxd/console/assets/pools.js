// Warm pools: list (refreshed), create, delete; a pool's containers on request.
import { call, getJson, ns, sendJson } from "./api.js";
import { age, clear, h, toast } from "./dom.js";
import { labelChips, parseLabels } from "./sandboxes.js";

const REFRESH_MS = 3000;

export function mountPools(view) {
  let stopped = false;
  let timer = null;
  const rows = h("tbody", { id: "pool-rows" });
  const field = (label, input) => h("label", {}, label, input);
  const image = h("input", { name: "image", value: "default", spellcheck: "false" });
  const cpus = h("input", { name: "cpus", type: "number", min: "0.1", step: "0.1", value: "1" });
  const memory = h("input", { name: "memory_mb", type: "number", min: "64", step: "64", value: "512" });
  const warm = h("input", { name: "warm_containers", type: "number", min: "0", value: "1" });
  const max = h("input", { name: "max_containers", type: "number", min: "1", placeholder: "no limit" });
  const labels = h("input", { name: "labels", placeholder: "team=a", spellcheck: "false" });
  const form = h("form", { class: "inline-form", id: "pool-form" },
    field("Image", image), field("CPUs", cpus), field("Memory MB", memory), field("Warm", warm),
    field("Max", max), field("Labels", labels), h("button", { type: "submit" }, "Create pool"));
  clear(view).append(h("h1", {}, "Pools"),
    h("details", { class: "card", id: "pool-create" }, h("summary", {}, "New pool"), form),
    h("table", { class: "grid", id: "pools" },
      h("thead", {}, h("tr", {}, ["ID", "Image", "CPUs", "Memory", "Warm", "Max", "Age", "Labels", ""].map((t) => h("th", {}, t)))),
      rows));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {
      image: image.value.trim() || undefined,
      resources: { cpus: Number(cpus.value), memory_mb: Number(memory.value) },
      warm_containers: Number(warm.value || 0),
    };
    if (max.value) body.max_containers = Number(max.value);
    try {
      if (labels.value.trim()) body.labels = parseLabels(labels.value);
      const out = await sendJson("POST", ns("/sandbox-pools"), body);
      toast(`created pool ${out.pool_id}`, "ok");
      refresh();
    } catch (e) { toast(`create pool: ${e.message}`); }
  });

  async function remove(id) {
    try {
      await call("DELETE", ns(`/sandbox-pools/${encodeURIComponent(id)}`));
      toast(`deleted pool ${id}`, "ok");
    } catch (e) { toast(`delete pool: ${e.message}`); }
    refresh();
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const { pools } = await getJson(ns("/sandbox-pools"));
      if (stopped) return;
      clear(rows);
      for (const p of pools) {
        rows.append(h("tr", { dataset: { id: p.id } },
          h("td", { class: "mono" }, p.id),
          h("td", {}, p.image),
          h("td", { class: "num" }, p.resources ? String(p.resources.cpus) : "–"),
          h("td", { class: "num" }, p.resources ? `${p.resources.memory_mb} MB` : "–"),
          h("td", { class: "num" }, String(p.warm_containers ?? 0)),
          h("td", { class: "num" }, p.max_containers ? String(p.max_containers) : "–"),
          h("td", { class: "num" }, p.created_at ? age(p.created_at) : ""),
          h("td", {}, labelChips(p.labels)),
          h("td", {}, h("button", { type: "button", class: "small danger", onclick: () => remove(p.id) }, "Delete"))));
      }
      if (!pools.length) rows.append(h("tr", {}, h("td", { colspan: "9", class: "muted" }, "No pools in this namespace.")));
    } catch (e) {
      if (!stopped) toast(`pools: ${e.message}`);
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}
