// ciuic dashboard: what the three pages share. Fetching the JSON API, formatting, and the chart
// model: series held per (run, job, key), grouped into charts, drawn with plotly.js.
//
// Values arrive as numbers or as the strings "NaN", "Infinity", "-Infinity" (JSON has no such
// numbers). A non-finite value is drawn as a gap in its line plus a red marker at the gap, so a
// diverging run is seen, never silently smoothed over.
"use strict";

const ciuic = (window.ciuic = window.ciuic || {});

// --- small things ----------------------------------------------------------------------------

ciuic.esc = (value) =>
  String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

ciuic.api = async (path) => {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`${path}: HTTP ${response.status} (not JSON)`);
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
};

ciuic.num = (v) => (typeof v === "string" ? Number(v) : v);

ciuic.shortId = (id) => String(id || "").slice(0, 8);

// A job as legends and tables name it: the trials of a sweep share their stage's name, so a
// trial is named by its index.
ciuic.jobLabel = (job) => (job.kind === "trial" ? `trial-${job.trial}` : job.name || ciuic.shortId(job.id));

ciuic.badge = (state) => `<span class="badge state-${ciuic.esc(state)}">${ciuic.esc(state || "?")}</span>`;

ciuic.when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

ciuic.duration = (startIso, endIso) => {
  if (!startIso) return "–";
  const end = endIso ? new Date(endIso) : new Date();
  let s = Math.max(0, Math.round((end - new Date(startIso)) / 1000));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  s %= 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
};

ciuic.formatValue = (v) => {
  const x = ciuic.num(v);
  if (!Number.isFinite(x)) return `<span class="nonfinite">${ciuic.esc(String(x))}</span>`;
  if (x !== 0 && (Math.abs(x) >= 1e6 || Math.abs(x) < 1e-3)) return x.toExponential(3);
  return String(Math.round(x * 1e4) / 1e4);
};

ciuic.stagesHtml = (stages) =>
  `<div class="stages">${(stages || [])
    .map((st, i) => {
      const title = [st.kind, st.state, st.service ? `waits for ${st.service}` : "", st.reason].filter(Boolean).join(" · ");
      const arrow = i ? '<span class="arrow">→</span>' : "";
      return `${arrow}<span class="stage state-${ciuic.esc(st.state)}" data-stage="${ciuic.esc(st.name)}" data-state="${ciuic.esc(
        st.state,
      )}" title="${ciuic.esc(title)}">${ciuic.esc(st.name)}<small>${ciuic.esc(st.state)}</small></span>`;
    })
    .join("")}</div>`;

// --- which chart a metric goes to ------------------------------------------------------------

// System metrics sampled by the agent; several keys share one chart (GPUs, in/out pairs).
const SYSTEM_CHARTS = [
  // [key pattern, chart id, title, match -> [line label within the chart, its dash index]]
  [/^system\/gpu\.(\d+)\.utilization_pct$/, "sys:gpu_util", "GPU utilisation (%)", (m) => [`GPU ${m[1]}`, Number(m[1])]],
  [/^system\/gpu\.(\d+)\.memory_used_mib$/, "sys:gpu_mem", "GPU memory used (MiB)", (m) => [`GPU ${m[1]}`, Number(m[1])]],
  [/^system\/cpu_pct$/, "sys:cpu", "CPU (%)", () => ["", 0]],
  [/^system\/memory_used_mib$/, "sys:mem", "Memory used (MiB)", () => ["", 0]],
  [/^system\/net_(sent|recv)_bytes_per_s$/, "sys:net", "Network (bytes/s)", (m) => (m[1] === "sent" ? ["sent", 0] : ["received", 1])],
  [/^system\/disk_(read|write)_bytes_per_s$/, "sys:disk", "Disk I/O (bytes/s)", (m) => [m[1], m[1] === "read" ? 0 : 1]],
];
const SYSTEM_ORDER = SYSTEM_CHARTS.map((c) => c[1]);

// {id, title, section: "training"|"system", sub: label suffix within the chart, subIndex}
ciuic.chartFor = (key) => {
  if (!key.startsWith("system/")) return { id: `train:${key}`, title: key, section: "training", sub: "", subIndex: 0 };
  for (const [re, id, title, subOf] of SYSTEM_CHARTS) {
    const m = key.match(re);
    if (m) {
      const [sub, subIndex] = subOf(m);
      return { id, title, section: "system", sub, subIndex };
    }
  }
  return { id: `sys:${key.slice(7)}`, title: key.slice(7), section: "system", sub: "", subIndex: 0 };
};

// Losses first, then accuracies, then the rest by name; system charts in a fixed order.
ciuic.chartOrder = (a, b) => {
  const rank = (c) => {
    if (c.section === "system") {
      const i = SYSTEM_ORDER.indexOf(c.id);
      return [1, i < 0 ? SYSTEM_ORDER.length : i, c.title];
    }
    const t = c.title.toLowerCase();
    return [0, t.includes("loss") ? 0 : t.includes("acc") ? 1 : 2, c.title];
  };
  const ra = rank(a);
  const rb = rank(b);
  for (let i = 0; i < 3; i++) if (ra[i] !== rb[i]) return ra[i] < rb[i] ? -1 : 1;
  return 0;
};

// --- the series the page holds ---------------------------------------------------------------

// Series keyed by run/job/key. `load` replaces a series with a fresh (downsampled) curve and
// keeps live points newer than it; `append` adds streamed points, ignoring steps already held
// (the stream may repeat what the curve had). Both return the ids of the charts they touched.
ciuic.SeriesStore = class {
  constructor() {
    this.series = new Map();
  }
  static id(s) {
    return `${s.run_id}\u0000${s.job_id}\u0000${s.key}`;
  }
  _entry(s) {
    const id = ciuic.SeriesStore.id(s);
    let e = this.series.get(id);
    if (!e) {
      e = { run_id: s.run_id, job_id: s.job_id, key: s.key, source: s.source, steps: [], values: [], times: [], total: 0 };
      this.series.set(id, e);
    }
    return e;
  }
  load(list) {
    const touched = new Set();
    for (const s of list) {
      const e = this._entry(s);
      const lastNew = s.steps.length ? s.steps[s.steps.length - 1] : -Infinity;
      // Points streamed after the curve was read stay.
      const keep = [];
      e.steps.forEach((step, i) => step > lastNew && keep.push(i));
      e.steps = [...s.steps, ...keep.map((i) => e.steps[i])];
      e.values = [...s.values.map(ciuic.num), ...keep.map((i) => e.values[i])];
      e.times = [...s.times, ...keep.map((i) => e.times[i])];
      e.total = Math.max(s.total_points || 0, e.steps.length);
      touched.add(ciuic.chartFor(e.key).id);
    }
    return touched;
  }
  append(list) {
    const touched = new Set();
    for (const s of list) {
      const e = this._entry(s);
      let last = e.steps.length ? e.steps[e.steps.length - 1] : -Infinity;
      s.steps.forEach((step, i) => {
        if (step <= last) return;
        e.steps.push(step);
        e.values.push(ciuic.num(s.values[i]));
        e.times.push(s.times[i]);
        e.total += 1;
        last = step;
        touched.add(ciuic.chartFor(e.key).id);
      });
    }
    return touched;
  }
  longest() {
    let n = 0;
    for (const e of this.series.values()) n = Math.max(n, e.steps.length);
    return n;
  }
  charts() {
    const byId = new Map();
    for (const e of this.series.values()) {
      const c = ciuic.chartFor(e.key);
      if (!byId.has(c.id)) byId.set(c.id, { ...c, series: [] });
      byId.get(c.id).series.push({ ...e, sub: c.sub, subIndex: c.subIndex });
    }
    return [...byId.values()].sort(ciuic.chartOrder);
  }
};

// --- drawing ---------------------------------------------------------------------------------

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"];
const NONFINITE_SYMBOL = { NaN: "x", Infinity: "triangle-up", "-Infinity": "triangle-down" };

// `look(series)` -> {name, color, dash, group}: the page decides how lines are named and
// coloured (one colour per job on a run page, per run when comparing).
ciuic.traces = (chart, look) => {
  // System samples are plotted against wall time when every point has one; steps otherwise.
  const byTime = chart.section === "system" && chart.series.every((s) => s.times.every((t) => t != null));
  const traces = [];
  const marks = { x: [], y: [], text: [], symbol: [] };
  for (const s of chart.series) {
    const x = byTime ? s.times.map((t) => new Date(t)) : s.steps;
    const y = s.values.map((v) => (Number.isFinite(v) ? v : null));
    const { name, color, dash, group } = look(s);
    traces.push({
      type: "scatter",
      mode: s.steps.length <= 60 ? "lines+markers" : "lines",
      name,
      legendgroup: group,
      x,
      y,
      connectgaps: false,
      line: { color, dash, width: 1.6 },
      marker: { color, size: 4 },
      meta: { job_id: s.job_id, run_id: s.run_id, key: s.key },
      hovertemplate: `${ciuic.esc(name)}<br>%{x}: %{y}<extra></extra>`,
    });
    // The marker sits where the line broke off (the last finite value before it).
    let lastFinite = null;
    const firstFinite = s.values.find((v) => Number.isFinite(v));
    s.values.forEach((v, i) => {
      if (Number.isFinite(v)) {
        lastFinite = v;
        return;
      }
      marks.x.push(x[i]);
      marks.y.push(lastFinite ?? firstFinite ?? 0);
      marks.text.push(`${name}: ${String(v)} at step ${s.steps[i]}`);
      marks.symbol.push(NONFINITE_SYMBOL[String(v)] || "x");
    });
  }
  if (marks.x.length) {
    traces.push({
      type: "scatter",
      mode: "markers",
      name: "NaN / ±inf",
      x: marks.x,
      y: marks.y,
      text: marks.text,
      hovertemplate: "%{text}<extra></extra>",
      marker: { color: "#e03131", size: 11, symbol: marks.symbol, line: { width: 2, color: "#e03131" } },
      meta: { nonfinite: true },
    });
  }
  return { traces, byTime, nonfinite: marks.x.length };
};

ciuic.drawChart = (div, chart, look) => {
  const { traces, byTime, nonfinite } = ciuic.traces(chart, look);
  const warning = nonfinite ? ` <span style="color:#e03131">— ${nonfinite} NaN/inf</span>` : "";
  const layout = {
    title: { text: `${ciuic.esc(chart.title)}${warning}`, font: { size: 14 }, x: 0.02 },
    margin: { l: 56, r: 16, t: 40, b: 30 },
    height: 320,
    xaxis: { title: { text: byTime ? "" : "step", standoff: 4 }, type: byTime ? "date" : "linear", zeroline: false, automargin: true },
    yaxis: { zeroline: false, automargin: true },
    legend: { orientation: "h", x: 0, y: -0.18, yanchor: "top", font: { size: 11 } },
    hovermode: "closest",
    // Zoom and hidden lines survive live updates.
    uirevision: chart.id,
    paper_bgcolor: "#fff",
    plot_bgcolor: "#fff",
  };
  return Plotly.react(div, traces, layout, { displaylogo: false, responsive: true });
};

// Keeps one div per chart inside the section containers, in order, and redraws the charts
// marked dirty once per animation frame (a burst of stream events costs one redraw).
ciuic.ChartBoard = class {
  constructor(store, containers, look) {
    this.store = store;
    this.containers = containers; // {training: element, system: element}
    this.look = look;
    this.divs = new Map();
    this.dirty = new Set();
    this.all = false;
    this.frame = null;
    this.draws = 0;
  }
  mark(ids) {
    for (const id of ids) this.dirty.add(id);
    this.schedule();
  }
  markAll() {
    this.all = true;
    this.schedule();
  }
  schedule() {
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      this.draw();
    });
  }
  draw() {
    const charts = this.store.charts();
    for (const section of Object.keys(this.containers)) {
      const container = this.containers[section];
      const mine = charts.filter((c) => c.section === section);
      mine.forEach((chart, i) => {
        let div = this.divs.get(chart.id);
        const fresh = !div;
        if (fresh) {
          div = document.createElement("div");
          div.className = "chart";
          div.dataset.chart = chart.id;
          this.divs.set(chart.id, div);
        }
        if (container.children[i] !== div) container.insertBefore(div, container.children[i] || null);
        if (fresh || this.all || this.dirty.has(chart.id)) ciuic.drawChart(div, chart, this.look);
      });
      // The "nothing yet" note right after a section's charts.
      const empty = container.nextElementSibling;
      if (empty && empty.classList.contains("empty")) empty.hidden = mine.length > 0;
    }
    this.dirty.clear();
    this.all = false;
    this.draws += 1;
  }
};

ciuic.colorFor = (() => {
  const assigned = new Map();
  return (key) => {
    if (!assigned.has(key)) assigned.set(key, PALETTE[assigned.size % PALETTE.length]);
    return assigned.get(key);
  };
})();
ciuic.dash = (i) => DASHES[i % DASHES.length];
