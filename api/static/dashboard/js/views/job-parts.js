// The pieces of a job's page, each a pure function of API objects to elements (views/job.js keeps them live).

import {
  dataTable, formatBytes, formatDuration, formatExact, formatNumber, formatPercent, formatValue, h, isActive,
  jobProgress, keyValueTable, link, longText, progressBar, row, statusBadge, timeEl,
} from "../dom.js";

/** Keys of a job object shown in the summary rather than among its parameters. */
const SUMMARY_KEYS = new Set(["id", "object", "type", "status", "created_at", "started_at", "finished_at", "progress",
  "result", "error", "attempts"]);

const SHAPE_ORDER = ["n_layer", "n_head", "n_embd", "block_size"];

/** A model preset or id as is; a shape as "n_layer 6 · n_head 6 · n_embd 384 · block_size 256". */
function modelText(model) {
  if (model && typeof model === "object") {
    const keys = Object.keys(model).sort((a, b) => (SHAPE_ORDER.indexOf(a) + 1 || 99) - (SHAPE_ORDER.indexOf(b) + 1 || 99));
    return keys.map((name) => `${name} ${model[name]}`).join(" · ");
  }
  return model;
}

function modelCell(model) {
  return typeof model === "string" && model.startsWith("model-") ? link("/models", h("code", {}, model)) :
    modelText(model);
}

/** Elapsed run time: finished − started, or now − started while it runs. */
function elapsed(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ?? Date.now() / 1000;
  return end - job.started_at;
}

/** Header facts and progress of a job. */
export function summary(job) {
  const { fraction, text } = jobProgress(job);
  const p = job.progress || {};
  const facts = [
    ["Status", statusBadge(job.status)],
    ["Type", job.type],
    ["Model", modelCell(job.model)],
    ["Created", timeEl(job.created_at)],
    ["Started", timeEl(job.started_at)],
    ["Finished", timeEl(job.finished_at)],
  ];
  if (job.attempts > 1) facts.push(["Attempts", formatValue(job.attempts)]); // resumed after a lost worker
  const figures = job.type === "generate" ?
    [["Completed", p.completed ?? 0], ["Failed", p.failed ?? 0], ["Total", p.total ?? job.prompt_count ?? "—"]] :
    [["Step", p.total_steps ? `${p.step ?? 0} / ${p.total_steps}` : (p.step ?? 0)],
      ["Training loss", formatNumber(p.loss)], ["Validation loss", formatNumber(p.val_loss)],
      ["Tokens/s", p.tokens_per_second == null ? "—" : formatNumber(Math.round(p.tokens_per_second))],
      ["ETA", isActive(job) ? formatDuration(p.eta_seconds) : "—"]];
  figures.push(["Run time", formatDuration(elapsed(job))]);
  return h("section", { class: "card summary", "data-testid": "job-summary" },
    h("dl", { class: "facts" }, facts.map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value)))),
    h("div", { class: "progress-row", "data-testid": "job-progress" },
      progressBar(fraction, text),
      h("span", { class: "progress-text" }, text)),
    h("dl", { class: "figures" }, figures.map(([term, value]) =>
      h("div", {}, h("dt", {}, term), h("dd", {}, value instanceof Node ? value : String(value))))));
}

/** The error of a failed job, prominent: its code and message. */
export function errorBox(job) {
  if (!job.error) return null;
  return h("section", { class: "notice notice-error job-error", role: "alert", "data-testid": "job-error" },
    h("h2", {}, "The job failed: ", h("code", { "data-testid": "job-error-code" }, job.error.code ?? "error")),
    h("p", { class: "error-message", "data-testid": "job-error-message" }, job.error.message ?? ""));
}

/** Why a training job stopped (result.stop_reason), in words. */
const STOP_REASONS = {
  max_steps: "ran all its steps",
  early_stopping: "stopped early: the validation loss had stopped improving",
};

/** A result value, with words where a bare value says little (the step the model is from, why it stopped). */
function resultValue(job, key, value) {
  if (key === "model") return modelCell(value);
  if (key === "model_step" && typeof value === "number") {
    const chosen = job.hyperparameters?.select_model === "best" ? " (the best validation loss)" : "";
    return `${formatExact(value)}${chosen}`;
  }
  if (key === "stop_reason" && STOP_REASONS[value]) return `${value} (${STOP_REASONS[value]})`;
  return formatValue(value);
}

/** What a finished job produced (result), with the model linked; for training, the model's step and why it stopped. */
export function resultBox(job) {
  if (!job.result || typeof job.result !== "object") return null;
  const rows = Object.entries(job.result).map(([key, value]) => [key, resultValue(job, key, value)]);
  return h("section", { class: "card" }, h("h2", {}, "Result"), keyValueTable(rows, { "data-testid": "job-result" }));
}

/**
 * The resolved parameters (model, hyperparameters or sampling, seed, files, metadata) as one table, each value
 * exactly as the API gave it (formatExact: a seed shows every digit, without separators, ready to be copied).
 * Hyperparameters given as "auto" show the value the worker chose, marked: "batch_size 16 (auto)" (their names are
 * in hyperparameters.auto, which is not shown as a row of its own).
 */
export function parametersTable(job) {
  const rows = [];
  for (const [key, value] of Object.entries(job)) {
    if (SUMMARY_KEYS.has(key)) continue;
    if (key === "model") rows.push([key, modelCell(value)]);
    else if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
      const auto = key === "hyperparameters" && Array.isArray(value.auto) ? value.auto : null;
      for (const [sub, subValue] of Object.entries(value)) {
        if (auto && sub === "auto") continue;
        const chosen = auto?.includes(sub) && subValue !== "auto";
        rows.push([`${key}.${sub}`, chosen ? `${formatExact(subValue)} (auto)` : formatExact(subValue)]);
      }
    } else rows.push([key, formatExact(value)]);
  }
  return keyValueTable(rows, { "data-testid": "job-parameters" });
}

/** The cell of a checkpoint registered as a model: the model, linked to the models page, and its name. */
export function registeredModel(model) {
  return h("span", { class: "registered-model", "data-testid": "registered-model", "data-model-id": model.id },
    link("/models", h("code", {}, model.id)), " ", h("span", { class: "muted small" }, longText(model.name)));
}

/**
 * A training job's checkpoints, by step, with the validation metrics of evaluation steps. With `onRegister`
 * (checkpoint, button, cell) each row has a "Register as model" button; `registered` (checkpoint id -> model)
 * shows the models already made from checkpoints instead.
 */
export function checkpointsTable(checkpoints, { registered = new Map(), onRegister = null } = {}) {
  if (!checkpoints.length) return h("p", { class: "muted" }, "No checkpoints.");
  const headers = ["Step", "Training loss", "Validation loss", "Perplexity", "Accuracy", "Size", "Saved"];
  const modelCell = (c) => {
    if (registered.has(c.id)) return registeredModel(registered.get(c.id));
    if (!onRegister) return null;
    const cell = h("span", {});
    const button = h("button", { type: "button", class: "button secondary small",
      "data-testid": "register-checkpoint", title: `Register the checkpoint of step ${c.step} as a model` },
    "Register as model");
    button.addEventListener("click", () => onRegister(c, button, cell));
    cell.append(button);
    return cell;
  };
  return dataTable(onRegister || registered.size ? [...headers, "Model"] : headers,
    checkpoints.map((c) => {
      const cells = [formatNumber(c.step), formatNumber(c.train_loss), formatNumber(c.val_loss),
        formatNumber(c.val_perplexity), formatPercent(c.val_accuracy), formatBytes(c.bytes), timeEl(c.created_at)];
      if (onRegister || registered.size) cells.push(modelCell(c) ?? "—");
      return row(cells, { "data-checkpoint-id": c.id });
    }), { "data-testid": "job-checkpoints" });
}

function completionsCell(result) {
  if (result.error) {
    return h("span", { class: "error-text" }, `${result.error.code ?? "error"}: ${result.error.message ?? ""}`);
  }
  return h("div", {}, (result.completions || []).map((c) => h("pre", { class: "text" }, c.text ?? "")));
}

/** Why a generate job has no results, by its status. */
function noResults(job) {
  switch (job?.status) {
    case "failed": return "No results: the job failed before any prompt finished.";
    case "cancelled": return "No results: the job was cancelled before any prompt finished.";
    case "succeeded": return "No results.";
    case "paused": return "No results yet: the job is paused (resume it to go on).";
    default: return "No results yet."; // queued, running, cancelling (or not known): some may still come
  }
}

/** The first results of a generate job (`job`: the job, to say why there are none). */
export function resultsTable(results, job) {
  if (!results.length) return h("p", { class: "muted", "data-testid": "no-results" }, noResults(job));
  return dataTable(["#", "custom_id", "Prompt", "Completion"],
    results.map((r) => h("tr", {},
      h("td", {}, String(r.index)),
      h("td", {}, longText(r.custom_id)),
      h("td", {}, h("pre", { class: "text" }, r.prompt ?? "")),
      h("td", {}, completionsCell(r)))), { class: "data results", "data-testid": "job-results" });
}

/** One event as a list item (metrics events are marked, so the list can hide them). */
export function eventItem(event) {
  return h("li", { class: `event level-${event.level} type-${event.type}`, "data-event-id": event.id },
    h("span", { class: "event-time" }, timeEl(event.created_at)),
    h("span", { class: `event-level level-${event.level}` }, event.level),
    h("span", { class: "event-message" }, event.message));
}

/** The samples of one `samples` event: each prompt and the text the model wrote after it. */
export function sampleBlock(event) {
  const step = event.data?.step;
  return h("div", { class: "sample-group" },
    h("h3", {}, step == null ? "Samples" : `Step ${step}`),
    (event.data?.samples || []).map((s) => h("div", { class: "sample" },
      s.prompt ? h("pre", { class: "text sample-prompt" }, s.prompt) : null,
      h("pre", { class: "text sample-text" }, s.text ?? ""))));
}
