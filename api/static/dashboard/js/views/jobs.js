// /jobs: the caller's jobs, newest first, filtered by type and status (kept in the address:
// /jobs?type=train&status=running can be bookmarked), refreshed every few seconds while any listed job is active
// (queued, running, pausing or cancelling: a paused job waits to be resumed and does not keep the list refreshing).

import { getList, isAbort } from "../api.js";
import {
  dataTable, h, isActive, jobProgress, link, notice, progressBar, replace, statusBadge, timeEl,
} from "../dom.js";

const TYPES = ["train", "finetune", "generate"];
const STATUSES = ["queued", "running", "pausing", "paused", "succeeded", "failed", "cancelling", "cancelled"];
const PAGE_SIZE = 50;
const REFRESH_MS = 3000;

function filterSelect(name, label, options, value, onChange) {
  const select = h("select", { id: `filter-${name}`, name, "data-testid": `filter-${name}` },
    h("option", { value: "" }, `any ${label}`),
    options.map((option) => h("option", { value: option, selected: option === value }, option)));
  select.addEventListener("change", () => onChange(select.value));
  return h("label", { class: "filter" }, `${label[0].toUpperCase()}${label.slice(1)} `, select);
}

function jobRow(job) {
  const { fraction, text } = jobProgress(job);
  return h("tr", { "data-job-id": job.id },
    h("td", {}, link(`/jobs/${encodeURIComponent(job.id)}`, h("code", {}, job.id))),
    h("td", {}, job.type),
    h("td", {}, statusBadge(job.status)),
    h("td", { class: "progress-cell" }, progressBar(fraction, text), h("span", { class: "muted small" }, text)),
    h("td", {}, timeEl(job.created_at)),
    h("td", {}, timeEl(job.started_at)),
    h("td", {}, timeEl(job.finished_at)));
}

/** A filter value from the address, shortened for a notice. */
function quoted(value) {
  return `“${value.length > 80 ? `${value.slice(0, 80)}…` : value}”`;
}

/**
 * The filters named in the address (?type=…&status=…), and a notice for each value that is none of the known
 * ones: such a filter is dropped (the API would refuse it) and the notice says so, rather than the page quietly
 * showing every job as if no filter had been asked for.
 */
function readFilters(query) {
  const filters = {};
  const unknown = [];
  for (const [name, known] of [["type", TYPES], ["status", STATUSES]]) {
    const value = query.get(name) ?? "";
    filters[name] = known.includes(value) ? value : "";
    if (value !== "" && !known.includes(value)) {
      unknown.push(`Unknown ${name} ${quoted(value)}: showing jobs of any ${name}. ` +
        `The ${name} filter takes ${known.join(", ")}.`);
    }
  }
  return { ...filters, unknown };
}

export async function renderJobs(main, ctx) {
  document.title = "Jobs · gpt2-jobs";
  const { type, status, unknown } = readFilters(ctx.query);

  // A new filter value: the address keeps the known filters only (an unknown one was not applied).
  const setFilter = (name, value) => {
    const query = new URLSearchParams();
    for (const [key, current] of [["type", type], ["status", status]]) {
      const chosen = key === name ? value : current;
      if (chosen) query.set(key, chosen);
    }
    const qs = query.toString();
    ctx.navigate(`/jobs${qs ? `?${qs}` : ""}`);
  };
  const filterNotice = unknown.length === 0 ? null :
    h("div", { class: "notice notice-warning", role: "status", "data-testid": "filter-notice" },
      unknown.map((text) => h("p", { class: "notice-line" }, text)),
      h("p", { class: "notice-line" }, link("/jobs", "Clear the filters")));

  const table = dataTable(["Job", "Type", "Status", "Progress", "Created", "Started", "Finished"], [],
    { "data-testid": "jobs-table" });
  const body = table.tBodies[0];
  const message = h("div", {});
  const more = h("button", { type: "button", class: "button secondary", hidden: true }, "Load more");
  const updated = h("span", { class: "muted small", "aria-live": "polite" });

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"), updated),
    h("div", { class: "filters" },
      filterSelect("type", "type", TYPES, type, (value) => setFilter("type", value)),
      filterSelect("status", "status", STATUSES, status, (value) => setFilter("status", value))),
    filterNotice, message, table, more);

  let jobs = [];
  let hasMore = false;
  let timer = null;
  ctx.onLeave(() => clearTimeout(timer));

  const show = () => {
    replace(body, jobs.map(jobRow));
    if (jobs.length === 0) {
      body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, type || status ?
        "No jobs match these filters." : "No jobs yet. Submit one with POST /v1/jobs (or the gpt2jobs command).")));
    }
    more.hidden = !hasMore;
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  };

  // (Re)load the first `count` jobs; while any of them is active, again in a few seconds.
  const load = async (count) => {
    clearTimeout(timer);
    try {
      const page = await getList("/jobs", { type, status, limit: Math.min(100, Math.max(count, 1)) },
        { signal: ctx.signal });
      jobs = page.data;
      hasMore = page.has_more;
      replace(message);
      show();
    } catch (exc) {
      if (isAbort(exc)) return;
      replace(message, notice("error", exc.message));
    }
    if (ctx.isCurrent() && jobs.some(isActive)) timer = setTimeout(() => load(jobs.length || PAGE_SIZE), REFRESH_MS);
  };

  more.addEventListener("click", async () => {
    more.disabled = true;
    try {
      const page = await getList("/jobs", { type, status, limit: PAGE_SIZE, after: jobs[jobs.length - 1].id },
        { signal: ctx.signal });
      jobs = jobs.concat(page.data);
      hasMore = page.has_more;
      show();
    } catch (exc) {
      if (!isAbort(exc)) replace(message, notice("error", exc.message));
    } finally {
      more.disabled = false;
    }
  });

  await load(PAGE_SIZE);
}
