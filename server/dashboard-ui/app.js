// mlink's dashboard: reads the JSON API of the daemon that served this page, live, no page reload.
// Results come from the event stream (/api/v1/events) when the daemon has one, else from polling
// each camera's latest result; everything else is polled every POLL_MS. Boxes are drawn here, as
// SVG over the camera's raw frame, so what is executed (solid) and what is predicted (dashed) is
// in the page itself (data-provenance on every box), with one colour per model.
"use strict";

const API = "/api/v1";
const POLL_MS = 1500;
const LINKS_MS = 5000; // the daemon refreshes the measured figures about once a second
const KEEP = 240; // samples kept per chart (6 minutes at POLL_MS)
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990", "#bfef45"];
const SVG = "http://www.w3.org/2000/svg";

const S = {
  colours: {}, // model -> colour
  tiles: {}, // camera id -> its elements
  sse: null, // the EventSource while it is open
  sseResults: 0,
  sseLast: 0, // when it last delivered a result (ms): polling stops only while it delivers
  memory: [], // {t, used, budget}
  expected: {}, // output -> [{t, v}]
  measured: null, // /api/v1/links' measured: rotation's audits per output, with their series
  plans: [], // plan summaries, oldest first (the daemon's history; else those seen since the page opened)
  rotating: new Set(), // predicted by the plan, yet seen executing: for plans that do not list their modes
  plan: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.setAttribute("class", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw Object.assign(new Error(body.error || `${path}: HTTP ${r.status}`), { status: r.status, body });
  return body;
}

const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);
const mib = (b) => (b === null || b === undefined ? "–" : `${(b / 1048576).toFixed(1)} MiB`);
const modelOf = (output) => output.split(":")[0];

// A model's colour: the server's (/api/v1/models `colour`, as snapshot.jpg draws it); the palette
// only for a model seen in a result before the models were read.
function colour(model) {
  if (!(model in S.colours)) S.colours[model] = PALETTE[Object.keys(S.colours).length % PALETTE.length];
  return S.colours[model];
}

function problem(msg) {
  const p = $("problem");
  p.hidden = !msg;
  p.textContent = msg || "";
}

// ---- cameras -------------------------------------------------------------------------------

function tile(id) {
  if (S.tiles[id]) return S.tiles[id];
  const img = el("img", { class: "raw", alt: `latest frame of ${id}` });
  const overlay = el("svg:svg", { class: "overlay", viewBox: "0 0 640 360", preserveAspectRatio: "none" });
  const frame = el("div", { class: "frame no-image" }, img, overlay, el("span", { class: "placeholder", text: "no frame yet" }));
  const stats = el("p", { class: "stats" });
  const outputs = el("tbody");
  const table = el("table", { class: "outputs" },
    el("thead", {}, el("tr", {}, el("th", { text: "output" }), el("th", { text: "provenance" }), el("th", { text: "value" }), el("th", { text: "expected accuracy" }))),
    outputs);
  const meta = el("p", { class: "muted meta" });
  const fig = el("figure", { class: "camera", "data-camera": id },
    frame, el("figcaption", {}, el("h3", {}, el("a", { href: `${API}/cameras/${encodeURIComponent(id)}/snapshot.jpg`, text: id })), stats, meta, table));
  $("cameras").append(fig);
  const t = { fig, frame, img, overlay, stats, outputs, meta, loading: false, retryAt: 0 };
  img.addEventListener("load", () => {
    t.loading = false;
    frame.classList.remove("no-image");
    overlay.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    frame.style.aspectRatio = `${img.naturalWidth} / ${img.naturalHeight}`;
    if (t.last) drawBoxes(t, t.last);
  });
  img.addEventListener("error", () => {
    t.loading = false;
    t.retryAt = Date.now() + 10000;
    frame.classList.add("no-image");
  });
  S.tiles[id] = t;
  return t;
}

function refreshImage(id, t) {
  if (t.loading || Date.now() < t.retryAt) return;
  t.loading = true;
  t.img.src = `${API}/cameras/${encodeURIComponent(id)}/snapshot.jpg?raw=1&t=${Date.now()}`;
}

function renderCamera(c) {
  const t = tile(c.id);
  t.fig.dataset.state = c.state;
  const fps = c.fps_processed ?? c.fps_in;
  t.stats.replaceChildren(
    el("span", { class: `badge state-${c.state}`, text: c.state }),
    ` ${fps === undefined ? "–" : Number(fps).toFixed(1)} frames/s · ${c.drops ?? 0} dropped · ${c.frames_processed ?? 0} processed` +
      (c.reconnects ? ` · ${c.reconnects} reconnects` : ""),
  );
  if (c.last_error) t.stats.append(el("span", { class: "error", text: ` ${c.last_error}` }));
  if (c.state === "connected" || c.live) refreshImage(c.id, t);
}

function summary(value) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) return `${value.length} box${value.length === 1 ? "" : "es"}`;
  if (typeof value === "object") {
    if ("count" in value) return `count ${value.count}`;
    if ("label" in value) return `${value.label}${value.score !== undefined ? ` (${Number(value.score).toFixed(2)})` : ""}`;
    if ("top" in value && Array.isArray(value.top)) return value.top.slice(0, 2).map((x) => x.label ?? x).join(", ");
    return JSON.stringify(value).slice(0, 60);
  }
  return String(value);
}

function drawBoxes(t, result) {
  const [w, h] = t.overlay.getAttribute("viewBox").split(" ").slice(2).map(Number);
  const shapes = [];
  for (const [name, out] of Object.entries(result.outputs || {})) {
    if (!Array.isArray(out.value)) continue;
    const model = modelOf(name);
    for (const b of out.value) {
      const box = b.box || b;
      if (!Array.isArray(box) || box.length < 4) continue;
      const rect = el("svg:rect", {
        class: `box ${out.provenance}`,
        x: box[0] * w, y: box[1] * h, width: Math.max(0, (box[2] - box[0]) * w), height: Math.max(0, (box[3] - box[1]) * h),
        stroke: colour(model), "stroke-dasharray": out.provenance === "executed" ? null : "8 6",
        "data-provenance": out.provenance, "data-model": model, "data-output": name,
      });
      rect.append(el("svg:title", { text: `${name} ${out.provenance} ${b.score !== undefined ? Number(b.score).toFixed(2) : ""}` }));
      shapes.push(rect);
    }
  }
  t.overlay.replaceChildren(...shapes);
}

function renderResult(camera, result) {
  const t = tile(camera);
  t.last = result;
  for (const m of result.executed || []) if (S.plan && S.plan.predicted.includes(m)) S.rotating.add(m);
  drawBoxes(t, result);
  const rows = Object.entries(result.outputs || {}).map(([name, out]) =>
    el("tr", { "data-output": name, "data-provenance": out.provenance },
      el("td", {}, el("span", { class: "swatch", "data-model": modelOf(name) }), name),
      el("td", {}, el("span", { class: `prov prov-${out.provenance}`, text: out.provenance }),
        out.sources ? el("span", { class: "muted", text: ` from ${out.sources.join(", ")}` }) : ""),
      el("td", { text: summary(out.value) }),
      el("td", { text: pct(out.expected_accuracy) })));
  t.outputs.replaceChildren(...rows);
  for (const s of t.outputs.querySelectorAll(".swatch")) s.style.background = colour(s.dataset.model);
  const missing = Object.keys(result.missing || {});
  t.meta.textContent = `plan ${result.plan_id ?? "–"} · frame ${result.frame_index ?? "–"}` +
    (result.revision ? ` · revision ${result.revision}` : "") + (missing.length ? ` · missing: ${missing.join(", ")}` : "");
  renderLegend();
}

function renderLegend() {
  const items = Object.entries(S.colours).map(([m, c]) => {
    const sw = el("span", { class: "swatch" });
    sw.style.background = c;
    return el("span", { class: "item" }, sw, m);
  });
  $("legend").replaceChildren(...items, el("span", { class: "item" }, el("span", { class: "solid" }), "executed"),
    el("span", { class: "item" }, el("span", { class: "dashed" }), "predicted"));
}

async function pollCameras() {
  const cams = await getJSON(`${API}/cameras`);
  const ids = new Set(cams.map((c) => c.id));
  for (const id of Object.keys(S.tiles)) if (!ids.has(id)) { S.tiles[id].fig.remove(); delete S.tiles[id]; }
  cams.forEach(renderCamera);
  if (S.sse && Date.now() - S.sseLast < 5000) return; // results arrive as events
  await Promise.all(cams.map(async (c) => {
    try {
      const rec = await getJSON(`${API}/cameras/${encodeURIComponent(c.id)}/results/latest`);
      renderResult(c.id, rec.result);
    } catch (e) {
      if (e.status !== 404) throw e; // 404: no result yet
    }
  }));
}

function startEvents() {
  if (!window.EventSource) return;
  const es = new EventSource(`${API}/events`);
  es.addEventListener("open", () => { S.sse = es; });
  es.addEventListener("result", (ev) => {
    S.sse = es;
    S.sseResults += 1;
    S.sseLast = Date.now();
    const d = JSON.parse(ev.data);
    const result = d.result || d;
    const camera = d.camera || result.camera;
    if (camera) renderResult(camera, result);
  });
  es.addEventListener("error", () => {
    if (es.readyState === EventSource.CLOSED) { S.sse = null; setTimeout(startEvents, 15000); } // e.g. no such route: poll
  });
}

// ---- schedule and models -------------------------------------------------------------------

function line(points, colourOf, attrs = {}) {
  return el("svg:polyline", { points: points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "), fill: "none", stroke: colourOf, ...attrs });
}

function chart(svg, series, ymax, label) {
  const all = series.flatMap((s) => s.points);
  if (!all.length) return;
  const t0 = Math.min(...all.map((p) => p.t)), t1 = Math.max(...all.map((p) => p.t), t0 + 1);
  const X = (t) => 4 + (392 * (t - t0)) / (t1 - t0), Y = (v) => 136 - (128 * v) / (ymax || 1);
  svg.replaceChildren(
    el("svg:line", { x1: 4, x2: 396, y1: 136, y2: 136, class: "axis" }),
    ...series.map((s) => line(s.points.map((p) => [X(p.t), Y(p.v)]), s.colour, { class: s.class || "series", "data-series": s.name, "data-kind": s.kind })),
    ...series.filter((s) => s.dots).flatMap((s) => s.points.map((p) =>
      el("svg:circle", { cx: X(p.t), cy: Y(p.v), r: 1.8, fill: s.colour, class: "dot", "data-series": s.name, "data-kind": s.kind }))),
    el("svg:text", { x: 6, y: 12, class: "label", text: label }),
  );
}

function renderSchedule(sched, models) {
  const plan = sched.plan, pool = sched.pool || {};
  S.plan = plan;
  $("state").textContent = sched.state;
  $("state").className = `badge state-${sched.state}`;
  const now = Date.now() / 1000;
  S.memory.push({ t: now, used: pool.charged_bytes ?? plan.cost_bytes ?? 0, budget: pool.budget_bytes ?? plan.budget_bytes });
  for (const [k, v] of Object.entries(plan.expected_nodes || {})) (S.expected[k] ||= []).push({ t: now, v });
  S.memory.splice(0, S.memory.length - KEEP);
  for (const k of Object.keys(S.expected)) S.expected[k].splice(0, S.expected[k].length - KEEP);
  const top = Math.max(...S.memory.map((m) => Math.max(m.used, m.budget || 0))) * 1.15;
  chart($("memory-chart"), [
    { name: "budget", colour: "#c33", class: "budget", points: S.memory.map((m) => ({ t: m.t, v: m.budget || 0 })) },
    { name: "used", colour: "#36c", points: S.memory.map((m) => ({ t: m.t, v: m.used })) },
  ], top, `max ${mib(top)}`);
  $("memory-now").textContent = `used (blue) ${mib(pool.charged_bytes)} of ${mib(pool.budget_bytes)} budget (red, dashed)` +
    (pool.source ? ` (measured: ${pool.source}, on ${pool.device})` : "");
  renderAccuracy();
  if (sched.history) S.plans = sched.history;
  else if (!S.plans.length || S.plans[S.plans.length - 1].plan_id !== plan.plan_id) S.plans.push(plan);
  $("plans").tBodies[0].replaceChildren(...S.plans.slice(-20).reverse().map((p) =>
    el("tr", { "data-plan": p.plan_id },
      el("td", { text: p.plan_id }), el("td", { text: new Date(p.created_at * 1000).toLocaleTimeString() }),
      el("td", { text: p.reason }), el("td", { text: p.active.join(", ") || "–" }), el("td", { text: p.predicted.join(", ") || "–" }),
      el("td", { text: pct(p.objective) }), el("td", { text: pct(p.budget_used) }))));
  const left = plan.next_reselect_at ? Math.max(0, plan.next_reselect_at - now) : null;
  $("reselect").textContent = left === null ? "no periodic re-selection" :
    `next re-selection in ${left >= 120 ? `${Math.round(left / 60)} min` : `${Math.round(left)} s`} (at ${new Date(plan.next_reselect_at * 1000).toLocaleTimeString()})`;
  $("models").tBodies[0].replaceChildren(...models.map((m) => {
    const modes = plan.hybrid && plan.hybrid.modes;  // a hybrid plan says which models rotate
    const rotating = modes ? modes.rotating.includes(m.name) : S.rotating.has(m.name);
    const st = m.unavailable ? "unavailable" : rotating ? "rotating" : plan.predicted.includes(m.name) ? "predicted" : m.loaded ? "loaded" : "not loaded";
    const sw = el("span", { class: "swatch" });
    sw.style.background = colour(m.name);
    return el("tr", { "data-model": m.name, "data-state": st },
      el("td", {}, sw, m.name), el("td", {}, el("span", { class: `prov model-${st}`, text: st }), m.unavailable ? ` ${m.unavailable}` : ""),
      el("td", { text: mib(m.memory_bytes) }), el("td", { text: pct(m.expected_accuracy) }),
      el("td", { text: m.executes_on + (m.fallback ? ` (fallback: ${m.fallback})` : "") }));
  }));
}

async function pollSchedule() {
  const models = await getJSON(`${API}/models`);
  for (const m of models) if (m.colour) S.colours[m.name] = m.colour; // the snapshots' colours (server/overlay.py)
  try {
    renderSchedule(await getJSON(`${API}/schedule`), models);
  } catch (e) {
    if (e.status !== 503) throw e;
    $("state").textContent = e.message; // no plan yet: the daemon says what it is doing
  }
}

// ---- links ---------------------------------------------------------------------------------

// Expected (the plan's figure, dashed, sampled while the page is open) and measured (solid, with
// a dot per interval: the mean accuracy of the predictions rotation checked against a real run in
// that interval, kept by the daemon) per output. An output no audit checked says so.
function renderAccuracy() {
  const plan = S.plan;
  if (!plan) return;
  const rows = (S.measured && S.measured.nodes) || {};
  const series = Object.entries(S.expected).map(([k, pts]) => ({ name: k, kind: "expected", colour: colour(modelOf(k)), class: "series expected", points: pts }));
  for (const [k, pts] of Object.entries((S.measured && S.measured.series) || {})) {
    series.push({ name: k, kind: "measured", colour: colour(modelOf(k)), dots: true, points: pts.map(([t, , , v]) => ({ t, v })) });
  }
  chart($("accuracy-chart"), series, 1.12, "accuracy 0–100%: measured solid, expected dashed");
  const outputs = [...new Set([...Object.keys(plan.expected_nodes || {}), ...Object.keys(rows)])];
  $("accuracy-legend").replaceChildren(...outputs.map((k) => {
    const sw = el("span", { class: "swatch" });
    sw.style.background = colour(modelOf(k));
    const r = rows[k];
    const measured = !r ? "measured: –" : r.n ? `measured ${pct(r.measured)} vs ${pct(r.expected)} expected over ${r.n} checked predictions` : "not measured yet";
    return el("span", { class: "item", "data-output": k, "data-audits": r ? r.n : "" }, sw, `${k}: ${measured}; the plan expects ${pct((plan.expected_nodes || {})[k])}`);
  }));
}

async function pollLinks() {
  let m;
  try {
    m = await getJSON(`${API}/links`);
  } catch (e) {
    if (e.status === 503) { $("heatmap").textContent = e.message; return; }
    throw e;
  }
  S.measured = m.measured || null;
  renderAccuracy();
  const acc = {};
  for (const l of m.links || []) acc[`${l.source}\u0000${l.target}`] = l;
  const head = el("tr", {}, el("th", { text: "source \\ target" }), ...m.targets.map((t) => el("th", { text: t })));
  const rows = m.sources.map((s) => el("tr", {}, el("th", { text: s }), ...m.targets.map((t) => {
    const l = acc[`${s}\u0000${t}`];
    if (!l) return el("td", { class: "empty", text: s === t ? "" : "–" });
    const td = el("td", { text: pct(l.accuracy), "data-accuracy": l.accuracy, title: l.beats_trivial ? "beats the trivial predictor" : "does not beat the trivial predictor" });
    td.style.background = `hsl(${Math.round(120 * Math.max(0, Math.min(1, l.accuracy)))}, 65%, ${l.beats_trivial ? 72 : 88}%)`;
    return td;
  })));
  $("heatmap").replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)),
    el("p", { class: "muted", text: `${m.n_tuples} profiled tuples, ${m.folds} fold(s); pale cells do not beat the trivial predictor` }));
}

// ---- reload --------------------------------------------------------------------------------

async function reload(body) {
  const out = $("reload-result");
  out.className = "pending";
  out.textContent = "applying…";
  const token = $("reload-token").value.trim();
  let r, data;
  try {
    r = await fetch(`${API}/config/reload`, {
      method: "POST", body, cache: "no-store",
      headers: { "Content-Type": "application/yaml", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
    });
    data = await r.json().catch(() => ({}));
  } catch (e) {
    out.className = "error";
    out.textContent = `the daemon did not answer: ${e.message}`;
    return;
  }
  $("reload-config").setAttribute("aria-invalid", String(!r.ok && r.status === 400));
  if (r.ok) {
    out.className = "ok";
    out.textContent = `applied${data.changed && data.changed.length ? `: changed ${data.changed.join(", ")}` : " (nothing changed)"}` +
      (data.replanned ? "; re-planned" : "") + (data.restart_needed ? `; needs a restart: ${JSON.stringify(data.restart_needed)}` : "");
    return;
  }
  out.className = "error";
  const errors = (data.errors || []).map((e) => el("li", { class: "reload-error", "data-path": e.path || "" },
    el("code", { text: e.path || "<root>" }), `: ${e.message || e.msg || ""}`));
  out.replaceChildren(el("p", { text: `${r.status}: ${data.error || data.message || "refused"}` }), el("ul", {}, ...errors));
}

$("reload-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("reload-config").value;
  if (!text.trim()) {
    $("reload-result").className = "error";
    $("reload-result").textContent = "the config is empty: paste a whole site config, or re-read the config file";
    return;
  }
  reload(text);
});
$("reload-file").addEventListener("click", () => reload(""));

// ---- the loops -----------------------------------------------------------------------------

function every(ms, fn) {
  const tick = async () => {
    try {
      await fn();
      problem("");
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      const live = S.sse && Date.now() - S.sseLast < 5000;
      $("feed").textContent = live ? `results: event stream (${S.sseResults} so far)` : "results: polling";
    } catch (e) {
      problem(e.status ? e.message : `the daemon does not answer (${e.message})`);
    }
    setTimeout(tick, ms);
  };
  tick();
}

startEvents();
every(POLL_MS, pollCameras);
every(POLL_MS, pollSchedule);
every(LINKS_MS, pollLinks);
