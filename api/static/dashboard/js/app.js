// The dashboard's entry point: sign-in, navigation and the router.
//
// Pages have real addresses (/jobs, /jobs/<job id>, /files, /models) that the server answers with this same
// page, so any of them can be bookmarked or reloaded; links inside the page change the address with the History
// API instead of reloading. Each page gets an AbortSignal and a list of clean-ups, run when the user leaves it
// (stopping its timers, streams and requests).

import { ApiError, clearKey, getKey, getList, isAbort, onUnauthorized, setKey } from "./api.js";
import { h, notice, replace } from "./dom.js";
import { renderFiles } from "./views/files.js";
import { renderJob } from "./views/job.js";
import { renderJobs } from "./views/jobs.js";
import { renderModels } from "./views/models.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const account = document.getElementById("account");
const keyHint = document.getElementById("key-hint");

const ROUTES = [
  { pattern: /^\/jobs\/?$/, section: "jobs", render: renderJobs },
  { pattern: /^\/jobs\/([^/]+)\/?$/, section: "jobs", render: renderJob },
  { pattern: /^\/files\/?$/, section: "files", render: renderFiles },
  { pattern: /^\/models\/?$/, section: "models", render: renderModels },
];

let current = null; // {controller, cleanups} of the page on screen

function leavePage() {
  if (current === null) return;
  current.controller.abort();
  for (const cleanup of current.cleanups) {
    try {
      cleanup();
    } catch (exc) {
      console.error(exc);
    }
  }
  current = null;
}

/** Go to a dashboard address (pushes a history entry unless `replace`). */
export function navigate(href, { replace: replaceEntry = false } = {}) {
  if (replaceEntry) history.replaceState(null, "", href);
  else history.pushState(null, "", href);
  render();
}

function showChrome(signedIn, section = null) {
  nav.hidden = !signedIn;
  account.hidden = !signedIn;
  const key = getKey();
  keyHint.textContent = signedIn && key ? `key ${key.slice(0, 7)}…` : "";
  for (const a of nav.querySelectorAll("a[data-nav]")) {
    if (a.dataset.nav === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function render() {
  leavePage();
  if (!getKey()) {
    renderSignIn();
    return;
  }
  if (location.pathname === "/" || location.pathname === "") {
    history.replaceState(null, "", `/jobs${location.search}`);
  }
  const path = location.pathname;
  const route = ROUTES.map((r) => ({ ...r, match: r.pattern.exec(path) })).find((r) => r.match);
  showChrome(true, route?.section ?? null);
  main.replaceChildren();
  if (!route) {
    document.title = "Not found · gpt2-jobs";
    main.append(h("h1", {}, "Not found"), notice("error", `Nothing lives at ${path}.`));
    return;
  }
  const page = { controller: new AbortController(), cleanups: [] };
  current = page;
  const ctx = {
    params: route.match.slice(1).map(decodeURIComponent),
    query: new URLSearchParams(location.search),
    signal: page.controller.signal,
    navigate,
    onLeave: (cleanup) => page.cleanups.push(cleanup),
    isCurrent: () => current === page,
  };
  route.render(main, ctx).catch((exc) => {
    if (isAbort(exc) || current !== page) return;
    console.error(exc);
    main.append(notice("error", exc instanceof ApiError ? `${exc.message} (${exc.code})` : String(exc)));
  });
}

function renderSignIn(message = null) {
  showChrome(false);
  document.title = "Sign in · gpt2-jobs";
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", "data-testid": "api-key", autocomplete: "off",
    spellcheck: "false", placeholder: "sk-…", required: true,
  });
  const error = h("p", { class: "form-error", "data-testid": "sign-in-error", role: "alert" });
  if (message) error.textContent = message;
  const button = h("button", { type: "submit", class: "button" }, "Sign in");
  const form = h("form", { class: "sign-in", "data-testid": "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Sign in with an API key. Create one on the server with ",
      h("code", {}, "flask --app api keys create --owner NAME"),
      ". The key stays in this browser tab only (sessionStorage) and is sent to this server's API."),
    h("label", { for: "api-key" }, "API key"),
    input,
    button,
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    error.textContent = "";
    try {
      await getList("/jobs", { limit: 1 }, { key });
      setKey(key);
      render();
    } catch (exc) {
      error.textContent = exc instanceof ApiError ? exc.message : String(exc);
      button.disabled = false;
      input.focus();
      input.select();
    }
  });
  replace(main, form);
  input.focus();
}

function signOut() {
  leavePage();
  clearKey();
  history.pushState(null, "", "/");
  renderSignIn();
}

document.getElementById("sign-out").addEventListener("click", signOut);

// Links marked data-link are followed inside the page (a plain click only: a new tab works as usual).
document.addEventListener("click", (event) => {
  const a = event.target.closest?.("a[data-link]");
  if (!a || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey ||
      event.altKey || a.target) return;
  const target = new URL(a.href, location.href);
  if (target.origin !== location.origin) return;
  event.preventDefault();
  navigate(target.pathname + target.search);
});

window.addEventListener("popstate", render);

// A key the API refuses later (revoked): ask for another one, keeping the address.
onUnauthorized((error) => {
  leavePage();
  clearKey();
  renderSignIn(`The API refused the key: ${error.message}`);
});

render();
