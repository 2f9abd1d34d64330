// Per-sandbox usage (GET {ns}/sandboxes/{id}/usage), when the host has the
// route: a host without it answers 501 ROUTE_UNSUPPORTED and the console then
// shows nothing and stops asking.
import { ApiError, getJson, ns } from "./api.js";
import { bytes, h } from "./dom.js";

let supported = true;

export async function fetchUsage(id) {
  if (!supported) return null;
  try {
    return await getJson(ns(`/sandboxes/${encodeURIComponent(id)}/usage`));
  } catch (e) {
    if (e instanceof ApiError && (e.status === 501 || e.code === "ROUTE_UNSUPPORTED")) supported = false;
    return null;
  }
}

// The ring's samples, then the fresh reading the route answers with (as of now).
export function series(u) {
  const samples = [...(u.samples || [])];
  if (u.current) samples.push({ ...u.current, at: Date.now() });
  return samples;
}

// CPU plots are scaled to at least one core (100%), so an idle sandbox's
// crumbs of CPU draw a flat line near zero, not a full-height spike.
const CPU_FLOOR = 100;

// CPU in % of one core between consecutive samples.
export function cpuPercents(samples) {
  const out = [];
  for (let i = 1; i < samples.length; i += 1) {
    const dt = samples[i].at - samples[i - 1].at;
    const du = samples[i].cpu_usec - samples[i - 1].cpu_usec;
    if (dt > 0) out.push(Math.max(0, (du / 1000 / dt) * 100));
  }
  return out;
}

const SVG = "http://www.w3.org/2000/svg";

export function sparkline(values, { width = 120, height = 24, max, cls = "" } = {}) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("class", `spark ${cls}`);
  if (values.length === 1) values = [values[0], values[0]]; // one reading: a level line
  if (values.length > 1) {
    const top = Math.max(max || 0, ...values, 1e-9);
    const step = width / (values.length - 1);
    const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 1 - (v / top) * (height - 2)).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none");
    svg.append(line);
  }
  return svg;
}

// A compact cell for the list: memory now, and CPU and memory sparklines.
export function usageCell(u) {
  if (!u || !u.current) return "";
  const c = u.current;
  const samples = series(u);
  const cpu = cpuPercents(samples);
  const mem = samples.map((s) => s.memory_bytes);
  const limit = c.memory_limit_bytes ? ` / ${bytes(c.memory_limit_bytes)}` : "";
  return h("span", { class: "usage" },
    sparkline(cpu, { width: 60, height: 16, max: CPU_FLOOR, cls: "cpu" }),
    sparkline(mem, { width: 60, height: 16, max: c.memory_limit_bytes || undefined, cls: "mem" }),
    h("span", { class: "muted" }, `${bytes(c.memory_bytes)}${limit}`));
}

// The sandbox page's panel: every figure the host reports, with CPU and memory plots.
export function usagePanel(u) {
  const c = u.current;
  const samples = series(u);
  const cpu = cpuPercents(samples);
  const row = (label, value) => h("div", { class: "kv" }, h("span", { class: "muted" }, label), h("span", {}, value));
  const of = (used, limit) => (limit ? `${bytes(used)} of ${bytes(limit)}` : bytes(used));
  return h("section", { class: "card usage-panel", id: "usage" },
    h("h2", {}, "Usage"),
    h("div", { class: "usage-plots" },
      h("figure", {}, sparkline(cpu, { width: 240, height: 48, max: CPU_FLOOR, cls: "cpu" }),
        h("figcaption", {}, `CPU ${cpu.length ? cpu[cpu.length - 1].toFixed(1) : "0"}% · ${(c.cpu_usec / 1e6).toFixed(2)} s total`)),
      h("figure", {}, sparkline(samples.map((s) => s.memory_bytes), { width: 240, height: 48, max: c.memory_limit_bytes || undefined, cls: "mem" }),
        h("figcaption", {}, `memory ${of(c.memory_bytes, c.memory_limit_bytes)}`))),
    h("div", { class: "kvs" },
      row("memory peak", bytes(c.memory_peak_bytes)),
      row("disk", c.disk_used_bytes === null || c.disk_used_bytes === undefined ? "–" : of(c.disk_used_bytes, c.disk_limit_bytes)),
      row("network in", bytes(c.net_rx_bytes)),
      row("network out", bytes(c.net_tx_bytes))));
}
