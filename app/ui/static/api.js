// The public API, with the key from sessionStorage in an Authorization header (never in a URL).

const KEY = "tunehouse.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
    this.param = err.param;
    this.details = err.details || [];
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

export async function request(method, path, body, { raw = false } = {}) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  if (!res.ok) {
    let payload = null;
    try { payload = await res.json(); } catch { /* not JSON */ }
    if (res.status === 401) window.dispatchEvent(new CustomEvent("tunehouse:unauthorized"));
    throw new ApiError(res.status, payload);
  }
  return raw ? res : res.json();
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body ?? {});

// Server-sent events over fetch (EventSource cannot send the Authorization header). Calls
// onEvent({id, event, data}) per frame; resumes from the last id when the connection drops.
export function streamEvents(path, onEvent, { signal } = {}) {
  let lastId = null;
  const run = async () => {
    for (let attempt = 0; !signal?.aborted; attempt++) {
      try {
        const extra = { Accept: "text/event-stream" };
        if (lastId) extra["Last-Event-ID"] = lastId;
        const res = await fetch(path, { headers: headers(extra), signal });
        if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const frame = parseFrame(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
            if (!frame) continue;
            if (frame.id) lastId = frame.id;
            onEvent(frame);
            if (frame.event === "end") return;
          }
        }
        attempt = 0;
      } catch (err) {
        if (signal?.aborted) return;
        if (err instanceof ApiError && err.status < 500) throw err;
      }
      await new Promise((r) => setTimeout(r, Math.min(10000, 500 * 2 ** attempt)));
    }
  };
  return run();
}

function parseFrame(text) {
  const frame = { id: null, event: "message", data: "" };
  let seen = false;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "data") frame.data += (frame.data ? "\n" : "") + value;
    else if (field === "id") frame.id = value;
    else if (field === "event") frame.event = value;
    seen = true;
  }
  if (!seen) return null;
  try { frame.data = JSON.parse(frame.data); } catch { /* keep text */ }
  return frame;
}

// A download through fetch (the key stays in a header), handed to the browser as a blob.
export async function download(path, filename) {
  const res = await request("GET", path, undefined, { raw: true });
  if (res.status === 202) return res.json();  // an export still being built
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return null;
}
