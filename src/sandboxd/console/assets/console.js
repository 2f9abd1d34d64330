// The console's shell: log in once (the key goes to sessionStorage), then a
// hash router over the views. Nothing here talks to anything but the host's API.
import { getJson, ns, onUnauthorized, session } from "./api.js";
import { toast } from "./dom.js";
import { mountPools } from "./pools.js";
import { mountSandbox } from "./sandbox.js";
import { mountSandboxes } from "./sandboxes.js";

const view = document.getElementById("view");
const login = document.getElementById("login");
const loginError = document.getElementById("login-error");
let unmount = null;

function showLogin(message) {
  if (unmount) { unmount(); unmount = null; }
  view.hidden = true;
  login.hidden = false;
  loginError.hidden = !message;
  loginError.textContent = message || "";
  document.getElementById("logout").hidden = true;
  document.getElementById("nav").hidden = true; // nothing to go to before a key
  document.getElementById("whoami").textContent = "";
  document.getElementById("login-key").focus();
}

document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = document.getElementById("login-key").value.trim();
  const namespace = document.getElementById("login-ns").value.trim() || "default";
  session.login(key, namespace);
  try {
    await getJson(ns("/sandboxes"));
  } catch (e) {
    session.logout();
    showLogin(e.status === 401 ? "The host refused this key." : `The host answered: ${e.message}`);
    return;
  }
  document.getElementById("login-key").value = "";
  route();
});

document.getElementById("logout").addEventListener("click", () => {
  session.logout();
  showLogin();
});

onUnauthorized(() => {
  session.logout();
  showLogin("The host refused the key: log in again.");
});

function route() {
  if (!session.loggedIn) { showLogin(); return; }
  login.hidden = true;
  view.hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("nav").hidden = false;
  document.getElementById("whoami").textContent = `namespace ${session.namespace}`;
  if (unmount) { unmount(); unmount = null; }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  document.getElementById("nav-sandboxes").classList.toggle("active", parts[0] !== "pools");
  document.getElementById("nav-pools").classList.toggle("active", parts[0] === "pools");
  try {
    if (parts[0] === "sandbox" && parts[1]) unmount = mountSandbox(view, parts[1], parts[2] || "processes");
    else if (parts[0] === "pools") unmount = mountPools(view);
    else unmount = mountSandboxes(view);
  } catch (e) {
    toast(e.message);
  }
}

window.addEventListener("hashchange", route);
route();
