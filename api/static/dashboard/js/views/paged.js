// A list route shown page by page in a table: the first page at once, "Load more" for the next (the /files and
// /models pages).

import { getList } from "../api.js";
import { h, notice, replace } from "../dom.js";

// Fill `table`'s body from GET /v1`path` (`query` plus limit and after), a row per item from `toRow`; `empty`
// when there are none. Errors go into `message`; a page left meanwhile (ctx.signal) stops quietly.
export async function pagedList({ path, query = {}, pageSize, table, toRow, empty, message, more, ctx }) {
  const body = table.tBodies[0];
  const columns = table.tHead ? table.tHead.rows[0].cells.length : 1;
  let after = null;
  const load = async () => {
    more.disabled = true;
    try {
      const page = await getList(path, { ...query, limit: pageSize, after }, { signal: ctx.signal });
      body.append(...page.data.map(toRow));
      if (after === null && page.data.length === 0) {
        body.append(h("tr", {}, h("td", { colspan: columns, class: "muted" }, empty)));
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
