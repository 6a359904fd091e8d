// Models: versions with quality per version, the traffic editor (A/B weights, canary, blue/green)
// and the policy history with rollback.
import { api, get } from "./api.js";
import { badge, errorBox, h, num, pct, section, table, toast, when } from "./ui.js";

const enc = encodeURIComponent;

function routesText(routes) {
  const r = Object.entries(routes || {});
  return r.length ? r.map(([v, w]) => `v${v}: ${w}`).join(" · ") : "newest version";
}

function trafficBar(routes, versions) {
  const entries = Object.entries(routes || {}).filter(([, w]) => w > 0);
  const total = entries.reduce((a, [, w]) => a + w, 0);
  if (!total) return h("div", { class: "traffic", testid: "traffic-bar" }, h("div", { class: "seg s1 full" }, `newest (v${versions.at(-1) ?? "?"}) 100%`));
  const bar = h("div", { class: "traffic", testid: "traffic-bar" });
  entries.forEach(([v, w], i) => {
    const seg = h("div", { class: `seg s${(i % 4) + 1}`, "data-version": v }, `v${v} ${Math.round((w / total) * 100)}%`);
    seg.style.flexGrow = String(w);
    bar.append(seg);
  });
  return bar;
}

async function put(model, policy, reason) {
  return api("PUT", `/admin/models/${enc(model)}/policy`, { json: { policy, reason } });
}

function editor(model, versions, policy, reload) {
  const reason = h("input", { name: "reason", placeholder: "reason (kept in the history)", testid: "reason" });
  const apply = async (routes, what) => {
    try {
      await put(model, { ...policy, routes }, reason.value || what);
      toast(`${model}: ${what}`);
      await reload();
    } catch (err) {
      toast(err.message, "bad");
    }
  };

  // A/B weights: one number per version.
  const weights = versions.map((v) => h("label", { class: "weight" }, `v${v} `,
    h("input", { type: "number", min: 0, step: 1, name: `w${v}`, value: policy.routes?.[v] ?? 0, testid: `weight-${v}` })));
  const ab = h("form", { class: "editor", testid: "ab-form", onsubmit: (ev) => {
    ev.preventDefault();
    const routes = {};
    for (const v of versions) {
      const w = Number(ev.target.elements[`w${v}`].value || 0);
      if (w > 0) routes[v] = w;
    }
    if (!Object.keys(routes).length) return toast("give at least one version a weight", "bad");
    apply(routes, `weights ${routesText(routes)}`);
  } }, h("h3", {}, "A/B weights"), h("div", { class: "row" }, weights),
  h("button", { type: "submit", class: "primary", testid: "apply-weights" }, "Apply weights"));

  // Canary: stable + canary version and a percentage.
  const opts = (sel) => versions.map((v) => h("option", { value: v, selected: v === sel }, `v${v}`));
  const newest = versions.at(-1), older = versions.at(-2) ?? versions[0];
  const canary = h("form", { class: "editor", testid: "canary-form", onsubmit: (ev) => {
    ev.preventDefault();
    const f = ev.target.elements;
    const p = Number(f.percent.value);
    if (f.stable.value === f.canary.value) return toast("stable and canary must differ", "bad");
    apply({ [f.stable.value]: 100 - p, [f.canary.value]: p }, `canary v${f.canary.value} at ${p}%`);
  } }, h("h3", {}, "Canary"),
  h("div", { class: "row" },
    h("label", {}, "stable ", h("select", { name: "stable" }, opts(older))),
    h("label", {}, "canary ", h("select", { name: "canary" }, opts(newest))),
    h("label", {}, "percent ", h("input", { type: "number", name: "percent", min: 1, max: 99, value: 5, testid: "canary-percent" }))),
  h("button", { type: "submit", class: "primary", testid: "apply-canary" }, "Start canary"));

  // Blue/green: all traffic to one version.
  const bg = h("div", { class: "editor", testid: "bluegreen" }, h("h3", {}, "Blue/green switch"),
    h("div", { class: "row" }, versions.map((v) => h("button", {
      type: "button", testid: `switch-${v}`,
      class: Object.keys(policy.routes || {}).length === 1 && policy.routes[v] ? "active" : "",
      onclick: () => apply({ [v]: 100 }, `all traffic to v${v}`) }, `All traffic → v${v}`))));

  return h("div", { class: "editors" }, h("div", { class: "row" }, reason), ab, canary, bg);
}

function history(model, records, reload) {
  const rollback = async (to) => {
    try {
      await api("POST", `/admin/models/${enc(model)}/policy/rollback`, { json: to === undefined ? {} : { to } });
      toast(to === undefined ? `${model}: rolled back` : `${model}: restored policy #${to}`);
      await reload();
    } catch (err) {
      toast(err.message, "bad");
    }
  };
  return h("div", {},
    h("button", { type: "button", testid: "rollback", disabled: records.length < 2, onclick: () => rollback() },
      "Roll back to the previous policy"),
    table(["#", "when", "by", "reason", "routes", ""], records.map((r, i) => h("tr", { "data-policy": r.id },
      h("td", {}, r.id), h("td", {}, when(r.created_at)), h("td", {}, h("code", {}, r.author)), h("td", {}, r.reason || ""),
      h("td", {}, routesText(r.policy.routes)),
      h("td", {}, i === 0 ? h("span", { class: "muted" }, "current")
        : h("button", { type: "button", class: "small", onclick: () => rollback(r.id) }, "Restore"))))));
}

function quality(report, versions) {
  const byVersion = Object.fromEntries((report?.versions || []).map((q) => [String(q.version), q]));
  const rows = versions.map((v) => {
    const q = byVersion[v];
    return h("tr", { "data-version": v }, h("td", {}, `v${v}`),
      h("td", {}, q ? q.n : 0), h("td", {}, q ? pct(q.accuracy) : "–"), h("td", {}, q ? num(q.precision, "", 3) : "–"),
      h("td", {}, q ? num(q.recall, "", 3) : "–"), h("td", {}, q ? num(q.f1, "", 3) : "–"),
      h("td", {}, q ? num(q.roc_auc, "", 3) : "–"), h("td", {}, q ? when(q.computed_at) : "no labels yet"));
  });
  const ab = report?.ab;
  return h("div", {}, table(["version", "labelled", "accuracy", "precision", "recall", "F1", "ROC AUC", "computed"], rows,
    { testid: "quality" }),
  ab ? h("p", { class: "muted" }, `A/B verdict: ${ab.verdict}${ab.winner ? ` (winner v${ab.winner}, p=${num(ab.p_value, "", 4)})` : ""}`) : null);
}

async function modelView(root, name, all) {
  const model = all.find((m) => m.name === name);
  if (!model) throw new Error(`no model '${name}'`);
  const versions = model.versions.map((v) => v.version);
  const [pol, hist, qual] = await Promise.allSettled([
    get(`/admin/models/${enc(name)}/policy`), get(`/admin/models/${enc(name)}/policy/history`),
    get(`/admin/models/${enc(name)}/quality`)]);
  const policy = pol.status === "fulfilled" ? pol.value.policy : { routes: {} };
  const reload = () => modelView(root, name, all);
  root.replaceChildren(
    h("div", { class: "tabs" }, all.map((m) => h("a", { href: `#/models/${enc(m.name)}`, class: m.name === name ? "active" : "" }, m.name))),
    section(`${name}: versions and quality`,
      h("div", { class: "row" }, model.versions.map((v) => h("span", { class: "chip" }, `v${v.version} `, badge(v.state.toLowerCase())))),
      qual.status === "fulfilled" ? quality(qual.value, versions) : errorBox(`quality: ${qual.reason.message}`)),
    section("Traffic",
      h("p", {}, "Now: ", h("strong", { testid: "current-routes" }, routesText(policy.routes))),
      trafficBar(policy.routes, versions),
      pol.status === "rejected" ? errorBox(pol.reason) : editor(name, versions, policy, reload)),
    section("Policy history", hist.status === "fulfilled" ? history(name, hist.value, reload) : errorBox(hist.reason)),
  );
  root.dataset.model = name;
  root.dataset.routes = JSON.stringify(policy.routes || {});
}

export async function mount(root, [name]) {
  const doc = await get("/admin/overview");
  const all = doc.models;
  if (!all.length) {
    root.replaceChildren(errorBox(doc.errors?.models || "no models"));
    return {};
  }
  await modelView(root, name && all.some((m) => m.name === name) ? name : all[0].name, all);
  return {};
}
