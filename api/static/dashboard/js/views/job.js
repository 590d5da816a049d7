// /jobs/<job id>: one job, kept live while it runs; Pause, Resume and Cancel, as its status allows.
//
// A finished or paused job is read once from the JSON routes (a paused one is followed again once it is resumed
// here; following stops when it becomes paused, since it waits for a person). An active one is followed through
// its event stream
// (GET /v1/jobs/{id}/events with Accept: text/event-stream, read by sse.js): each job event is appended to the
// list, each `event: job` message (a change of status or progress) updates the header and fetches the new
// metrics rows (`/metrics?after=<last step plotted>`), and `event: end` brings the final state. A stream the server
// closes without `end` is reopened with Last-Event-ID. When the server answers 503 too_many_streams, or anything
// other than an event stream, the page polls the JSON routes instead, every POLL_MS.

import { ApiError, authHeaders, errorFrom, getAll, getList, isAbort, request, toJson } from "../api.js";
import { TrainingChart } from "../chart.js";
import { append, h, isActive, jobActions, notice, replace } from "../dom.js";
import { readJobStream } from "../sse.js";
import {
  checkpointsTable, errorBox, eventItem, parametersTable, registeredModel, resultBox, resultsTable, sampleBlock,
  summary,
} from "./job-parts.js";

const POLL_MS = 2000;
const REFRESH_MS = 3000; // checkpoints and results: at most this often while the job runs
const RESULTS_PREVIEW = 20;

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

/**
 * fn, made safe to call often: calls while it runs are folded into one more run after it, and runs start at
 * least `interval` ms apart (a trailing call is scheduled).
 */
function coalesced(fn, interval = 0) {
  let running = null;
  let again = false;
  let lastStart = 0;
  let timer = null;
  const run = async () => {
    do {
      again = false;
      const wait = lastStart + interval - Date.now();
      if (wait > 0) await new Promise((resolve) => { timer = setTimeout(resolve, wait); });
      lastStart = Date.now();
      await fn();
    } while (again);
  };
  const call = () => {
    if (running) {
      again = true;
      return running;
    }
    running = run().finally(() => { running = null; });
    return running;
  };
  call.cancel = () => clearTimeout(timer);
  return call;
}

function section(title, testid, ...children) {
  return h("section", { class: "card", "data-testid": testid }, h("h2", {}, title), ...children);
}

export async function renderJob(main, ctx) {
  const jobId = ctx.params[0];
  const base = `/jobs/${encodeURIComponent(jobId)}`;
  const { signal } = ctx;
  document.title = `${jobId} · gpt2-jobs`;

  let job;
  try {
    job = await request(base, { signal });
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 404) {
      main.append(h("h1", {}, "Job not found"), notice("error", exc.message), h("p", {}, h("a", { href: "/jobs",
        "data-link": true }, "All jobs")));
      return;
    }
    throw exc;
  }
  const training = job.type !== "generate";

  // Layout: header, error, what it produces (chart or results), samples, checkpoints, events, parameters.
  const title = h("h1", {}, "Job ", h("code", {}, job.id));
  const pause = h("button", { type: "button", class: "button secondary", "data-testid": "pause-job",
    title: "A running job stops at its next checkpoint (or once the prompts in progress are done)" }, "Pause");
  const resume = h("button", { type: "button", class: "button", "data-testid": "resume-job",
    title: "Queue the job again: it continues from where it paused" }, "Resume");
  const cancel = h("button", { type: "button", class: "button danger", "data-testid": "cancel-job" }, "Cancel job");
  const liveNote = h("span", { class: "muted small live-note", "aria-live": "polite", "data-testid": "live-mode" });
  const problems = h("div", {});
  const summarySlot = h("div", {});
  const errorSlot = h("div", {});
  const resultSlot = h("div", {});
  const chart = training ? new TrainingChart() : null;
  const metricsNote = h("p", { class: "muted small" });
  const samples = h("div", { class: "samples", "data-testid": "job-samples" });
  const samplesSection = section("Samples", "samples-section", samples);
  samplesSection.hidden = true;
  const checkpoints = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const results = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const resultsTitle = h("h2", {}, "Results");
  const download = h("button", { type: "button", class: "button secondary" }, "Download results.jsonl");
  const events = h("ol", { class: "events hide-metrics", "data-testid": "job-events" });
  const showMetrics = h("input", { type: "checkbox", id: "show-metrics" });
  showMetrics.addEventListener("change", () => {
    const stick = nearBottom(events);
    events.classList.toggle("hide-metrics", !showMetrics.checked);
    if (stick) events.scrollTop = events.scrollHeight;
  });
  const parameters = h("div", {});

  append(main, [
    h("div", { class: "page-head" }, title, liveNote, h("div", { class: "page-actions" }, pause, resume, cancel)),
    h("p", { class: "breadcrumbs" }, h("a", { href: "/jobs", "data-link": true }, "← All jobs")),
    problems, summarySlot, errorSlot,
    training ? section("Loss", "chart-section", chart.element, metricsNote,
      h("p", { class: "muted small" }, "Training loss per step (line), validation loss per evaluation (points); " +
        "the learning rate below. Drag to zoom, double-click to reset.")) : null,
    training ? null : h("section", { class: "card", "data-testid": "results-section" },
      h("div", { class: "section-head" }, resultsTitle, download), results),
    resultSlot,
    training ? samplesSection : null,
    training ? section("Checkpoints", "checkpoints-section", checkpoints) : null,
    h("section", { class: "card", "data-testid": "events-section" },
      h("div", { class: "section-head" }, h("h2", {}, "Events"),
        h("label", { class: "small" }, showMetrics, " show metrics events")),
      events),
    section("Parameters", "parameters-section", parameters)]);
  if (chart) ctx.onLeave(() => chart.destroy());

  // --- state shown on the page ---------------------------------------------------------------------------------

  let lastEventId = null;

  const showJob = (next) => {
    job = next;
    replace(summarySlot, summary(job));
    replace(errorSlot, errorBox(job));
    replace(resultSlot, resultBox(job));
    replace(parameters, parametersTable(job));
    const actions = jobActions(job);
    pause.hidden = !actions.pause;
    resume.hidden = !actions.resume;
    cancel.hidden = !actions.cancel;
  };

  const addEvents = (list) => {
    const fresh = list.filter((e) => lastEventId === null || e.id > lastEventId);
    if (!fresh.length) return;
    events.querySelector(".no-events")?.remove();
    const stick = nearBottom(events) || lastEventId === null;
    for (const event of fresh) {
      events.append(eventItem(event));
      if (Array.isArray(event.data?.samples) && event.data.samples.length) {
        samples.append(sampleBlock(event));
        samplesSection.hidden = false;
      }
    }
    lastEventId = fresh[fresh.length - 1].id;
    if (stick) events.scrollTop = events.scrollHeight;
  };

  const showProblem = (exc) => {
    if (isAbort(exc)) return;
    replace(problems, notice("warning", exc instanceof ApiError ? exc.message : String(exc)));
  };

  const refreshMetrics = coalesced(async () => {
    if (!chart) return;
    try {
      const rows = await getAll(`${base}/metrics`, { query: { after: chart.lastStep }, cursor: (r) => r.step, signal });
      chart.add(rows);
      metricsNote.textContent = "";
    } catch (exc) {
      if (isAbort(exc)) return;
      metricsNote.textContent = `Metrics unavailable: ${exc.message}`;
    }
  });

  // Checkpoints registered as models from this page (checkpoint id -> model): kept across the table's refreshes.
  const registered = new Map();
  const register = async (checkpoint, button, cell) => {
    button.disabled = true;
    button.textContent = "Registering…";
    try {
      const model = await request(`${base}/checkpoints/${encodeURIComponent(checkpoint.id)}/model`,
        { method: "POST", signal });
      registered.set(checkpoint.id, model);
      replace(cell, registeredModel(model));
      replace(problems);
    } catch (exc) {
      button.disabled = false;
      button.textContent = "Register as model";
      showProblem(exc);
    }
  };

  const refreshCheckpoints = coalesced(async () => {
    if (!training) return;
    try {
      const list = (await getList(`${base}/checkpoints`, {}, { signal })).data;
      replace(checkpoints, checkpointsTable(list, { registered, onRegister: register }));
    } catch (exc) {
      showProblem(exc);
    }
  }, REFRESH_MS);

  const refreshResults = coalesced(async () => {
    if (training) return;
    try {
      const page = await getList(`${base}/results`, { limit: RESULTS_PREVIEW }, { signal });
      const total = job.progress?.total ?? job.prompt_count;
      resultsTitle.textContent = page.has_more ? `Results (the first ${page.data.length} of ${total ?? "more"})` :
        "Results";
      replace(results, resultsTable(page.data, job));
    } catch (exc) {
      showProblem(exc);
    }
  }, REFRESH_MS);
  ctx.onLeave(() => { refreshCheckpoints.cancel(); refreshResults.cancel(); });

  const refreshAll = () => Promise.all([refreshMetrics(), refreshCheckpoints(), refreshResults()]);

  const onJob = (next) => {
    const before = job;
    showJob(next);
    const p = next.progress || {};
    if (training && p.step && p.step !== chart.lastStep) refreshMetrics();
    if (!training && toJson(p) !== toJson(before.progress)) refreshResults();
    if (training && next.status !== before.status) refreshCheckpoints();
  };

  // --- live following ------------------------------------------------------------------------------------------

  const poll = async () => {
    liveNote.textContent = "live (polling)";
    liveNote.dataset.mode = "polling";
    while (ctx.isCurrent()) {
      try {
        onJob(await request(base, { signal }));
        addEvents(await getAll(`${base}/events`, { query: { after: lastEventId, limit: 100 }, signal }));
        replace(problems);
        if (!isActive(job)) break;
        if (training) refreshCheckpoints();
      } catch (exc) {
        if (isAbort(exc)) return;
        showProblem(exc);
        if (exc instanceof ApiError && exc.status >= 400 && exc.status < 500) return; // refused: polling won't help
      }
      await sleep(POLL_MS, signal);
    }
  };

  // The events and state the stream had not sent yet (a job that was paused: no more will come).
  const catchUp = async () => {
    onJob(await request(base, { signal }));
    addEvents(await getAll(`${base}/events`, { query: { after: lastEventId, limit: 100 }, signal }));
  };

  const follow = async () => {
    liveNote.textContent = "live";
    liveNote.dataset.mode = "stream";
    // The server keeps a paused job's stream open, but a paused job waits for a person: the page closes its
    // stream (`stop`) when the job is paused, reads what the stream had not sent yet, and stops following.
    const stop = new AbortController();
    const stopWithPage = () => stop.abort();
    signal.addEventListener("abort", stopWithPage, { once: true });
    const onStreamJob = (next) => {
      onJob(next);
      if (next.status === "paused") stop.abort();
    };
    const handlers = { onEvent: (event) => addEvents([event]), onJob: onStreamJob, onEnd: onJob };
    let failures = 0;
    try {
      while (ctx.isCurrent()) {
        let outcome;
        try {
          outcome = await readJobStream(job.id, { lastEventId, signal: stop.signal, handlers });
        } catch (exc) {
          if (isAbort(exc)) break;
          if (exc instanceof ApiError && exc.status > 0 && exc.status < 500) throw exc; // refused: show it
          failures += 1; // a dropped connection, a restarting server: try again, then poll
          if (failures > 3) {
            await poll();
            break;
          }
          await sleep(1000 * failures, signal);
          continue;
        }
        if (outcome.outcome === "end" || stop.signal.aborted) break;
        if (outcome.outcome === "closed") {
          failures = 0;
          await sleep(Math.min(outcome.retry ?? 1000, 5000), signal);
          continue;
        }
        await poll(); // "busy" or "unsupported"
        break;
      }
      if (stop.signal.aborted && !signal.aborted) await catchUp(); // paused
    } finally {
      signal.removeEventListener("abort", stopWithPage);
    }
  };

  // Follow the job while it is active (again after a Resume on this page), then read its final state.
  let following = false;
  let followAgain = false;
  const live = async () => {
    if (following) {
      followAgain = true; // resumed while the follower was stopping: it goes on
      return;
    }
    following = true;
    refreshAll();
    try {
      for (;;) {
        followAgain = false;
        await follow();
        if (!followAgain || !ctx.isCurrent()) break;
        onJob(await request(base, { signal }));
        if (!isActive(job)) break;
      }
    } catch (exc) {
      showProblem(exc);
    } finally {
      following = false;
    }
    if (!ctx.isCurrent()) return;
    liveNote.textContent = ""; // data-mode stays: how the page followed the job
    await refreshAll();
  };

  // POST an action (pause, resume, cancel) and show the job it answers with.
  const act = async (action, button) => {
    button.disabled = true;
    try {
      onJob(await request(`${base}/${action}`, { method: "POST", signal }));
      replace(problems);
      return true;
    } catch (exc) {
      showProblem(exc);
      return false;
    } finally {
      button.disabled = false;
    }
  };

  download.addEventListener("click", () => downloadResults(job.id).catch(showProblem));
  pause.addEventListener("click", () => act("pause", pause));
  resume.addEventListener("click", async () => {
    if (await act("resume", resume) && isActive(job)) live();
  });
  cancel.addEventListener("click", async () => {
    if (!window.confirm(`Cancel ${job.id}?`)) return;
    await act("cancel", cancel);
  });

  showJob(job);
  if (!isActive(job)) {
    const [list] = await Promise.all([getAll(`${base}/events`, { query: { limit: 100 }, signal }), refreshAll()]);
    addEvents(list);
    if (!events.children.length) events.append(h("li", { class: "muted no-events" }, "No events."));
    return;
  }
  await live();
}

function nearBottom(el) {
  return el.scrollTop + el.clientHeight >= el.scrollHeight - 24;
}

/** Save results.jsonl: fetched with the key (a plain link could not send it), then handed to the browser. */
async function downloadResults(jobId) {
  const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/results.jsonl`, { headers: authHeaders() });
  if (!response.ok) throw await errorFrom(response);
  const href = URL.createObjectURL(await response.blob());
  const a = h("a", { href, download: `${jobId}-results.jsonl` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10000);
}
