// Jobs: submit a batch inference file, watch progress bars, cancel, download results.
import { api, get } from "./api.js";
import { badge, errorBox, h, progress, section, table, toast, when } from "./ui.js";

const ACTIVE = new Set(["queued", "running"]);

async function download(job) {
  try {
    const r = await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}/result`, { raw: true, headers: { accept: "text/csv" } });
    const blob = await r.blob();
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: `${job.model}-${job.id}.csv` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    toast(err.message, "bad");
  }
}

async function cancel(job, refresh) {
  try {
    await api("POST", `/v1/jobs/${encodeURIComponent(job.id)}/cancel`);
    toast(`job ${job.id.slice(0, 12)} cancelled`);
  } catch (err) {
    toast(err.message, "bad");
  }
  refresh();
}

function row(job, refresh) {
  const p = job.progress || {};
  const rows = p.total_rows ? `${p.done_rows} / ${p.total_rows} rows` : `${p.done_chunks}/${p.total_chunks ?? "?"} chunks`;
  return h("tr", { "data-job": job.id, "data-status": job.status },
    h("td", {}, h("code", { title: job.id }, job.id.slice(0, 12))),
    h("td", {}, `${job.model}${job.version ? " v" + job.version : ""}`),
    h("td", {}, badge(job.status), job.error ? h("div", { class: "muted small" }, job.error.message || job.error.code || JSON.stringify(job.error)) : null),
    h("td", { class: "wide" }, progress(p.fraction, `${Math.round((p.fraction || 0) * 100)}% · ${rows}`)),
    h("td", {}, when(job.created_at)),
    h("td", {},
      ACTIVE.has(job.status) ? h("button", { type: "button", class: "small", testid: "cancel", onclick: () => cancel(job, refresh) }, "Cancel") : null,
      job.status === "succeeded" ? h("button", { type: "button", class: "small", testid: "download", onclick: () => download(job) }, "Download CSV") : null));
}

export async function mount(root) {
  let timer = null, stopped = false;
  const overview = await get("/admin/overview").catch(() => ({ models: [] }));
  const models = overview.models.map((m) => m.name);
  const list = h("div", { testid: "jobs" });
  const form = h("form", { class: "editor", testid: "job-form", onsubmit: async (ev) => {
    ev.preventDefault();
    const data = new FormData(ev.target);
    for (const k of ["version", "chunk_rows"]) if (!data.get(k)) data.delete(k);
    const file = data.get("file");
    if (!file || !file.name) return toast("choose a CSV or Parquet file", "bad");
    try {
      const job = await api("POST", "/v1/jobs/batch-inference", { form: data });
      toast(`job ${job.id.slice(0, 12)} queued`);
      ev.target.reset();
      refresh();
    } catch (err) {
      toast(err.message, "bad");
    }
  } },
  h("div", { class: "row" },
    h("label", {}, "input file ", h("input", { type: "file", name: "file", accept: ".csv,.parquet", required: true, testid: "job-file" })),
    h("label", {}, "model ", h("select", { name: "model", testid: "job-model" }, models.map((m) => h("option", { value: m }, m)))),
    h("label", {}, "version ", h("input", { name: "version", placeholder: "newest", size: 6, testid: "job-version" })),
    h("label", {}, "rows per chunk ", h("input", { name: "chunk_rows", type: "number", min: 1, placeholder: "default", testid: "job-chunk-rows" })),
    h("button", { type: "submit", class: "primary", testid: "submit-job" }, "Submit batch job")));

  async function refresh() {
    clearTimeout(timer);
    try {
      const { jobs } = await get("/v1/jobs?limit=50");
      if (stopped) return;
      list.replaceChildren(table(["job", "model", "status", "progress", "created", ""], jobs.map((j) => row(j, refresh))));
      const busy = jobs.some((j) => ACTIVE.has(j.status));
      if (!stopped && root.isConnected) timer = setTimeout(refresh, busy ? 1000 : 5000);
    } catch (err) {
      list.replaceChildren(errorBox(err));
      if (!stopped && root.isConnected) timer = setTimeout(refresh, 5000);
    }
  }

  root.replaceChildren(
    section("Submit a batch inference job", form,
      h("p", { class: "muted small" }, "CSV or Parquet with the model's input columns; the result is the input rows with the model's outputs, in input order.")),
    section("Jobs", list));
  await refresh();
  return { stop() { stopped = true; clearTimeout(timer); } };
}
