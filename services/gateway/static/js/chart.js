// A small hand-written SVG line chart: a few series over time, y from 0, grid, legend, last value.
const NS = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function fmt(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (unit === "%") return `${(v * 100).toFixed(v >= 0.1 ? 0 : 1)}%`;
  const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
  return `${v.toFixed(digits)}${unit ? " " + unit : ""}`;
}

/**
 * lineChart(container, {title, unit, series: [{name, cls, points: [{t, v}]}], yMax, windowS})
 * t in seconds since the epoch; v may be null (a gap). unit "%" shows ratios as percent.
 */
export function lineChart(container, { title, unit = "", series, yMax, windowS = 300 }) {
  const W = 480, H = 180, L = 44, R = 12, T = 26, B = 22;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  const times = series.flatMap((s) => s.points.map((p) => p.t));
  const now = Math.max(Date.now() / 1000, ...times);
  // The x axis spans the data we have (at least a minute), up to the server's window.
  const first = times.length ? Math.min(...times) : now - windowS;
  windowS = Math.min(windowS, Math.max(60, Math.ceil((now - first) / 30) * 30));
  const t0 = now - windowS;
  const values = series.flatMap((s) => s.points.map((p) => p.v)).filter((v) => v !== null && v !== undefined);
  const top = yMax ?? niceMax(Math.max(0, ...values) * 1.1);
  const x = (t) => L + ((t - t0) / windowS) * (W - L - R);
  const y = (v) => T + (1 - Math.min(v, top) / top) * (H - T - B);

  svg.append(el("text", { x: L, y: 15, class: "chart-title" }, title));
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    svg.append(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(el("text", { x: L - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, fmt(v, unit === "%" ? "%" : "")));
  }
  for (const ago of [windowS, windowS / 2, 0]) {
    const label = ago === 0 ? "now" : ago < 120 ? `-${Math.round(ago)} s` : `-${Math.round(ago / 60)} min`;
    svg.append(el("text", { x: x(now - ago), y: H - 6, class: "axis", "text-anchor": ago === windowS ? "start" : ago === 0 ? "end" : "middle" }, label));
  }
  let legendX = W - R;
  for (const s of [...series].reverse()) {
    const pts = s.points.filter((p) => p.t >= t0);
    let d = "", pen = false;
    for (const p of pts) {
      if (p.v === null || p.v === undefined) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)} `;
      pen = true;
    }
    if (d) svg.append(el("path", { d, class: `line ${s.cls || ""}` }));
    const last = [...pts].reverse().find((p) => p.v !== null && p.v !== undefined);
    if (last) svg.append(el("circle", { cx: x(last.t), cy: y(last.v), r: 2.5, class: `dot ${s.cls || ""}` }));
    const label = `${s.name} ${last ? fmt(last.v, unit) : "–"}`;
    const text = el("text", { x: legendX, y: 15, class: `legend ${s.cls || ""}`, "text-anchor": "end" }, label);
    svg.append(text);
    legendX -= 14 + label.length * 6.6;
  }
  if (!values.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle" }, "no traffic yet"));
  }
  container.replaceChildren(svg);
  return svg;
}

export { fmt };
