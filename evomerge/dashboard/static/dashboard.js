// The evomerge dashboard: polls the JSON API (server.py) every 2 s and redraws with Plotly.react,
// which keeps the user's zoom (uirevision) while points are added. No framework: two views chosen
// by the URL's hash, #/ (the runs) and #/run/NAME (one run).
"use strict";

const POLL_MS = 2000;
const state = {
  sort: {},                 // table id -> {key, dir}
  compare: null,            // run names chosen for the comparison plot (null: every run)
  pareto: {},               // run name -> {x, y}: the chosen axes, kept across polls
  candidate: null,          // {run, id} shown in the recipe panel
  busy: false,
  polls: 0,
};

// ---- small helpers ------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}
const fmt = (v, digits = 4) => (v === null || v === undefined || Number.isNaN(v)) ? "-" :
  (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(digits)) : String(v));
const fmtTime = (t) => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "-";
async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
function sortRows(tableId, rows, value) {
  const sort = state.sort[tableId];
  if (!sort) return rows;
  const sign = sort.dir === "asc" ? 1 : -1;
  return [...rows].sort((a, b) => {
    const x = value(a, sort.key), y = value(b, sort.key);
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;   // blanks last, either way
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * sign;
  });
}
function sortableHeader(tableId, th, key, redraw) {
  const sort = state.sort[tableId];
  if (sort && sort.key === key) th.classList.add(sort.dir === "asc" ? "sorted-asc" : "sorted-desc");
  th.addEventListener("click", () => {
    const now = state.sort[tableId];
    state.sort[tableId] = {key, dir: now && now.key === key && now.dir === "asc" ? "desc" : "asc"};
    redraw();
  });
}
const LAYOUT = {margin: {l: 60, r: 20, t: 20, b: 50}, legend: {font: {size: 10}}, hovermode: "closest"};
const CONFIG = {displaylogo: false, responsive: true};
function draw(id, traces, layout) {
  Plotly.react(id, traces, {...LAYOUT, ...layout}, CONFIG);
}

// ---- the runs list ------------------------------------------------------------------------
let lastList = null;

async function refreshList() {
  lastList = await getJSON("/api/runs");
  renderList();
  const names = lastList.runs.map((r) => r.name).filter((n) => !state.compare || state.compare.has(n));
  const query = names.map((n) => "name=" + encodeURIComponent(n)).join("&");
  drawCompare(names.length ? await getJSON("/api/compare?" + query) : {groups: [], pools: []});
}

function renderList() {
  const data = lastList;
  document.getElementById("root").textContent = data.root;
  document.getElementById("no-runs").hidden = data.runs.length > 0;
  const table = document.getElementById("runs-table");
  const value = (r, key) => ({compare: null, name: r.name, state: r.state, done: r.done,
    best: r.best && r.best.objective, mean: r.best && r.best.mean_score, rate: r.rate_per_min,
    failed: r.failed, started: r.started, updated: r.updated, pool: r.pool})[key];
  table.querySelectorAll("th").forEach((th) => {
    const fresh = th.cloneNode(true);  // drops the previous render's listener
    fresh.classList.remove("sorted-asc", "sorted-desc");
    th.replaceWith(fresh);
    if (fresh.dataset.key !== "compare") sortableHeader("runs-table", fresh, fresh.dataset.key, renderList);
  });
  const body = table.querySelector("tbody");
  body.replaceChildren(...sortRows("runs-table", data.runs, value).map((r) => {
    const box = el("input", {type: "checkbox", "aria-label": "compare " + r.name});
    box.checked = !state.compare || state.compare.has(r.name);
    box.addEventListener("click", (event) => {
      event.stopPropagation();
      state.compare = state.compare || new Set(data.runs.map((x) => x.name));
      box.checked ? state.compare.add(r.name) : state.compare.delete(r.name);
      refresh();
    });
    const budget = r.budget ? `${r.done}/${r.budget} (${Math.round(100 * r.done / r.budget)}%)` : String(r.done);
    const row = el("tr", {"data-run": r.name, onclick: () => { location.hash = "#/run/" + encodeURIComponent(r.name); }},
      el("td", {class: "text"}, box), el("td", {class: "text"}, el("a", {href: "#/run/" + encodeURIComponent(r.name)}, r.name)),
      el("td", {class: "text state-" + r.state, title: r.reason || ""}, r.state), el("td", {class: "progress"}, budget),
      el("td", {}, fmt(r.best && r.best.objective)), el("td", {}, fmt(r.best && r.best.mean_score)),
      el("td", {}, fmt(r.rate_per_min, 3)), el("td", {}, r.failed), el("td", {}, fmtTime(r.started)),
      el("td", {}, fmtTime(r.updated)), el("td", {class: "text"}, r.pool));
    return row;
  }));
}

function drawCompare(data) {
  const traces = [];
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const manyPools = data.pools.length > 1;
  data.groups.forEach((g, i) => {
    const color = palette[i % palette.length];
    const name = `${g.method} (${g.runs.length} run${g.runs.length > 1 ? "s" : ""})` + (manyPools ? ` on ${g.pool}` : "");
    if (g.runs.length > 1) {
      traces.push({x: g.x, y: g.high, mode: "lines", line: {width: 0}, showlegend: false, hoverinfo: "skip", legendgroup: name});
      traces.push({x: g.x, y: g.low, mode: "lines", line: {width: 0}, fill: "tonexty", fillcolor: color + "33",
                   showlegend: false, hoverinfo: "skip", legendgroup: name});
    }
    traces.push({x: g.x, y: g.mean, mode: "lines", name, line: {color}, legendgroup: name,
                 hovertemplate: `${g.runs.join(", ")}<br>evaluation %{x}: %{y:.4f}<extra></extra>`});
  });
  const title = data.pools.length === 1 ? `pool: ${data.pools[0]}` :
    data.pools.length > 1 ? `${data.pools.length} different pools: one line per method and pool` : "no runs with results yet";
  draw("compare-plot", traces, {title: {text: title, font: {size: 12}}, margin: {...LAYOUT.margin, t: 40},
    xaxis: {title: {text: "evaluations"}}, yaxis: {title: {text: "best mean task score so far"}}, uirevision: "compare"});
}

// ---- one run ------------------------------------------------------------------------------
async function refreshRun(name) {
  const run = await getJSON("/api/run?name=" + encodeURIComponent(name));
  document.getElementById("root").textContent = run.name;
  document.getElementById("run-title").textContent = run.name;
  const summary = document.getElementById("run-summary");
  const best = run.best ? `best objective ${fmt(run.best.objective)} (candidate ${run.best.id}, mean score ${fmt(run.best.mean_score)})`
                        : "no successful candidate yet";
  summary.replaceChildren(el("span", {class: "state-" + run.state, id: "run-state"}, run.state), " · ",
    el("span", {id: "run-done"}, run.done), run.budget ? `/${run.budget}` : "", " evaluations · ",
    el("span", {id: "run-failed"}, run.failed), " failed · ", best, " · ", `${fmt(run.rate_per_min, 3)} evals/min`,
    ` · pool ${run.pool} · started ${fmtTime(run.started)}, updated ${fmtTime(run.updated)} UTC`);
  const reason = document.getElementById("run-reason");
  reason.hidden = !run.reason;
  reason.textContent = run.reason || "";
  drawProgress(run);
  drawReferences(run);
  setupPareto(run);
  drawPareto(run);
  drawParallel(run);
  renderCandidates(run);
}

function drawProgress(run) {
  const stages = [...new Set(run.progress.map((p) => p.stage))].sort((a, b) => a - b);
  const traces = [];
  for (const stage of stages) {
    const points = run.progress.filter((p) => p.stage === stage);
    const label = stages.length > 1 ? ` (stage ${stage})` : "";
    traces.push({x: points.map((p) => p.n), y: points.map((p) => p.objective), customdata: points.map((p) => p.id),
                 mode: "markers", name: "candidate" + label, marker: {size: 5, opacity: 0.5},
                 hovertemplate: "candidate %{customdata}: %{y:.4f}<extra></extra>"});
    traces.push({x: points.map((p) => p.n), y: points.map((p) => p.best), mode: "lines", line: {shape: "hv"},
                 name: "best so far" + label});
  }
  draw("progress-plot", traces, {xaxis: {title: {text: "evaluations"}}, yaxis: {title: {text: "objective (lower is better)"}},
                                 uirevision: run.name});
  bindClick("progress-plot");
}

function drawReferences(run) {
  const rows = [[`best (${run.best ? run.best.id : "-"})`, run.best_scores],
                ...Object.entries(run.references)].filter(([, s]) => s && Object.keys(s).length);
  const traces = rows.map(([name, scores]) => ({type: "bar", name, x: run.tasks, y: run.tasks.map((t) => scores[t] ?? null)}));
  draw("references-plot", traces, {barmode: "group", yaxis: {title: {text: "score (higher is better)"}}, uirevision: run.name,
    annotations: Object.keys(run.references).length ? [] : [{text: "no references.json in this run", showarrow: false,
                                                              xref: "paper", yref: "paper", x: 0.5, y: 0.5}]});
}

function axisValue(row, axis, run) {
  if (run.tasks.includes(axis)) return row.scores ? row.scores[axis] ?? null : null;
  return {"mean score": row.mean_score, "objective": row.objective, "cost $/1k": row.cost_per_1k}[axis] ?? null;
}
const referenceValue = (scores, axis, run) => run.tasks.includes(axis) ? scores[axis] ?? null :
  axis === "mean score" ? run.tasks.reduce((s, t) => s + scores[t], 0) / run.tasks.length : null;

function setupPareto(run) {
  const chosen = state.pareto[run.name] || {x: run.axes[0], y: run.axes[1] || run.axes[0]};
  state.pareto[run.name] = chosen;
  for (const which of ["x", "y"]) {
    const select = document.getElementById("pareto-" + which);
    const options = [...select.options].map((o) => o.value);
    if (options.join("\n") !== run.axes.join("\n")) {  // rebuilt only when the axes change: an open menu stays open
      select.replaceChildren(...run.axes.map((a) => el("option", {value: a}, a)));
    }
    if (!run.axes.includes(chosen[which])) chosen[which] = run.axes[0];
    select.value = chosen[which];
    select.onchange = () => { chosen[which] = select.value; drawPareto(lastRun); };
  }
  lastRun = run;
}
let lastRun = null;

function drawPareto(run) {
  const {x, y} = state.pareto[run.name];
  const ok = run.evaluations.filter((e) => e.status === "ok");
  const onFront = new Set(run.pareto.front_ids);
  const trace = (rows, name, marker) => ({x: rows.map((e) => axisValue(e, x, run)), y: rows.map((e) => axisValue(e, y, run)),
    customdata: rows.map((e) => e.id), mode: "markers", name, marker,
    hovertemplate: `candidate %{customdata}<br>${x}: %{x:.4f}<br>${y}: %{y:.4f}<extra></extra>`});
  const traces = [trace(ok.filter((e) => !onFront.has(e.id)), "candidates", {size: 6, color: "#8aa", opacity: 0.5}),
                  trace(ok.filter((e) => onFront.has(e.id)), "Pareto front over tasks", {size: 9, color: "#d62728"})];
  const refs = Object.entries(run.references).filter(([, s]) => s && Object.keys(s).length);
  const refPoints = refs.map(([name, s]) => [name, referenceValue(s, x, run), referenceValue(s, y, run)])
                        .filter(([, a, b]) => a !== null && b !== null);
  if (refPoints.length) {
    traces.push({x: refPoints.map((p) => p[1]), y: refPoints.map((p) => p[2]), text: refPoints.map((p) => p[0]),
                 mode: "markers+text", textposition: "top center", name: "base / experts",
                 marker: {symbol: "x", size: 10, color: "black"}, hovertemplate: "%{text}<extra></extra>"});
  }
  const ref = run.pareto.reference.map((v, i) => `${run.pareto.tasks[i]} ${fmt(v)}`).join(", ");
  document.getElementById("pareto-note").textContent = run.pareto.tasks.length ?
    `${run.pareto.front.length} on the front · hypervolume ${fmt(run.pareto.hypervolume)} (reference point: ${ref})` : "";
  const sense = (axis) => axis === "objective" || axis === "cost $/1k" ? " (lower is better)" : " (higher is better)";
  draw("pareto-plot", traces, {xaxis: {title: {text: x + sense(x)}}, yaxis: {title: {text: y + sense(y)}},
                               uirevision: `${run.name}|${x}|${y}`});
  bindClick("pareto-plot");
}

function drawParallel(run) {
  const ok = run.evaluations.filter((e) => e.status === "ok");
  const onFront = new Set(run.pareto.front_ids);
  const axes = run.axes.filter((a) => a !== "mean score");
  if (!ok.length) { draw("parallel-plot", [], {}); return; }
  const dimensions = axes.map((axis) => ({label: axis, values: ok.map((e) => axisValue(e, axis, run))}));
  draw("parallel-plot", [{type: "parcoords", dimensions,
    line: {color: ok.map((e) => onFront.has(e.id) ? 1 : 0), colorscale: [[0, "#c8d0d8"], [1, "#d62728"]], cmin: 0, cmax: 1}}],
    {margin: {l: 60, r: 60, t: 50, b: 20}, uirevision: run.name});
}

function bindClick(id) {  // a point's customdata is its candidate id; once per plot div
  const node = document.getElementById(id);
  if (node.dataset.bound) return;
  node.dataset.bound = "1";
  node.on("plotly_click", (event) => {
    const point = event.points && event.points[0];
    if (point && Number.isInteger(point.customdata)) showCandidate(currentRun(), point.customdata);
  });
}

function renderCandidates(run) {
  const costed = run.axes.includes("cost $/1k");
  const columns = [["id", "id"], ["stage", "stage"], ["status", "status"], ["objective", "objective"], ["mean", "mean score"],
                   ...run.tasks.map((t) => ["task:" + t, t]), ...(costed ? [["cost", "$/1k"]] : []), ["recipe", "recipe"]];
  const value = (e, key) => key.startsWith("task:") ? (e.scores || {})[key.slice(5)] ?? null :
    ({id: e.id, stage: e.stage, status: e.status, objective: e.objective, mean: e.mean_score, cost: e.cost_per_1k,
      recipe: e.recipe})[key];
  const table = document.getElementById("candidates-table");
  const head = el("tr", {});
  for (const [key, label] of columns) {
    const th = el("th", {"data-key": key, class: key === "recipe" || key === "status" ? "text" : ""}, label);
    sortableHeader("candidates-table", th, key, () => renderCandidates(lastRun));
    head.append(th);
  }
  table.querySelector("thead").replaceChildren(head);
  const rows = sortRows("candidates-table", run.evaluations, value).map((e) => {
    const selected = state.candidate && state.candidate.run === run.name && state.candidate.id === e.id;
    const row = el("tr", {"data-id": e.id, class: (e.status !== "ok" ? "failed " : "") + (selected ? "selected" : ""),
                          onclick: () => showCandidate(run.name, e.id)});
    for (const [key] of columns) {
      const v = value(e, key);
      row.append(key === "recipe" ? el("td", {class: "recipe", title: e.reason || v}, e.status === "ok" ? v : e.reason) :
                 el("td", {class: key === "status" ? "text" : ""}, fmt(v)));
    }
    return row;
  });
  table.querySelector("tbody").replaceChildren(...rows);
}

async function showCandidate(runName, id) {
  state.candidate = {run: runName, id};
  document.querySelectorAll("#candidates-table tr.selected").forEach((r) => r.classList.remove("selected"));
  const row = document.querySelector(`#candidates-table tr[data-id="${id}"]`);
  if (row) row.classList.add("selected");
  document.getElementById("candidate-title").textContent = `Candidate ${id}`;
  document.getElementById("recipe-yaml").textContent = "loading…";
  document.getElementById("mergekit-yaml").textContent = "making it (a few seconds)…";
  try {
    const c = await getJSON(`/api/candidate?name=${encodeURIComponent(runName)}&id=${id}`);
    if (!state.candidate || state.candidate.id !== id) return;  // another was clicked meanwhile
    document.getElementById("candidate-title").textContent =
      `Candidate ${id} (stage ${c.stage}, ${c.status}, objective ${fmt(c.objective)})`;
    document.getElementById("recipe-yaml").textContent = c.recipe_yaml;
    document.getElementById("mergekit-yaml").textContent = c.mergekit.yaml || c.mergekit.error;
  } catch (error) {
    document.getElementById("recipe-yaml").textContent = String(error.message || error);
    document.getElementById("mergekit-yaml").textContent = "";
  }
}

// ---- routing and polling ------------------------------------------------------------------
function currentRun() {
  const match = location.hash.match(/^#\/run\/(.+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

async function refresh() {
  if (state.busy) return;  // a slow answer: skip this tick rather than pile up requests
  state.busy = true;
  const name = currentRun();
  document.getElementById("list-view").hidden = name !== null;
  document.getElementById("run-view").hidden = name === null;
  try {
    await (name === null ? refreshList() : refreshRun(name));
    state.polls += 1;
    document.body.dataset.polls = state.polls;
    document.getElementById("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("refreshed").textContent = "cannot reach the dashboard: " + (error.message || error);
  } finally {
    state.busy = false;
  }
}

window.addEventListener("hashchange", () => {
  state.candidate = null;
  document.getElementById("candidate-title").textContent = "No candidate chosen";
  document.getElementById("recipe-yaml").textContent = "";
  document.getElementById("mergekit-yaml").textContent = "";
  refresh();
});
refresh();
setInterval(refresh, POLL_MS);
