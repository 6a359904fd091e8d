// Overview: traffic at a glance (live charts), every service replica, models and running jobs.
import { get } from "./api.js";
import { lineChart } from "./chart.js";
import { badge, errorBox, h, num, pct, progress, section, table } from "./ui.js";

function kpi(label, value, testid) {
  return h("div", { class: "kpi", testid }, h("div", { class: "kpi-value" }, value), h("div", { class: "kpi-label" }, label));
}

function routesText(policy) {
  if (!policy) return "–";
  const routes = Object.entries(policy.routes || {});
  let text = routes.length ? routes.map(([v, w]) => `v${v}: ${w}`).join(" · ") : "newest version";
  if (policy.shadow) text += ` · shadow v${policy.shadow.version} ${policy.shadow.percent}%`;
  if (policy.ensemble) text += ` · ensemble ${policy.ensemble.versions.join("+")}`;
  if (policy.fallback) text += ` · fallback v${policy.fallback}`;
  return text;
}

export function jobRow(job) {
  const p = job.progress || {};
  const rows = p.total_rows ? `${p.done_rows} / ${p.total_rows} rows` : `${p.done_chunks}/${p.total_chunks ?? "?"} chunks`;
  return h("tr", { "data-job": job.id },
    h("td", {}, h("code", {}, job.id.slice(0, 12))),
    h("td", {}, `${job.model}${job.version ? " v" + job.version : ""}`),
    h("td", {}, badge(job.status)),
    h("td", { class: "wide" }, progress(p.fraction, `${Math.round((p.fraction || 0) * 100)}% · ${rows}`)));
}

function render(root, doc) {
  const s = doc.traffic.summary;
  const series = doc.traffic.series;
  const line = (key, scale = 1) => series.map((p) => ({ t: p.t, v: p[key] === null ? null : p[key] * scale }));
  const charts = h("div", { class: "charts" });
  const rps = h("div", { class: "chart-box", testid: "chart-rps" });
  const lat = h("div", { class: "chart-box", testid: "chart-latency" });
  const cache = h("div", { class: "chart-box", testid: "chart-cache" });
  charts.append(rps, lat, cache);
  lineChart(rps, { title: "Requests per second (gateway)", unit: "req/s", windowS: doc.window_s,
                   series: [{ name: "rps", cls: "s1", points: line("rps") }] });
  lineChart(lat, { title: "Latency (gateway)", unit: "ms", windowS: doc.window_s,
                   series: [{ name: "p50", cls: "s1", points: line("p50_ms") },
                            { name: "p95", cls: "s2", points: line("p95_ms") }] });
  lineChart(cache, { title: "Cache hits and errors", unit: "%", yMax: 1, windowS: doc.window_s,
                     series: [{ name: "cache hits", cls: "s3", points: line("cache_hit_ratio") },
                              { name: "errors", cls: "s4", points: line("error_rate") }] });

  const services = table(["service", "status", "replicas", "req/s", "p50", "p95", "errors"],
    doc.services.map((svc) => h("tr", { "data-service": svc.name },
      h("td", {}, h("strong", {}, svc.name)),
      h("td", {}, badge(svc.status)),
      h("td", {}, h("ul", { class: "replicas" }, svc.replicas.map((r) => h("li", {},
        badge(r.status), " ", h("code", {}, r.url), r.version ? h("span", { class: "muted" }, ` v${r.version}`) : null,
        r.detail ? h("div", { class: "muted small" }, r.detail) : null)))),
      h("td", {}, num(svc.rps, "", 2)), h("td", {}, num(svc.p50_ms, " ms", 1)),
      h("td", {}, num(svc.p95_ms, " ms", 1)), h("td", {}, pct(svc.error_rate)))), { testid: "services" });

  const models = table(["model", "versions", "traffic policy", "predictions/s", "cache hits"],
    doc.models.map((m) => h("tr", { "data-model": m.name },
      h("td", {}, h("a", { href: `#/models/${encodeURIComponent(m.name)}` }, m.name)),
      h("td", {}, m.versions.map((v) => h("span", { class: `chip ${v.state === "READY" ? "" : "bad"}` }, `v${v.version}`))),
      h("td", {}, routesText(m.policy)),
      h("td", {}, num(m.predictions_per_s, "", 2)),
      h("td", {}, pct(m.cache_hit_ratio)))), { testid: "models" });

  const running = doc.jobs.filter((j) => j.status === "queued" || j.status === "running");
  const jobs = table(["job", "model", "status", "progress"], running.map(jobRow), { testid: "running-jobs" });

  root.replaceChildren(...[
    h("div", { class: "kpis" },
      kpi(`req/s (last ${Math.round(s.window_s || doc.summary_s)} s)`, num(s.rps, "", 2), "kpi-rps"),
      kpi("p50 latency", num(s.p50_ms, " ms", 1), "kpi-p50"),
      kpi("p95 latency", num(s.p95_ms, " ms", 1), "kpi-p95"),
      kpi("error rate", pct(s.error_rate), "kpi-errors"),
      kpi("cache hit ratio", pct(s.cache_hit_ratio), "kpi-cache")),
    charts,
    Object.keys(doc.errors || {}).length ? errorBox(Object.entries(doc.errors).map(([k, v]) => `${k}: ${v}`).join("; ")) : null,
    section("Services", services),
    section("Models", models),
    section(`Running jobs (${running.length})`, jobs, h("p", {}, h("a", { href: "#/jobs" }, "all jobs →"))),
    h("p", { class: "muted small" }, `updated ${new Date(doc.generated_at * 1000).toLocaleTimeString()}; `
      + `scraped every ${doc.scrape_every_s} s`),
  ].filter(Boolean));
}

export async function mount(root) {
  let timer = null, stopped = false;
  async function tick() {
    try {
      const doc = await get("/admin/overview");
      if (!stopped) render(root, doc);
    } catch (err) {
      if (!stopped) root.replaceChildren(errorBox(err));
    }
    if (!stopped && root.isConnected) timer = setTimeout(tick, 5000);
  }
  root.replaceChildren(h("p", { class: "muted" }, "loading …"));
  await tick();
  return { stop() { stopped = true; clearTimeout(timer); } };
}
