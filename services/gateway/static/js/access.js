// Users and API keys: create, disable, revoke.
import { api, current, get } from "./api.js";
import { badge, errorBox, h, section, table, toast, when } from "./ui.js";

const ROLES = ["viewer", "developer", "service", "admin"];

function roleSelect(name, selected, testid) {
  return h("select", { name, testid }, ROLES.map((r) => h("option", { value: r, selected: r === selected }, r)));
}

export async function mount(root) {
  const users = h("div", { testid: "users" });
  const keys = h("div", { testid: "keys" });
  const created = h("div", { testid: "new-key" });

  async function loadUsers() {
    try {
      const list = await get("/admin/users?limit=500");
      users.replaceChildren(table(["email", "role", "status", "created", ""], list.map((u) => h("tr", { "data-user": u.email },
        h("td", {}, u.email), h("td", {}, u.role), h("td", {}, badge(u.disabled ? "disabled" : "active")), h("td", {}, when(u.created_at)),
        h("td", {}, u.disabled || u.email === current()?.email ? null : h("button", { type: "button", class: "small", testid: "disable-user", onclick: async () => {
          try {
            await api("POST", `/admin/users/${encodeURIComponent(u.id)}/disable`);
            toast(`${u.email} disabled`);
          } catch (err) { toast(err.message, "bad"); }
          loadUsers();
        } }, "Disable"))))));
    } catch (err) {
      users.replaceChildren(errorBox(err));
    }
  }

  async function loadKeys() {
    try {
      const list = await get("/admin/api-keys");
      keys.replaceChildren(table(["name", "prefix", "role", "scopes", "created", "last used", "status", ""], list.map((k) => h("tr", { "data-key": k.id, "data-name": k.name },
        h("td", {}, k.name), h("td", {}, h("code", {}, k.prefix)), h("td", {}, k.role), h("td", {}, k.scopes.join(" ")),
        h("td", {}, when(k.created_at)), h("td", {}, when(k.last_used_at)),
        h("td", {}, badge(k.revoked_at ? "revoked" : k.expires_at && new Date(k.expires_at) < new Date() ? "expired" : "active")),
        h("td", {}, k.revoked_at ? null : h("button", { type: "button", class: "small danger", testid: "revoke", onclick: async (ev) => {
          const b = ev.currentTarget;
          if (b.dataset.confirm !== "1") { // two clicks: no modal dialog
            b.dataset.confirm = "1";
            b.textContent = "Confirm revoke";
            return;
          }
          try {
            await api("DELETE", `/admin/api-keys/${encodeURIComponent(k.id)}`);
            toast(`key ${k.name} revoked`);
          } catch (err) { toast(err.message, "bad"); }
          loadKeys();
        } }, "Revoke"))))));
    } catch (err) {
      keys.replaceChildren(errorBox(err));
    }
  }

  const userForm = h("form", { class: "editor", testid: "user-form", onsubmit: async (ev) => {
    ev.preventDefault();
    const f = ev.target.elements;
    try {
      const u = await api("POST", "/admin/users", { json: { email: f.email.value, password: f.password.value, role: f.role.value } });
      toast(`${u.email} created`);
      ev.target.reset();
      loadUsers();
    } catch (err) { toast(err.message, "bad"); }
  } }, h("div", { class: "row" },
    h("input", { name: "email", type: "email", placeholder: "email", required: true }),
    h("input", { name: "password", type: "password", placeholder: "password (8+ characters)", minlength: 8, required: true, autocomplete: "new-password" }),
    roleSelect("role", "viewer"),
    h("button", { type: "submit", class: "primary" }, "Create user")));

  const keyForm = h("form", { class: "editor", testid: "key-form", onsubmit: async (ev) => {
    ev.preventDefault();
    const f = ev.target.elements;
    const body = { name: f.name.value, role: f.role.value };
    if (f.scopes.value.trim()) body.scopes = f.scopes.value.trim().split(/[\s,]+/);
    if (f.rpm.value) body.rate_limit_rpm = Number(f.rpm.value);
    try {
      const k = await api("POST", "/admin/api-keys", { json: body });
      created.replaceChildren(h("div", { class: "secret" }, h("p", {}, `API key "${k.name}" (shown once; store it now):`),
        h("code", { testid: "new-key-value" }, k.key)));
      ev.target.reset();
      loadKeys();
    } catch (err) { toast(err.message, "bad"); }
  } }, h("div", { class: "row" },
    h("input", { name: "name", placeholder: "key name", required: true, testid: "key-name" }),
    roleSelect("role", "service", "key-role"),
    h("input", { name: "scopes", placeholder: "scopes (default: the role's)", testid: "key-scopes" }),
    h("input", { name: "rpm", type: "number", min: 1, placeholder: "req/min limit" }),
    h("button", { type: "submit", class: "primary", testid: "create-key" }, "Create API key")));

  root.replaceChildren(section("API keys", keyForm, created, keys), section("Users", userForm, users));
  await Promise.all([loadUsers(), loadKeys()]);
  return {};
}
