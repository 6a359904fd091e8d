// The gateway's API with the signed-in operator's bearer token. The session (access and refresh
// token) lives in sessionStorage: it ends with the tab, and no cookie is ever sent.
const KEY = "aistack.admin.session";

export class ApiError extends Error {
  constructor(status, body) {
    const err = body && body.error;
    super((err && (err.message || err.code)) || (typeof err === "string" ? err : `HTTP ${status}`));
    this.status = status;
    this.code = err && err.code;
    this.details = err && err.details;
  }
}

let session = load();
let refreshing = null;

function load() {
  try {
    return JSON.parse(sessionStorage.getItem(KEY) || "null");
  } catch {
    return null;
  }
}

function save(s) {
  session = s;
  if (s) sessionStorage.setItem(KEY, JSON.stringify(s));
  else sessionStorage.removeItem(KEY);
}

export function current() {
  return session;
}

async function body(r) {
  const text = await r.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return text;
  }
}

export async function signIn(email, password) {
  const r = await fetch("/v1/auth/token", {
    method: "POST",
    body: new URLSearchParams({ grant_type: "password", username: email, password }),
  });
  const doc = await body(r);
  if (!r.ok) throw new ApiError(r.status, doc);
  const scopes = (doc.scope || "").split(" ");
  if (!scopes.includes("admin")) throw new Error("this account has no admin scope");
  save({ access: doc.access_token, refresh: doc.refresh_token, email, scopes });
  return session;
}

export async function signOut() {
  const s = session;
  save(null);
  if (s && s.refresh) {
    try {
      await fetch("/v1/auth/logout", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ refresh_token: s.refresh }),
      });
    } catch { /* signed out here either way */ }
  }
  window.dispatchEvent(new Event("aistack:signed-out"));
}

// One refresh at a time: a refresh token is spent when used, and reusing one revokes the session.
async function refresh() {
  if (!session || !session.refresh) return false;
  if (!refreshing) {
    const spent = session.refresh;
    refreshing = (async () => {
      const r = await fetch("/v1/auth/refresh", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ refresh_token: spent }),
      });
      if (!r.ok) return false;
      const doc = await r.json();
      save({ ...session, access: doc.access_token, refresh: doc.refresh_token });
      return true;
    })().finally(() => { refreshing = null; });
  }
  return refreshing;
}

async function send(method, path, opts) {
  const headers = { accept: "application/json", ...(opts.headers || {}) };
  if (session) headers.authorization = `Bearer ${session.access}`;
  let payload;
  if (opts.json !== undefined) {
    headers["content-type"] = "application/json";
    payload = JSON.stringify(opts.json);
  } else if (opts.form !== undefined) {
    payload = opts.form; // FormData: the browser sets the multipart boundary
  }
  return fetch(path, { method, headers, body: payload });
}

// api("GET", "/admin/overview") -> parsed JSON; throws ApiError on a non-2xx answer.
// {raw: true} returns the Response itself (downloads).
export async function api(method, path, opts = {}) {
  let r = await send(method, path, opts);
  if (r.status === 401 && session) {
    if (await refresh()) r = await send(method, path, opts);
    if (r.status === 401) {
      await signOut();
      throw new ApiError(401, await body(r));
    }
  }
  if (!r.ok) throw new ApiError(r.status, await body(r));
  if (opts.raw) return r;
  return body(r);
}

export const get = (path) => api("GET", path);
