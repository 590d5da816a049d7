// /files: the caller's uploaded files, newest first (purpose filter kept in the address: /files?purpose=train).

import { dataTable, formatBytes, formatNumber, h, longText, row, timeEl } from "../dom.js";
import { pagedList } from "./paged.js";

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

  await pagedList({ path: "/files", query: { purpose }, pageSize: PAGE_SIZE, table, toRow: fileRow, empty: "No files.",
    message, more, ctx });
}
