// The REST API as the dashboard uses it: the key kept in this tab's sessionStorage, JSON requests with
// `Authorization: Bearer <key>`, the API's JSON errors as ApiError, and paging through lists.

const KEY_STORAGE = "gpt2jobs.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** An error answer of the API ({"error": {"code", "message", "param"}}), or a request that got no answer
 * (status 0, code "network_error"). */
export class ApiError extends Error {
  constructor(status, code, message, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

/**
 * JSON text -> value, keeping integers that a Number cannot hold exactly (beyond Number.MAX_SAFE_INTEGER, such as
 * the seeds the API draws, up to 2**63 - 1) as BigInt with their exact digits instead of rounding them to the
 * nearest double. It reads the number's source text, which JSON.parse gives a reviver as the third argument in
 * current browsers (Chromium 114+, Firefox 135+, Safari 18.4+); without it such numbers stay rounded.
 */
export function parseJson(text) {
  return JSON.parse(text, (_key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value) &&
        typeof context?.source === "string" && /^-?[0-9]+$/.test(context.source)) {
      return BigInt(context.source);
    }
    return value;
  });
}

/** A value -> JSON text, writing BigInt (from parseJson) as the exact number it was. */
export function toJson(value) {
  return JSON.stringify(value, (_key, v) => {
    if (typeof v !== "bigint") return v;
    return typeof JSON.rawJSON === "function" ? JSON.rawJSON(v.toString()) : v.toString();
  });
}

/** The body of a response as JSON, parsed with parseJson. */
export async function readJson(response) {
  return parseJson(await response.text());
}

/** Listeners told when the key is refused (401), so the app can ask for another one. */
const unauthorizedListeners = new Set();

export function onUnauthorized(listener) {
  unauthorizedListeners.add(listener);
}

/** Turn a non-2xx response into an ApiError, reading the API's error object when there is one. */
export async function errorFrom(response) {
  let error = null;
  try {
    error = (await readJson(response)).error;
  } catch {
    // not JSON (a proxy's page, an empty body): fall back on the status line
  }
  const code = error?.code || `http_${response.status}`;
  const message = error?.message || `${response.status} ${response.statusText || "error"}`;
  return new ApiError(response.status, code, message, error?.param ?? null);
}

/** The headers of an authenticated request. */
export function authHeaders(key = getKey(), extra = {}) {
  return { Authorization: `Bearer ${key}`, ...extra };
}

/** Build "/v1/path?name=value" from a path and query values (null and "" are left out). */
export function url(path, query = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") params.set(name, String(value));
  }
  const qs = params.toString();
  return `/v1${path}${qs ? `?${qs}` : ""}`;
}

/**
 * A JSON request to the API. Options: method, query, body (sent as JSON), key (default: the stored key),
 * signal (an AbortSignal). Resolves to the parsed JSON (parseJson: exact big integers); rejects with ApiError.
 */
export async function request(path, { method = "GET", query = {}, body, key, signal } = {}) {
  const headers = authHeaders(key ?? getKey(), { Accept: "application/json" });
  const init = { method, headers, signal, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = toJson(body);
  }
  let response;
  try {
    response = await fetch(url(path, query), init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "network_error", "The API did not answer. Is the server running?");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    // A refused key on a request made with the stored key: the key was revoked (or the database changed).
    if (response.status === 401 && key === undefined) unauthorizedListeners.forEach((listener) => listener(error));
    throw error;
  }
  return readJson(response);
}

/** GET one page of a list: {object: "list", data, has_more, ...}. */
export function getList(path, query = {}, options = {}) {
  return request(path, { ...options, query });
}

/**
 * Every item of a list, following has_more. `cursor(item)` gives the `after` for the next page (default: the
 * item's id); `maxItems` bounds how many are read.
 */
export async function getAll(path, { query = {}, cursor = (item) => item.id, maxItems = 100000, signal } = {}) {
  const items = [];
  let after = query.after ?? null;
  for (;;) {
    const page = await getList(path, { ...query, after }, { signal });
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0 || items.length >= maxItems) return items;
    after = cursor(page.data[page.data.length - 1]);
  }
}

/** True for an aborted fetch (navigation away from a page), which is not an error to show. */
export function isAbort(exc) {
  return exc?.name === "AbortError";
}
