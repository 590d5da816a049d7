// Building the page safely, and formatting values for people.
//
// Every piece of text from the API (names, prompts, completions, error messages) goes into the page as a text
// node or an attribute value, never as HTML: h() turns strings into text nodes, and nothing here sets innerHTML.

import { toJson } from "./api.js";

/** h("a", {href: "/x", class: "link"}, "text", child, [more children]) -> an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

/** Append children (elements, strings, numbers, arrays of them; null and undefined are skipped). */
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/**
 * Text that may be very long (a 255-character file or model name, a custom_id): wrapped anywhere and cut after two
 * lines with an ellipsis (style.css, .long-text), the whole of it in the title (shown on hover).
 */
export function longText(text) {
  if (text === null || text === undefined || text === "") return h("span", { class: "muted" }, "—");
  return h("span", { class: "long-text", title: String(text) }, String(text));
}

/** A link handled by the router (no page reload). */
export function link(href, ...children) {
  return h("a", { href, "data-link": true }, ...children);
}

export function pad(n) {
  return String(n).padStart(2, "0");
}

/** Unix seconds -> "2026-11-24 14:05:09" in the browser's time zone; "—" for null. */
export function formatTime(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const d = new Date(seconds * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A <time> element showing formatTime, with the ISO instant as its title. */
export function timeEl(seconds) {
  if (seconds === null || seconds === undefined) return h("span", { class: "muted" }, "—");
  const iso = new Date(seconds * 1000).toISOString();
  return h("time", { datetime: iso, title: iso }, formatTime(seconds));
}

/** Seconds -> "1 h 02 min", "3 min 05 s", "42 s". */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
}

/** Bytes -> "466.3 kB" (powers of 1000, as the README writes sizes; a no-break space before the unit). */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${value}\u00a0B` : `${value.toFixed(1)}\u00a0${units[unit]}`; // never "466.3" / "kB"
}

/**
 * A number for a table cell: integers with separators, others to 4 significant digits; "—" for null. A BigInt (an
 * integer too large for a Number, see parseJson in api.js) is written with all its digits and no separators.
 */
export function formatNumber(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "bigint") return value.toString();
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  if (Math.abs(value) !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) return value.toExponential(2);
  return String(Number(value.toPrecision(digits)));
}

/** Any JSON value as short text: objects as compact JSON. */
export function formatValue(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number" || typeof value === "bigint") return formatNumber(value, 6);
  if (typeof value === "string") return value;
  return toJson(value);
}

/**
 * A JSON value exactly as the API gave it, to be copied back into a request: numbers unrounded and without
 * separators (seeds, step counts, learning rates), BigInt with all its digits, objects as compact JSON.
 */
export function formatExact(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number" || typeof value === "bigint") return value.toString();
  if (typeof value === "string") return value;
  return toJson(value);
}

/** The statuses in which a job changes by itself (a worker moves it on): pages follow such jobs live. */
export const ACTIVE_STATUSES = new Set(["queued", "running", "cancelling", "pausing"]);

/**
 * Whether the job changes by itself. A paused job is neither active nor finished: it stays paused until someone
 * resumes (or cancels) it, so pages stop following it (the job page follows it again once it is resumed there).
 */
export function isActive(job) {
  return ACTIVE_STATUSES.has(job.status);
}

/** The actions a job's status allows (POST /v1/jobs/{id}/pause, /resume, /cancel). */
export function jobActions(job) {
  return {
    pause: job.status === "queued" || job.status === "running",
    resume: job.status === "paused",
    cancel: ["queued", "running", "pausing", "paused"].includes(job.status),
  };
}

/** A share from 0 to 1 as "61.3 %" (a no-break space before the sign); "—" for null. */
export function formatPercent(value) {
  if (value === null || value === undefined || typeof value !== "number") return "—";
  return `${(value * 100).toFixed(1)}\u00a0%`;
}

/** A coloured status label. */
export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status }, status);
}

/** A progress bar, `fraction` from 0 to 1 (null: unknown). */
export function progressBar(fraction, label) {
  const bar = h("div", { class: "progress-fill" });
  bar.style.width = `${Math.round(Math.min(1, Math.max(0, fraction || 0)) * 1000) / 10}%`;
  return h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": Math.round((fraction || 0) * 100), title: label || null }, bar);
}

/** A job's progress as (fraction done, short text), for either kind of job. */
export function jobProgress(job) {
  const p = job.progress || {};
  if (job.type === "generate") {
    const total = p.total ?? job.prompt_count ?? null;
    const done = (p.completed || 0) + (p.failed || 0);
    const text = total === null ? "—" : `${done}/${total} prompts` + (p.failed ? ` (${p.failed} failed)` : "");
    return { fraction: total ? done / total : (job.status === "succeeded" ? 1 : 0), text };
  }
  const total = p.total_steps ?? null;
  const step = p.step || 0;
  const text = total === null ? `step ${step}` : `step ${step}/${total}`;
  return { fraction: total ? step / total : (job.status === "succeeded" ? 1 : 0), text };
}

/** A two-column table of [label, value] rows. */
export function keyValueTable(rows, attrs = {}) {
  return h("table", { class: "kv", ...attrs },
    h("tbody", {}, rows.map(([key, value]) =>
      h("tr", {}, h("th", { scope: "row" }, key), h("td", {}, value instanceof Node ? value : formatValue(value))))));
}

/** A table with a header row; `rows` are arrays of cells (strings, numbers or nodes). */
export function dataTable(headers, rows, attrs = {}) {
  return h("table", { class: "data", ...attrs },
    h("thead", {}, h("tr", {}, headers.map((title) => h("th", { scope: "col" }, title)))),
    h("tbody", {}, rows));
}

/** A row of a dataTable. */
export function row(cells, attrs = {}) {
  return h("tr", attrs, cells.map((cell) => h("td", {}, cell instanceof Node ? cell : formatValue(cell))));
}

/** A boxed notice: kind "error", "warning" or "info". */
export function notice(kind, ...children) {
  return h("div", { class: `notice notice-${kind}`, role: kind === "error" ? "alert" : "status" }, ...children);
}
