// A sandbox's files: browse (files/list), download (GET files), upload (PUT files).
import { call, getJson } from "./api.js";
import { bytes, clear, epochMs, h, toast } from "./dom.js";

function join(dir, name) { return dir.endsWith("/") ? dir + name : `${dir}/${name}`; }
function parent(dir) {
  const cut = dir.replace(/\/+$/, "").lastIndexOf("/");
  return cut <= 0 ? "/" : dir.slice(0, cut);
}
const q = (path) => `?path=${encodeURIComponent(path)}`;

export function mountFiles(el, sandbox) {
  let dir = "/tmp";
  const pathInput = h("input", { id: "files-path", value: dir, spellcheck: "false" });
  const rows = h("tbody", { id: "file-rows" });
  const picker = h("input", { type: "file", id: "upload-input", multiple: true });
  const nav = h("form", { class: "inline-form", id: "files-nav" },
    h("button", { type: "button", id: "files-up", onclick: () => open(parent(dir)) }, "↑ Up"),
    h("label", { class: "grow" }, "Path", pathInput), h("button", { type: "submit" }, "Open"));
  const upload = h("form", { class: "inline-form", id: "upload-form" },
    h("label", { class: "grow" }, "Upload to this directory", picker),
    h("button", { type: "submit", id: "upload-submit" }, "Upload"));
  clear(el).append(nav, upload,
    h("table", { class: "grid", id: "files" },
      h("thead", {}, h("tr", {}, ["Name", "Size", "Modified", ""].map((t) => h("th", {}, t)))),
      rows));

  nav.addEventListener("submit", (ev) => { ev.preventDefault(); open(pathInput.value.trim() || "/"); });
  upload.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const files = [...picker.files];
    if (!files.length) { toast("choose a file first"); return; }
    for (const f of files) {
      try {
        await call("PUT", `/api/v1/files${q(join(dir, f.name))}`, { sandbox, body: f });
        toast(`uploaded ${join(dir, f.name)} (${bytes(f.size)})`, "ok");
      } catch (e) { toast(`upload ${f.name}: ${e.message}`); }
    }
    picker.value = "";
    open(dir);
  });

  async function download(path, name) {
    try {
      const blob = await (await call("GET", `/api/v1/files${q(path)}`, { sandbox })).blob();
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: name });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) { toast(`download: ${e.message}`); }
  }

  async function open(path) {
    try {
      const listing = await getJson(`/api/v1/files/list${q(path)}`, { sandbox });
      dir = listing.path || path;
      pathInput.value = dir;
      clear(rows);
      const entries = [...listing.entries].sort((a, b) => (b.is_dir - a.is_dir) || a.name.localeCompare(b.name));
      for (const e of entries) {
        const full = join(dir, e.name);
        const name = e.is_dir
          ? h("a", { href: "#", class: "dir", onclick: (ev) => { ev.preventDefault(); open(full); } }, `${e.name}/`)
          : h("span", {}, e.name);
        rows.append(h("tr", { dataset: { name: e.name } },
          h("td", { class: "mono" }, name),
          h("td", { class: "num" }, e.is_dir ? "" : bytes(e.size)),
          h("td", {}, e.modified_at ? new Date(epochMs(e.modified_at)).toLocaleString() : ""),
          h("td", {}, e.is_dir ? "" : h("button", { type: "button", class: "small", onclick: () => download(full, e.name) }, "Download"))));
      }
      if (!entries.length) rows.append(h("tr", {}, h("td", { colspan: "4", class: "muted" }, "Empty directory.")));
    } catch (e) { toast(`list ${path}: ${e.message}`); }
  }
  open(dir);
  return () => {};
}
