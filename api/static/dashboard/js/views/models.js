// /models: the caller's registered models (imported, produced by train and finetune jobs, or a job's checkpoint
// registered as a model), newest first.

import { dataTable, formatNumber, h, link, longText, row, timeEl } from "../dom.js";
import { pagedList } from "./paged.js";

const PAGE_SIZE = 50;

function shape(config) {
  if (!config) return "—";
  const parts = ["n_layer", "n_head", "n_embd", "n_positions"].filter((k) => config[k] !== undefined)
    .map((k) => `${k}\u00a0${config[k]}`); // a no-break space: "n_embd 384" stays on one line
  return parts.join(" · ") || "—";
}

export async function renderModels(main, ctx) {
  document.title = "Models · gpt2-jobs";
  const table = dataTable(["Model", "Name", "Source", "Parameters", "Shape", "Created"], [],
    { "data-testid": "models-table" });
  const message = h("div", {});
  const more = h("button", { type: "button", class: "button secondary", hidden: true }, "Load more");
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Models")),
    h("p", { class: "muted" }, "Models come from train and finetune jobs (any of their checkpoints can be registered " +
      "as a model on the job's page), or are imported with POST /v1/models."),
    message, table, more);

  // Source: "import", or the job that trained the model, linked (one column: the table fits 1280 px with long names);
  // for a checkpoint registered as a model, the job and the checkpoint's step.
  const source = (m) => {
    if (!m.job_id) return m.source;
    const job = link(`/jobs/${encodeURIComponent(m.job_id)}`, h("code", {}, m.job_id));
    return m.checkpoint_step == null ? job :
      h("span", { title: `checkpoint at step ${m.checkpoint_step}` }, job, h("span", { class: "muted small" },
        ` @\u00a0step\u00a0${m.checkpoint_step}`));
  };
  const modelRow = (m) => row([h("code", {}, m.id), longText(m.name), source(m), formatNumber(m.parameter_count),
    shape(m.config), timeEl(m.created_at)], { "data-model-id": m.id });

  await pagedList({ path: "/models", query: {}, pageSize: PAGE_SIZE, table, toRow: modelRow, empty: "No models.",
    message, more, ctx });
}
