// closedloop dashboard: state from /api/state, live events from /events (server-sent), charts in inline SVG.
// No library and nothing from the network: the page must work in a lab with no internet.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const headers = token ? { "X-Closedloop-Token": token } : {};
// the token travels in a header: an address is kept by proxies' access logs and browser history. Only the event
// stream, which cannot set a header, carries it in its address
const withToken = (url) => (token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url);
const SVG = "http://www.w3.org/2000/svg";

let state = null;
let selected = null; // campaign whose charts are drawn
let modelKey = "";
let refreshTimer = null;
let readOnly = false;

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};
const fmt = (v) => (v === null || v === undefined ? "" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(5)) : String(v));
const fmtValues = (o) => (o ? Object.entries(o).map(([k, v]) => `${k}=${fmt(v)}`).join(", ") : "");
const seconds = (s) => (s === null || s === undefined ? "-" : s < 60 ? `${s.toFixed(0)} s` : s < 3600 ? `${Math.floor(s / 60)} min ${String(Math.floor(s % 60)).padStart(2, "0")} s` : `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`);

function say(text, error = false) {
  const box = $("#message");
  box.hidden = false;
  box.textContent = text;
  box.className = error ? "error" : "";
}

async function getJSON(url) {
  const reply = await fetch(url, { headers, cache: "no-store" });
  if (!reply.ok && reply.status !== 404) {
    // the server's reason where it gives one (a store it cannot read): "HTTP 503" alone said nothing
    const body = await reply.json().catch(() => ({}));
    throw new Error(body.msg || `${url}: HTTP ${reply.status}`);
  }
  return reply.json();
}

async function control(method, extra = {}) {
  if (readOnly) {
    say(state && state.read_only_reason ? state.read_only_reason : "this dashboard is read-only", true);
    return;
  }
  try {
    const reply = await fetch("api/control", {
      method: "POST",
      headers: { ...headers, "Content-Type": "application/json" },
      body: JSON.stringify({ method, ...extra }),
    });
    const body = await reply.json();
    say(body.msg || `${method}: ${reply.status}`, !body.success);
  } catch (err) {
    say(`${method} failed: ${err}`, true);
  }
  refresh();
}

// -- state ------------------------------------------------------------------------------------------

async function refresh() {
  try {
    state = await getJSON("api/state");
  } catch (err) {
    $("#daemon-state").textContent = "dashboard unreachable";
    $("#daemon-state").className = "pill bad";
    if (!(err instanceof TypeError)) say(err.message, true); // TypeError: no answer at all; else the server's reason
    return;
  }
  readOnly = state.read_only;
  const ro = $("#read-only");
  ro.hidden = !readOnly;
  ro.textContent = "read-only";
  ro.title = state.read_only_reason || "";
  document.body.classList.toggle("read-only", readOnly);
  const daemon = state.daemon;
  const ds = $("#daemon-state");
  if (!daemon) { ds.textContent = "no daemon (store only)"; ds.className = "pill"; }
  else if (daemon.success === false) { ds.textContent = "daemon not answering"; ds.className = "pill bad"; ds.title = daemon.msg; }
  else { ds.textContent = daemon.stopping ? "daemon stopping" : `daemon up ${seconds(daemon.uptime_s)}`; ds.className = daemon.stopping ? "pill warn" : "pill ok"; }
  $("#stop-daemon").disabled = readOnly || !daemon || daemon.success === false;
  if (!selected || !state.campaigns.some((c) => c.name === selected)) {
    const live = state.campaigns.find((c) => c.live);
    selected = (live || state.campaigns[0] || {}).name || null;
  }
  drawCampaigns();
  drawStations();
  const campaign = state.campaigns.find((c) => c.name === selected);
  if (campaign) {
    drawBest(campaign);
    drawPareto(campaign);
    drawHeld(campaign);
    drawTrials(campaign);
    updateModel(campaign);
  }
}

function scheduleRefresh(delay = 250) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, delay);
}

function campaignState(c) {
  if (c.live) return c.live.stopping ? "stopping" : c.live.paused ? "paused" : "running";
  return c.status;
}

function drawCampaigns() {
  const box = $("#campaigns");
  box.replaceChildren();
  for (const c of state.campaigns) {
    const card = el("div", { class: "card", "data-campaign": c.name });
    const finished = ["completed", "failed", "abandoned"].reduce((n, s) => n + (c.counts[s] || 0), 0);
    const st = campaignState(c);
    const h = el("h3");
    h.append(el("span", {}, c.name), el("span", { class: `state state-${st}`, "data-state": st }, st));
    const pause = el("button", { class: "pause", "data-campaign": c.name }, "pause");
    const resume = el("button", { class: "resume", "data-campaign": c.name }, "resume");
    pause.disabled = readOnly || !c.live || c.live.paused;
    resume.disabled = readOnly || !c.live || !c.live.paused;
    pause.onclick = () => control("pause", { campaign: c.name });
    resume.onclick = () => control("resume", { campaign: c.name });
    const show = el("button", {}, c.name === selected ? "shown below" : "show");
    show.disabled = c.name === selected;
    show.onclick = () => { selected = c.name; modelKey = ""; refresh(); };
    h.append(pause, resume, show);
    card.append(h);
    const bar = el("div", { class: "bar" });
    // with a budget in cost, of its experiments or of its cost, whichever is further (as `closedloop status`)
    const cost = c.cost_budget !== null && c.cost_budget !== undefined;
    const spent = cost ? Math.max(c.experiments ? finished / c.experiments : 0, c.spent / c.cost_budget) : finished / c.budget;
    bar.append(el("div", { style: `width:${Math.min(100, 100 * spent)}%` }));
    card.append(bar);
    const best = c.series.length && c.series[c.series.length - 1].best !== null ? c.series[c.series.length - 1] : null;
    const objectives = c.objectives.map((o) => `${o.goal} ${o.name}`).join(", ");
    const counts = Object.entries(c.counts).map(([k, v]) => `${v} ${k}`).join(", ");
    const done = cost ? `cost ${fmt(Number(c.spent.toPrecision(4)))}/${c.cost_budget}, ${finished}${c.experiments ? `/${c.experiments}` : ""} experiments`
      : `${finished}/${c.budget} done`;
    let line = `${done} (${counts || "none yet"}); ${objectives}; planner ${c.backend}`;
    if (best) line += `; best ${c.objectives[0].name}=${fmt(best.best)}`;
    if (c.live && c.live.planner_error) line += `; planner error: ${c.live.planner_error}`;
    card.append(el("div", {}, line));
    box.append(card);
  }
}

function drawStations() {
  const body = $("#stations tbody");
  body.replaceChildren();
  const daemon = state.daemon;
  if (!daemon || daemon.success === false) {
    const tr = el("tr");
    tr.append(el("td", { colspan: 6 }, daemon ? daemon.msg : "no daemon control endpoint: stations unknown"));
    body.append(tr);
    return;
  }
  const flights = [];
  for (const c of daemon.campaigns || []) for (const f of c.in_flight) flights.push({ ...f, campaign: c.name });
  for (const s of daemon.stations || []) {
    const mine = flights.filter((f) => f.station === s.name);
    const health = s.last_seen_s < 3 ? "ok" : s.last_seen_s < 10 ? "late" : "silent";
    const tr = el("tr", { "data-station": s.name });
    const healthCell = el("td");
    healthCell.append(el("span", { class: `pill ${health === "ok" ? "ok" : health === "late" ? "warn" : "bad"}` }, health));
    tr.append(
      el("td", {}, s.name), healthCell,
      el("td", {}, mine.map((f) => `#${f.trial} ${f.campaign}${f.started ? "" : " (queued)"}`).join(", ") || "idle"),
      el("td", {}, mine.map((f) => seconds(f.age_s)).join(", ") || "-"),
      el("td", {}, `${s.running.length}/${s.capacity}`),
      el("td", {}, `${s.last_seen_s.toFixed(1)} s ago`),
    );
    body.append(tr);
  }
  if (!(daemon.stations || []).length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: 6 }, "no station connected"));
    body.append(tr);
  }
}

// -- charts -----------------------------------------------------------------------------------------

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const out = [];
  // each tick a whole number of steps: adding the step up from below drifted, and zero was drawn as 1.73472e-18
  for (let i = Math.ceil(lo / step); i * step <= hi + 1e-9 * step; i++) out.push(Number((i * step).toPrecision(12)));
  return out;
}

const tickText = (t) => String(Number(t.toPrecision(6)));

function frame(svg, xr, yr, xlabel, ylabel) {
  svg.replaceChildren();
  const W = 560, H = 300, L = 58, R = 12, T = 10, B = 36;
  const pad = (r) => (r[1] > r[0] ? r : [r[0] - 1, r[0] + 1]);
  xr = pad(xr); yr = pad(yr);
  const sx = (x) => L + ((x - xr[0]) / (xr[1] - xr[0])) * (W - L - R);
  const sy = (y) => H - B - ((y - yr[0]) / (yr[1] - yr[0])) * (H - T - B);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  for (const t of ticks(yr[0], yr[1])) {
    add("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" });
    add("text", { x: L - 4, y: sy(t) + 4, "text-anchor": "end" }, tickText(t));
  }
  for (const t of ticks(xr[0], xr[1], 8)) add("text", { x: sx(t), y: H - B + 14, "text-anchor": "middle" }, tickText(t));
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  add("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, xlabel);
  add("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle" }, ylabel);
  return { sx, sy, add };
}

function extent(values) {
  // a loop: Math.min(...v) passes every value as an argument, and past about 120,000 (a campaign of 60,000 results,
  // value and best each) the stack overflowed on every redraw, leaving the held proposals and trials undrawn
  let lo = Infinity, hi = -Infinity;
  for (const x of values) if (x !== null && x !== undefined && Number.isFinite(x)) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
  return lo <= hi ? [lo, hi] : [0, 1];
}

function drawBest(c) {
  const svg = $("#best-plot");
  const s = c.series;
  // a long campaign's series comes thinned (the best line's steps and each run's extremes): count the results
  const results = c.results ?? s.length;
  svg.setAttribute("data-count", String(results));
  const obj = c.objectives[0];
  $("#best-caption").textContent = `${c.name}: ${obj.goal} ${obj.name}, ${results} experiments` +
    (s.length < results ? ` (${s.length} drawn: every step of the best and each stretch's lowest and highest)` : "");
  const lastTrial = Math.max(1, ...c.trials.map((t) => t.trial));
  const { sx, sy, add } = frame(svg, [0, lastTrial], extent(s.flatMap((p) => [p.value, p.best])), "experiment number", obj.name);
  // a result that breaks an outcome constraint (or comes from a cheaper source) is drawn hollow and is never the best
  for (const p of s) add("circle", { cx: sx(p.trial), cy: sy(p.value), r: 3, fill: p.counts === false ? "none" : "#9bb4d6", stroke: "#9bb4d6" }).append(Object.assign(document.createElementNS(SVG, "title"), { textContent: `#${p.trial}: ${fmt(p.value)}${p.counts === false ? " (not counted: outcome constraint or source)" : ""}` }));
  const line = s.filter((p) => p.best !== null);
  if (line.length) {
    let d = `M${sx(line[0].trial)},${sy(line[0].best)}`;
    for (let i = 1; i < line.length; i++) d += `H${sx(line[i].trial)}V${sy(line[i].best)}`;
    d += `H${sx(lastTrial)}`;
    add("path", { d, fill: "none", stroke: "#1f5fbf", "stroke-width": 2, class: "best-line" });
  }
  // every failure, those before the trials table's window too (their error is in the trial's provenance)
  const errors = new Map(c.trials.map((t) => [t.trial, t.error]));
  for (const f of c.failures) {
    add("text", { x: sx(f.trial), y: 22, "text-anchor": "middle", fill: "#c62828" }, "×").append(Object.assign(document.createElementNS(SVG, "title"), { textContent: `#${f.trial} ${f.status}: ${errors.get(f.trial) || ""}` }));
  }
}

function drawPareto(c) {
  const box = $("#pareto-box");
  box.hidden = !c.pareto;
  if (!c.pareto) return;
  const p = c.pareto;
  $("#pareto-caption").textContent = `hypervolume ${fmt(p.hypervolume)} (${p.points.filter((q) => q.front).length} on the front)`;
  const { sx, sy, add } = frame($("#pareto-plot"), extent(p.points.map((q) => q.x)), extent(p.points.map((q) => q.y)), p.x, p.y);
  // a result outside the outcome constraints is drawn hollow: it may beat the front and yet not be on it
  for (const q of p.points) add("circle", { cx: sx(q.x), cy: sy(q.y), r: q.front ? 4.5 : 3, fill: q.front ? "#d1495b" : q.counts === false ? "none" : "#b8c4d4", stroke: q.front ? "none" : "#b8c4d4" }).append(Object.assign(document.createElementNS(SVG, "title"), { textContent: `#${q.trial}: ${p.x}=${fmt(q.x)}, ${p.y}=${fmt(q.y)}${q.counts === false ? " (not counted: breaks an outcome constraint)" : ""}` }));
  const front = p.points.filter((q) => q.front).sort((a, b) => a.x - b.x);
  if (front.length > 1) add("polyline", { points: front.map((q) => `${sx(q.x)},${sy(q.y)}`).join(" "), fill: "none", stroke: "#d1495b", "stroke-dasharray": "4 3" });
}

async function updateModel(c) {
  const select = $("#model-parameter");
  const numeric = Object.entries(c.parameters).filter(([, p]) => p.type === "continuous" || p.type === "integer").map(([n]) => n);
  if ([...select.options].map((o) => o.value).join() !== numeric.join()) {
    select.replaceChildren(...numeric.map((n) => el("option", { value: n }, n)));
  }
  const second = $("#model-second");
  const others = ["", ...numeric.filter((n) => n !== select.value)];
  if ([...second.options].map((o) => o.value).join() !== others.join()) {
    const keep = second.value;
    second.replaceChildren(...others.map((n) => el("option", { value: n }, n ? `and ${n}` : "(one parameter)")));
    second.value = others.includes(keep) ? keep : "";
  }
  const finished = (c.counts.completed || 0) + (c.counts.failed || 0);
  const key = `${c.name}|${finished}|${select.value}|${second.value}`;
  if (key === modelKey) return;
  modelKey = key;
  let view;
  try {
    view = await getJSON(`api/model?campaign=${encodeURIComponent(c.name)}&parameter=${encodeURIComponent(select.value)}` +
      `&second=${encodeURIComponent(second.value)}`);
  } catch (err) {
    $("#model-caption").textContent = String(err);
    return;
  }
  const svg = $("#model-plot");
  if (!view.available) {
    svg.replaceChildren();
    $("#model-plane").style.display = "none";
    $("#model-caption").textContent = view.reason || "no model yet";
    return;
  }
  // failures apart from results: they have no value, and the model takes them as where experiments fail
  const data = view.failures ? `${view.results} results; ${view.failures} failure${view.failures === 1 ? "" : "s"}, modelled as where experiments fail;`
    : `${view.results} results,`;
  $("#model-caption").textContent = `${view.objective} along ${view.parameter} through best #${view.best_trial} (${data} ${view.backend})`;
  const lo = view.mean.map((m, i) => m - 2 * view.std[i]);
  const hi = view.mean.map((m, i) => m + 2 * view.std[i]);
  const { sx, sy, add } = frame(svg, extent(view.x), extent([...lo, ...hi, ...view.observed.map((o) => o.y)]), view.parameter, view.objective);
  const band = view.x.map((x, i) => `${sx(x)},${sy(hi[i])}`).concat(view.x.slice().reverse().map((x, j) => `${sx(x)},${sy(lo[view.x.length - 1 - j])}`));
  add("polygon", { points: band.join(" "), fill: "#1f5fbf", "fill-opacity": 0.15, stroke: "none" });
  add("polyline", { points: view.x.map((x, i) => `${sx(x)},${sy(view.mean[i])}`).join(" "), fill: "none", stroke: "#1f5fbf", "stroke-width": 2 });
  for (const o of view.observed) add("circle", { cx: sx(o.x), cy: sy(o.y), r: 2.5, fill: "#555", "fill-opacity": 0.6 });
  const bx = view.through[view.parameter];
  add("line", { x1: sx(bx), x2: sx(bx), y1: 10, y2: 264, stroke: "#d1495b", "stroke-dasharray": "3 3" });
  drawPlane(view);
}

function drawPlane(view) {
  const svg = $("#model-plane");
  svg.style.display = view.grid ? "" : "none"; // an SVG element has no `hidden` property
  if (!view.grid) return;
  const gx = view.grid_x, gy = view.grid_y;
  const half = (values, i) => ((i > 0 ? values[i] - values[i - 1] : values[1] - values[0]) / 2);
  // the cells are centred on the grid points: the axes reach half a cell beyond the first and last
  const span = (values) => [values[0] - half(values, 0), values[values.length - 1] + half(values, values.length - 1)];
  const { sx, sy, add } = frame(svg, span(gx), span(gy), view.parameter, view.second);
  const [lo, hi] = extent(view.grid.flat());
  const colour = (v) => {
    const t = hi > lo ? (v - lo) / (hi - lo) : 0.5; // light = low, dark = high
    const mix = (a, b) => Math.round(a + (b - a) * t);
    return `rgb(${mix(239, 8)},${mix(246, 48)},${mix(255, 107)})`;
  };
  for (let j = 0; j < gy.length; j++) {
    for (let i = 0; i < gx.length; i++) {
      const x0 = sx(gx[i] - half(gx, i)), x1 = sx(gx[i] + half(gx, i));
      const y0 = sy(gy[j] + half(gy, j)), y1 = sy(gy[j] - half(gy, j));
      add("rect", { x: Math.min(x0, x1), y: Math.min(y0, y1), width: Math.abs(x1 - x0) + 0.5, height: Math.abs(y1 - y0) + 0.5, fill: colour(view.grid[j][i]) })
        .append(Object.assign(document.createElementNS(SVG, "title"), { textContent: `${view.parameter}=${fmt(gx[i])}, ${view.second}=${fmt(gy[j])}: ${view.objective} ${fmt(view.grid[j][i])}` }));
    }
  }
  for (const o of view.observed) if (o.x2 !== undefined) add("circle", { cx: sx(o.x), cy: sy(o.x2), r: 2.5, fill: "#fff", stroke: "#333" });
  const b = view.through;
  add("path", { d: `M${sx(b[view.parameter]) - 6},${sy(b[view.second])}h12M${sx(b[view.parameter])},${sy(b[view.second]) - 6}v12`, stroke: "#d1495b", "stroke-width": 2.5 });
  $("#model-caption").textContent += `; plane: ${view.objective} from ${fmt(lo)} (light) to ${fmt(hi)} (dark)`;
}

// -- tables -------------------------------------------------------------------------------------------

function drawHeld(c) {
  const box = $("#held-box");
  box.hidden = !c.held.length;
  const body = $("#held tbody");
  // the table is redrawn on every event and every 2 s: keep what the scientist is typing, and where
  const typed = new Map();
  let focused = null;
  for (const input of body.querySelectorAll("input.edit")) {
    const key = `${input.closest("tr").dataset.trial}:${input.name}`;
    if (input.value !== input.dataset.proposed) typed.set(key, input.value);
    if (input === document.activeElement) focused = [key, input.selectionStart, input.selectionEnd];
  }
  body.replaceChildren();
  for (const t of c.held) {
    const tr = el("tr", { "data-trial": t.trial });
    const inputs = el("td");
    for (const [name, value] of Object.entries(t.parameters)) {
      const label = el("label", {}, `${name} `);
      const key = `${t.trial}:${name}`;
      const input = el("input", { class: "edit", name, value: typed.has(key) ? typed.get(key) : String(value) });
      input.dataset.proposed = String(value);
      input.disabled = readOnly;
      if (focused && focused[0] === key) queueMicrotask(() => { input.focus(); input.setSelectionRange(focused[1], focused[2]); });
      label.append(input);
      inputs.append(label, " ");
    }
    const approve = el("button", { class: "approve" }, "approve");
    const reject = el("button", { class: "reject" }, "reject");
    approve.disabled = reject.disabled = readOnly;
    approve.onclick = () => {
      const edits = {};
      for (const input of inputs.querySelectorAll("input")) if (input.value !== String(t.parameters[input.name])) edits[input.name] = input.value;
      control("approve", { campaign: c.name, trial: t.trial, parameters: edits });
    };
    reject.onclick = () => control("reject", { campaign: c.name, trial: t.trial });
    const actions = el("td");
    actions.append(approve, " ", reject);
    tr.append(el("td", {}, `#${t.trial}`), inputs, el("td", {}, predicted(t, c)), actions);
    body.append(tr);
  }
}

function predicted(t, c) {
  const p = t.predicted && t.predicted[c.objectives[0].name];
  return p ? `${fmt(p.mean)} ± ${fmt(p.std)}` : "";
}

function drawTrials(c) {
  const names = Object.keys(c.parameters);
  const columns = ["trial", "status", ...names, ...c.outputs, "generator", "acquisition", "predicted", "review", "station", "error"];
  const head = $("#trials thead");
  if (head.dataset.columns !== columns.join()) {
    head.dataset.columns = columns.join();
    const tr = el("tr");
    for (const col of columns) tr.append(el("th", {}, col));
    head.replaceChildren(tr);
  }
  const body = $("#trials tbody");
  body.replaceChildren();
  $("#trials-caption").textContent = `${c.trials.length} trials, newest first; click one for why it was chosen`;
  for (const t of c.trials.slice().reverse()) {
    const tr = el("tr", { class: `${t.status} clickable`, "data-trial": t.trial });
    const cells = [t.trial, t.status, ...names.map((n) => t.parameters[n]), ...c.outputs.map((o) => (t.values ? t.values[o] : null)),
      t.generator, t.acquisition ? `${t.acquisition} ${fmt(t.acquisition_value)}` : "", predicted(t, c), t.review, t.station, t.error];
    for (const v of cells) tr.append(el("td", {}, fmt(v)));
    tr.onclick = () => showTrial(c.name, t.trial);
    body.append(tr);
  }
}

async function showTrial(campaign, trial) {
  const info = await getJSON(`api/trial?campaign=${encodeURIComponent(campaign)}&trial=${trial}`);
  const box = $("#trial-detail");
  box.hidden = false;
  box.querySelector("pre").textContent = info.lines ? info.lines.join("\n") : info.msg;
}

// -- live events ------------------------------------------------------------------------------------

function connectEvents() {
  const status = $("#stream-state");
  const source = new EventSource(withToken("events"));
  source.onopen = () => { if (state === null || state.events) { status.textContent = "events: live"; status.className = "pill ok"; } };
  source.onerror = () => { status.textContent = "events: reconnecting"; status.className = "pill warn"; };
  source.addEventListener("info", (message) => {
    status.textContent = "events: none (polling the store)";
    status.className = "pill";
    status.title = JSON.parse(message.data).msg;
  });
  source.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    const list = $("#events");
    const time = (event.time || "").slice(11, 19);
    const what = [event.campaign, event.trial !== undefined ? `#${event.trial}` : "", event.station || "",
      event.values ? fmtValues(event.values) : "", event.error || ""].filter(Boolean).join(" ");
    list.prepend(el("li", {}, `${time} ${event.kind} ${what}`));
    while (list.children.length > 60) list.lastChild.remove();
    scheduleRefresh();
  };
}

$("#stop-daemon").onclick = () => { if (confirm("Stop the daemon? Experiments in flight finish; nothing new is dispatched.")) control("stop"); };
$("#close-detail").onclick = () => { $("#trial-detail").hidden = true; };
$("#model-parameter").onchange = () => { modelKey = ""; refresh(); };
$("#model-second").onchange = () => { modelKey = ""; refresh(); };
refresh();
connectEvents();
setInterval(refresh, 2000); // ticks "running for" and catches events a PUB/SUB stream dropped
