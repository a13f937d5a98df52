// The service's API as the page uses it: JSON requests with the session cookie, the login
// that exchanges a token for that cookie, and the event stream.

export const CSRF_HEADER = "X-Vmferry-Csrf";
export const EVENT_KINDS = ["hello", "job", "plan", "progress", "dropped"];

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function answer(response) {
  const type = response.headers.get("Content-Type") || "";
  const data = type.startsWith("application/json") ? await response.json() : null;
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || "http", error.message || response.statusText);
  }
  return data;
}

/** A request with the session cookie; one that changes something carries the CSRF header
 * the service asks of cookie sessions. */
export async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers[CSRF_HEADER] = "1";
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  return answer(await fetch(path, init));
}

/** Exchange a token for the session cookie (the token is not kept by the page). */
export async function login(token) {
  let response;
  try {
    response = await fetch("/api/v1/session", {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch (err) {
    throw new ApiError(0, "invalid", `that is not a token (${err.message})`);
  }
  return answer(response);
}

export const logout = () => request("DELETE", "/api/v1/session");
export const whoami = () => request("GET", "/api/v1/whoami");

/** Watch the event stream: `onEvent(kind, data)` per event, `onState(text)` when the
 * connection opens, drops (the browser reconnects by itself) or closes for good. */
export function watch(onEvent, onState) {
  const source = new EventSource("/api/v1/events");
  for (const kind of EVENT_KINDS) {
    source.addEventListener(kind, (event) => onEvent(kind, JSON.parse(event.data)));
  }
  source.onopen = () => onState("live");
  source.onerror = () => {
    onState(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  };
  return source;
}
