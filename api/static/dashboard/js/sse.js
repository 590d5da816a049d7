// Server-sent events over fetch(). EventSource cannot send an Authorization header, so the dashboard reads
// `GET /v1/jobs/{id}/events` with `Accept: text/event-stream` through a ReadableStream and parses the stream
// itself, following https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation:
// lines end with CRLF, LF or CR; `field: value` lines build a message; a blank line dispatches it; lines that
// start with ":" are comments (the server's keep-alives).

import { authHeaders, errorFrom, parseJson } from "./api.js";

/** Incremental parser: push() decoded text as it arrives; onMessage({type, data, id}) per complete message. */
export class SseParser {
  constructor(onMessage) {
    this.onMessage = onMessage;
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.lastEventId = "";
    this.retry = null;
    this.pendingCR = false; // the last chunk ended with CR: a LF starting the next one belongs to it
  }

  push(text) {
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
    this.pendingCR = false;
    this.buffer += text;
    let start = 0;
    for (let i = 0; i < this.buffer.length; i += 1) {
      const ch = this.buffer[i];
      if (ch !== "\n" && ch !== "\r") continue;
      this.line(this.buffer.slice(start, i));
      if (ch === "\r") {
        if (i + 1 < this.buffer.length) {
          if (this.buffer[i + 1] === "\n") i += 1;
        } else {
          this.pendingCR = true;
        }
      }
      start = i + 1;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment: keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id") {
      if (!value.includes("\0")) this.lastEventId = value;
    } else if (field === "retry") {
      if (/^[0-9]+$/.test(value)) this.retry = Number(value);
    }
  }

  dispatch() {
    const type = this.type || "message";
    this.type = "";
    if (this.data.length === 0) return;
    const data = this.data.join("\n");
    this.data = [];
    this.onMessage({ type, data, id: this.lastEventId });
  }
}

/**
 * Read one job's event stream until the server closes it.
 *
 * Resolves to what happened:
 *   {outcome: "end"}                  the server sent `event: end` (the job has finished);
 *   {outcome: "closed", lastEventId}  the stream ended without it (the server's time limit, a restart): reconnect
 *                                     with Last-Event-ID;
 *   {outcome: "busy", retryAfter}     503 too_many_streams: poll instead;
 *   {outcome: "unsupported"}          the answer is not an event stream (a server without streams): poll instead.
 * Rejects with ApiError for other error answers, and with AbortError when `signal` aborts.
 *
 * handlers: {onEvent(event), onJob(job), onEnd(job)}; the data of each message is parsed as JSON by parseJson
 * (integers beyond Number.MAX_SAFE_INTEGER as exact BigInt), as the JSON routes' answers are.
 */
export async function readJobStream(jobId, { lastEventId = null, signal, handlers }) {
  const headers = authHeaders(undefined, { Accept: "text/event-stream" });
  if (lastEventId !== null && lastEventId !== "") headers["Last-Event-ID"] = String(lastEventId);
  const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal, cache: "no-store" });
  if (response.status === 503) {
    const error = await errorFrom(response);
    if (error.code === "too_many_streams") {
      return { outcome: "busy", retryAfter: Number(response.headers.get("Retry-After")) || 5 };
    }
    throw error;
  }
  if (!response.ok) throw await errorFrom(response);
  const contentType = response.headers.get("Content-Type") || "";
  if (!contentType.startsWith("text/event-stream") || !response.body) {
    response.body?.cancel().catch(() => {});
    return { outcome: "unsupported" };
  }

  let ended = false;
  let seen = lastEventId;
  const parser = new SseParser(({ type, data, id }) => {
    if (id) seen = id;
    let value;
    try {
      value = parseJson(data); // big integers (seeds) keep their exact digits
    } catch {
      return; // not ours to show
    }
    if (type === "message") handlers.onEvent?.(value);
    else if (type === "job") handlers.onJob?.(value);
    else if (type === "end") {
      ended = true;
      handlers.onEnd?.(value);
    }
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(decoder.decode(value, { stream: true }));
      if (ended) break;
    }
    parser.push(decoder.decode());
  } finally {
    reader.cancel().catch(() => {});
  }
  return ended ? { outcome: "end" } : { outcome: "closed", lastEventId: seen, retry: parser.retry };
}
