// /files: the caller's uploaded files, newest first (purpose filter kept in the address: /files?purpose=train).

import { getList } from "../api.js";
import { dataTable, formatBytes, formatNumber, h, longText, notice, replace, row, timeEl } from "../dom.js";

const PURPOSES = ["train", "generate"];
const PAGE_SIZE = 50;

export async function renderFiles(main, ctx) {
  document.title = "Files · gpt2-jobs";
  const purpose = PURPOSES.includes(ctx.query.get("purpose")) ? ctx.query.get("purpose") : "";
  const select = h("select", { id: "filter-purpose", "data-testid": "filter-purpose" },
    h("option", { value: "" }, "any purpose"),
    PURPOSES.map((p) => h("option", { value: p, selected: p === purpose }, p)));
  select.addEventListener("change", () => ctx.navigate(select.value ? `/files?purpose=${select.value}` : "/files"));

  const table = dataTable(["File", "Name", "Purpose", "Size", "Records", "Tokens", "SHA-256", "Uploaded"], [],
    { "data-testid": "files-table" });
  const body = table.tBodies[0];
  const message = h("div", {});
  const more = h("button", { type: "button", class: "button secondary", hidden: true }, "Load more");
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Files")),
    h("p", { class: "muted" }, "Upload files with POST /v1/files (or gpt2jobs files upload)."),
    h("div", { class: "filters" }, h("label", { class: "filter" }, "Purpose ", select)),
    message, table, more);

  const fileRow = (f) => row([h("code", {}, f.id), longText(f.filename), f.purpose, formatBytes(f.bytes),
    formatNumber(f.records), formatNumber(f.tokens), h("code", { title: f.sha256 }, `${f.sha256.slice(0, 12)}…`),
    timeEl(f.created_at)], { "data-file-id": f.id });

  let after = null;
  const load = async () => {
    more.disabled = true;
    try {
      const page = await getList("/files", { purpose, limit: PAGE_SIZE, after }, { signal: ctx.signal });
      body.append(...page.data.map(fileRow));
      if (after === null && page.data.length === 0) {
        body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No files.")));
      }
      after = page.last_id ?? after;
      more.hidden = !page.has_more;
    } catch (exc) {
      if (exc.name !== "AbortError") replace(message, notice("error", exc.message));
    } finally {
      more.disabled = false;
    }
  };
  more.addEventListener("click", load);
  await load();
}
