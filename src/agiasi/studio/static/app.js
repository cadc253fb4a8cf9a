// agiasi studio: the page's behaviour. Everything from the server (model names, dataset text,
// error lines, logs) is put into the page with textContent, never as markup.
"use strict";

const I18N = JSON.parse(document.getElementById("i18n").textContent);
const T = (k) => I18N.text[k] || k;
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Agiasi-Studio": "1"},
    body: JSON.stringify(body),
  };
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = {error: r.statusText}; }
  if (!r.ok) { const err = new Error(data.error || r.statusText); err.status = r.status; err.data = data; throw err; }
  return data;
}

// ------------------------------------------------------------------ tabs (the hash keeps them)

let shownTab = null;
function showTab(name) {
  if (shownTab === "chat" && name !== "chat") releaseChat();
  shownTab = name;
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== "tab-" + name;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  if (name === "runs") refreshRuns();
  if (name === "export") { refreshExports(); exportCommand(); }
  if (name === "eval") { refreshEvals(); evalCommand(); }
}
for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => { location.hash = b.dataset.tab; });
function route() {
  const h = decodeURIComponent(location.hash.slice(1));
  if (h.startsWith("run=")) { showTab("runs"); watch(h.slice(4)); return; }
  if (h.startsWith("export=")) { showTab("export"); viewExport(h.slice(7)); return; }
  if (h.startsWith("eval=")) { showTab("eval"); viewEval(h.slice(5)); return; }
  showTab(["model", "data", "train", "runs", "export", "eval", "chat"].includes(h) ? h : "model");
}
window.addEventListener("hashchange", route);

// ------------------------------------------------------------------ the form's fields

const form = $("train-form");
form.addEventListener("submit", (e) => e.preventDefault());
function field(name) { return form.elements.namedItem(name); }
function setField(name, value) {
  const f = field(name);
  if (!f) return;
  if (f.type === "checkbox") f.checked = !!value; else f.value = value;
  scheduleCommand();
}
function formValues() {
  const values = {};
  for (const f of form.elements) {
    if (!f.name) continue;
    if (f.type === "checkbox") values[f.name] = f.checked;
    else if (f.value.trim() !== "") values[f.name] = f.value.trim();
  }
  return values;
}

// ------------------------------------------------------------------ model

$("use-shipped").addEventListener("click", async () => {
  const s = await api("/api/shipped");
  $("model").value = s.model;
  showInfo();
});
$("show-info").addEventListener("click", showInfo);
async function showInfo() {
  const model = $("model").value.trim();
  $("model-error").textContent = "";
  const table = $("model-info");
  table.replaceChildren();
  setField("base_model", model);
  try {
    const info = await api("/api/info?model=" + encodeURIComponent(model));
    for (const [k, v] of Object.entries(info)) {
      const tr = el("tr");
      tr.append(el("th", k), el("td", typeof v === "object" ? JSON.stringify(v) : v));
      table.append(tr);
    }
  } catch (e) { $("model-error").textContent = e.message; }
}

// ------------------------------------------------------------------ data

$("use-sample").addEventListener("click", async () => {
  const s = await api("/api/shipped");
  $("data-path").value = s.dataset;
  preview();
});
$("preview").addEventListener("click", preview);
$("upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  $("data-error").textContent = "";
  const r = await fetch("/api/upload?name=" + encodeURIComponent(file.name), {
    method: "POST", headers: {"X-Agiasi-Studio": "1"}, body: file,
  });
  const data = await r.json();
  if (!r.ok) { $("data-error").textContent = data.error; return; }
  $("data-path").value = data.name;
  listFiles("");
  preview();
});

async function listFiles(dir) {
  const ul = $("files");
  try {
    const r = await api("/api/files?dir=" + encodeURIComponent(dir));
    ul.replaceChildren();
    if (r.dir !== ".") {
      const up = el("li", "..", "dir");
      up.addEventListener("click", () => listFiles(r.dir.split("/").slice(0, -1).join("/")));
      ul.append(up);
    }
    for (const e of r.entries) {
      const li = el("li", e.dir ? e.name + "/" : `${e.name} (${e.size.toLocaleString()} B)`, e.dir ? "dir" : "file");
      li.addEventListener("click", () => {
        if (e.dir) listFiles(e.name); else { $("data-path").value = e.name; preview(); }
      });
      ul.append(li);
    }
  } catch (e) { ul.replaceChildren(el("li", e.message, "error")); }
}

function marked(text) {
  // the preview marks trained spans ⟦like this⟧: shown highlighted, as text
  const out = el("pre", null, "example");
  const parts = String(text).split(/(⟦[\s\S]*?⟧)/);
  for (const p of parts) {
    if (p.startsWith("⟦") && p.endsWith("⟧")) out.append(el("mark", p.slice(1, -1)));
    else if (p) out.append(document.createTextNode(p));
  }
  return out;
}

async function preview() {
  const dataset = $("data-path").value.trim();
  const box = $("data-summary");
  $("data-error").textContent = "";
  box.replaceChildren();
  setField("dataset", dataset);
  setField("dataset_columns", $("data-columns").value.trim());
  if ($("data-max-length").value.trim()) setField("max_length", $("data-max-length").value.trim());
  try {
    const s = await api("/api/data", {
      dataset, base_model: $("model").value.trim() || null,
      max_length: $("data-max-length").value.trim() || null,
      dataset_columns: $("data-columns").value.trim() || null,
    });
    for (const src of s.sources) {
      const div = el("div", null, "source");
      div.append(el("h4", `${src.source} — ${src.kind}, ${src.formats.join(", ")}`));
      const table = el("table", null, "kv");
      const rows = [[T("records"), src.records], [T("tokens"), src.tokens],
                    [T("cut"), `${src.truncated} / ${src.pairs || src.chat_examples || src.records}`]];
      if (src.roles && Object.keys(src.roles).length) rows.push([T("roles"), JSON.stringify(src.roles)]);
      for (const [k, v] of rows) { const tr = el("tr"); tr.append(el("th", k), el("td", v)); table.append(tr); }
      div.append(table);
      if (src.example) { div.append(el("h5", T("example")), marked(src.example)); }
      if (src.example_chosen) {
        div.append(el("h5", T("chosen")), marked(src.example_chosen), el("h5", T("rejected")), marked(src.example_rejected));
      }
      if (src.text_example) div.append(el("pre", src.text_example, "example"));
      box.append(div);
    }
    for (const n of s.notes || []) box.append(el("p", n, "note"));
  } catch (e) { $("data-error").textContent = e.message; }
}

// ------------------------------------------------------------------ the command and the start

let commandTimer = null;
function scheduleCommand() { clearTimeout(commandTimer); commandTimer = setTimeout(showCommand, 250); }
form.addEventListener("input", scheduleCommand);
form.addEventListener("change", scheduleCommand);
let lastCommand = null;

function showError(message) {
  for (const e of form.querySelectorAll(".error")) e.textContent = "";
  for (const e of form.querySelectorAll(".field.bad")) e.classList.remove("bad");
  $("form-error").textContent = message || "";
  if (!message) return;
  const m = message.match(/--([a-z0-9-]+)/);
  if (m) {
    const name = m[1].replace(/-/g, "_");
    const target = $("e-" + name);
    if (target) { target.textContent = message; target.parentElement.classList.add("bad"); }
  }
}

async function showCommand() {
  try {
    const r = await api("/api/command", {values: formValues()});
    showError("");
    $("command").textContent = r.command;
    $("yaml").textContent = r.yaml;
    lastCommand = r;
    $("start").disabled = false;
    scheduleEstimate();
  } catch (e) {
    showError(e.message);
    $("command").textContent = "";
    $("yaml").textContent = "";
    $("start").disabled = true;
  }
}

// the estimate: agiasi estimate on the form's values, the newest answer only
let estimateTimer = null, estimateSeq = 0;
function scheduleEstimate() { clearTimeout(estimateTimer); estimateTimer = setTimeout(showEstimate, 400); }
const gib = (v) => v.toFixed(2) + " GiB";

async function showEstimate() {
  const seq = ++estimateSeq;
  const box = $("estimate");
  box.dataset.state = "busy";
  try {
    const e = await api("/api/estimate", {values: formValues()});
    if (seq !== estimateSeq) return;
    let peak = `${T("estimate_peak")}: ${gib(e.card_gib)} (${gib(e.reserved_gib)} ${T("estimate_reserved")} + ${gib(e.card_gib - e.reserved_gib)} ${T("estimate_context")}); ${T("estimate_host")} ${gib(e.host_gib)}`;
    if (e.gpu) {
      peak += ` — ${T("estimate_gpu_here")}: ${gib(e.gpu.free_gib)} ${T("estimate_free")} / ${gib(e.gpu.total_gib)}`;
      if (e.reserved_gib > e.gpu.free_gib) peak += ` — ${T("estimate_over")}`;
    }
    $("estimate-peak").textContent = peak;
    const table = $("estimate-parts");
    table.textContent = "";
    const parts = {...e.gpu_gib, allocator: e.reserved_gib - e.allocated_gib};
    for (const [k, v] of Object.entries(parts)) {
      const row = table.insertRow();
      row.dataset.part = k;
      row.insertCell().textContent = T("estimate_part_" + k);
      row.insertCell().textContent = gib(v);
    }
    const d = e.data || {};
    const n = (v) => Number(v).toLocaleString(I18N.lang);
    $("estimate-notes").textContent = d.error ? T("estimate_no_data") + d.error
      : T("estimate_data").replace("{tokens}", n(d.tokens)).replace("{approx}", d.sampled ? T("estimate_sampled") : "")
          .replace("{batch}", n(e.tokens_per_micro_batch / d.length)).replace("{length}", n(d.length))
          .replace("{steps}", n(Math.max(1, Math.floor(d.tokens / e.tokens_per_step))))
          .replace("{per_step}", n(e.tokens_per_step));
    const short = $("estimate-short");
    short.textContent = `${T("estimate_short")} ${gib(e.card_gib)}`;
    short.classList.toggle("over", !!(e.gpu && e.reserved_gib > e.gpu.free_gib));
    box.dataset.card = String(e.card_gib);
    box.dataset.state = "done";
  } catch (err) {
    if (seq !== estimateSeq) return;
    $("estimate-peak").textContent = err.message;
    $("estimate-parts").textContent = "";
    $("estimate-short").textContent = "";
    box.dataset.state = "error";
  }
}

for (const b of document.querySelectorAll(".copy")) {
  b.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($(b.dataset.copy).textContent));
}

async function postRun(path, body) {
  try {
    return await api(path, body);
  } catch (e) {
    if (e.status === 409 && e.data && e.data.warning === "busy") {
      if (!confirm(T("busy") + "\n" + e.data.running.join("\n"))) return null;
      return await api(path, {...body, force: true});
    }
    throw e;
  }
}

$("start").addEventListener("click", async () => {
  try {
    const r = await postRun("/api/runs", {values: formValues()});
    if (r) location.hash = "run=" + encodeURIComponent(r.run);
  } catch (e) { showError(e.message); }
});

// ------------------------------------------------------------------ runs

async function refreshRuns() {
  const table = $("runs");
  try {
    const r = await api("/api/runs");
    table.replaceChildren();
    if (!r.runs.length) { table.append(el("tr", T("no_runs"))); return; }
    for (const run of r.runs) {
      const tr = el("tr", null, "run-row");
      tr.dataset.run = run.name;
      const name = el("td");
      const a = el("a", run.name);
      a.href = "#run=" + encodeURIComponent(run.name);
      name.append(a);
      const state = el("td", T(run.state), "state " + run.state);
      if (run.error) state.append(el("div", run.error, "error"));
      const best = run.best ? `${T("best")} ${run.best.step}` : "";
      tr.append(name, state, el("td", `${run.step ?? "–"} / ${run.max_steps ?? "?"}`), el("td", run.method || ""), el("td", best));
      table.append(tr);
    }
  } catch (e) { table.replaceChildren(el("tr", e.message, "error")); }
}
setInterval(() => { if (!$("tab-runs").hidden) refreshRuns(); }, 3000);

// ------------------------------------------------------------------ watching one run

const PHASE_COLORS = {"🔵": "rgba(13,110,253,0.08)", "🟡": "rgba(255,193,7,0.15)", "🟢": "rgba(25,135,84,0.15)", "🟣": "rgba(111,66,193,0.12)"};
const CHARTS = [
  {key: "loss", title: "chart_loss", series: [["task_loss", "#333"], ["eval_loss", "#fd7e14"]]},
  {key: "rewards", title: "chart_rewards", series: [["rewards/chosen", "#198754"], ["rewards/rejected", "#dc3545"], ["margin", "#333"]], only: "margin"},
  {key: "lr", title: "chart_lr", series: [["lr", "#6f42c1"]], sci: true},
  {key: "alpha", title: "chart_alpha", series: [["alpha", "#0d6efd"], ["gate", "#dc3545"]], phases: true},
  {key: "rotation", title: "chart_rotation", series: [["rotation_distance", "#198754"], ["ortho_loss", "#888"]]},
  {key: "speed", title: "chart_speed", series: [["tokens_per_s", "#0dcaf0"]]},
  {key: "memory", title: "chart_memory", series: [["peak_mem_gib", "#6c757d"]]},
];
let current = null;

function watch(name) {
  if (current && current.name === name) return;
  if (current) { current.source.close(); clearInterval(current.timer); }
  $("watch").hidden = false;
  $("watch-title").textContent = name;
  const box = $("charts");
  box.replaceChildren();
  current = {name, rows: [], charts: {}, state: null, dirty: false};
  for (const spec of CHARTS) {
    const div = el("div", null, "chart");
    div.id = "chart-" + spec.key;
    div.dataset.points = "0";
    div.append(el("h4", T(spec.title)));
    box.append(div);
    const opts = {
      width: Math.min(560, box.clientWidth || 560), height: 180,
      scales: {x: {time: false}}, legend: {show: true},
      series: [{label: T("step")}, ...spec.series.map(([k, c]) => ({label: k, stroke: c, width: 1.5, spanGaps: true, points: {show: k.startsWith("eval")}}))],
      axes: [{}, {size: 60}],
    };
    if (spec.phases) opts.hooks = {drawClear: [(u) => drawPhases(u)]};
    if (spec.sci) opts.axes[1].values = (u, vals) => vals.map((v) => (v === 0 ? "0" : v.toExponential(1)));
    current.charts[spec.key] = {spec, div, plot: new uPlot(opts, [[], ...spec.series.map(() => [])], div)};
  }
  const source = new EventSource("/api/events?run=" + encodeURIComponent(name));
  source.addEventListener("metric", (ev) => {
    try { current.rows.push(JSON.parse(ev.data)); current.dirty = true; requestAnimationFrame(redraw); } catch (e) { /* a partial line */ }
  });
  source.addEventListener("reset", () => { current.rows = []; current.dirty = true; requestAnimationFrame(redraw); });
  source.addEventListener("state", (ev) => { current.state = JSON.parse(ev.data); showProgress(); runDetails(); refreshRuns(); });
  current.source = source;
  current.timer = setInterval(runDetails, 2000);
  runDetails();
}

function drawPhases(u) {
  const rows = current ? current.rows : [];
  const ctx = u.ctx;
  let start = null, phase = null;
  const flush = (endStep) => {
    if (phase === null) return;
    const x0 = u.valToPos(start - 0.5, "x", true), x1 = u.valToPos(endStep + 0.5, "x", true);
    ctx.fillStyle = PHASE_COLORS[[...phase][0]] || "transparent";
    ctx.fillRect(x0, u.bbox.top, x1 - x0, u.bbox.height);
  };
  let last = null;
  for (const r of rows) {
    if (!r.phase) continue;
    if (r.phase !== phase) { flush(last); start = r.step; phase = r.phase; }
    last = r.step;
  }
  flush(last);
}

function redraw() {
  if (!current || !current.dirty) return;
  current.dirty = false;
  const rows = current.rows;
  const steps = rows.map((r) => r.step);
  for (const {spec, div, plot} of Object.values(current.charts)) {
    const hasOnly = !spec.only || rows.some((r) => typeof r[spec.only] === "number");
    div.hidden = !hasOnly;
    if (!hasOnly) continue;
    const cols = spec.series.map(([k]) => rows.map((r) => (typeof r[k] === "number" ? r[k] : null)));
    plot.setData([steps, ...cols]);
    div.dataset.points = String(steps.length);
  }
  showProgress();
}

function fmtTime(s) {
  if (!isFinite(s)) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? h + ":" : "") + String(m).padStart(h ? 2 : 1, "0") + ":" + String(sec).padStart(2, "0");
}

function showProgress() {
  if (!current) return;
  const rows = current.rows, st = current.state || {};
  const step = rows.length ? rows[rows.length - 1].step : st.step || 0;
  const total = st.max_steps || "?";
  const times = rows.map((r) => r.step_time_s).filter((x) => typeof x === "number");
  const elapsed = times.reduce((a, b) => a + b, 0);
  const recent = times.slice(-20);
  const per = recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : NaN;
  const remaining = typeof total === "number" ? per * (total - step) : NaN;
  const evals = rows.filter((r) => typeof r.eval_loss === "number");
  const best = evals.length ? evals.reduce((a, b) => (b.eval_loss < a.eval_loss ? b : a)) : null;
  const state = st.state ? T(st.state) : "";
  $("progress").textContent = `${state} · ${T("step")} ${step} / ${total} · ${T("elapsed")} ${fmtTime(elapsed)} · ${T("remaining")} ${fmtTime(remaining)}` + (best ? ` · ${T("best")} ${best.step} (${best.eval_loss.toFixed(4)})` : "");
  $("progress").dataset.state = st.state || "";
  $("progress").dataset.step = String(step);
  const running = st.state === "running" || st.state === "starting";
  $("stop").disabled = !running;
  $("resume").disabled = running || !st.saved_step || (typeof total === "number" && st.saved_step >= total);
  $("run-error").textContent = st.error || "";
}

async function runDetails() {
  if (!current) return;
  try {
    const r = await api("/api/run?run=" + encodeURIComponent(current.name));
    $("log").textContent = r.log.join("\n");
    $("run-command").textContent = r.command || "";
    const links = (id, items, hash, label, none) => {
      const ul = $(id);
      ul.replaceChildren();
      if (!items.length) { ul.append(el("li", T(none), "note")); return; }
      for (const x of items) {
        const li = el("li");
        const a = el("a", label(x));
        a.href = hash(x);
        li.append(a, el("span", " " + T(x.state), "state " + x.state));
        ul.append(li);
      }
    };
    links("run-exports", r.exports || [], (x) => "#export=" + encodeURIComponent(x.name), (x) => x.name, "no_exports");
    links("run-evals", r.evals || [], (x) => "#eval=" + x.id, (x) => `${x.id} (${(x.models || []).map(shortName).join(" · ")})`, "no_evals");
  } catch (e) { $("run-error").textContent = e.message; }
}

$("stop").addEventListener("click", async () => {
  try { await api("/api/runs/stop", {run: current.name}); } catch (e) { $("run-error").textContent = e.message; }
});
$("resume").addEventListener("click", async () => {
  try { await postRun("/api/runs/resume", {run: current.name}); } catch (e) { $("run-error").textContent = e.message; }
});

// ------------------------------------------------------------------ chat

let conversations = [[], []];  // one history a model: their replies differ
let chatController = null;

function addTurn(role, text, where, label) {
  const div = el("div", null, "turn " + role);
  div.append(el("span", label || T(role === "user" ? "you" : "assistant"), "who"));
  const body = el("div", text, "text");
  div.append(body);
  (where || $("chat-log")).append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return body;
}

function readFrames(buffer, onFrame) {
  // server-sent events in a fetch body: frames end with a blank line
  let i;
  while ((i = buffer.indexOf("\n\n")) >= 0) {
    const frame = buffer.slice(0, i);
    buffer = buffer.slice(i + 2);
    let event = "message", data = "";
    for (const line of frame.split("\n")) {
      if (line.startsWith("event: ")) event = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    onFrame(event, data);
  }
  return buffer;
}

async function streamReply(model, messages, reply) {
  // one model's answer, its tokens into `reply` as they come; Stop aborts it
  let got = "", failed = null, stopped = false;
  try {
    const r = await fetch("/api/chat", {
      method: "POST", signal: chatController.signal,
      headers: {"Content-Type": "application/json", "X-Agiasi-Studio": "1"},
      body: JSON.stringify({
        model, messages, system: $("chat-system").value || null,
        temperature: $("chat-temperature").value.trim() || 0, top_p: $("chat-top-p").value.trim() || 0.9,
        max_new_tokens: $("chat-max").value.trim() || 128,
      }),
    });
    if (!r.ok) { failed = (await r.json()).error; }
    else {
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      reply.textContent = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer = readFrames(buffer + decoder.decode(value, {stream: true}), (event, data) => {
          if (event === "token") {
            got += JSON.parse(data);
            reply.textContent = got;
            reply.dataset.tokens = String(+reply.dataset.tokens + 1);
          } else if (event === "error") failed = JSON.parse(data);
        });
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true; else failed = e.message;
  }
  return {got, failed, stopped};
}

const shortName = (path) => path.split("/").filter(Boolean).slice(-2).join("/");

async function sendChat() {
  const input = $("chat-input");
  const text = input.value;
  if (!text.trim() || chatController) return;
  $("chat-error").textContent = "";
  const models = [$("chat-model").value.trim(), $("chat-model-b").value.trim()].filter(Boolean);
  const userTurn = addTurn("user", text);
  const pair = models.length > 1 ? el("div", null, "pair") : null;
  if (pair) $("chat-log").append(pair);
  const replies = models.map((m) => {
    const reply = addTurn("assistant", T("loading"), pair && el("div", null, "side"),
                          pair ? `${T("assistant")} · ${shortName(m)}` : null);
    if (pair) pair.append(reply.parentElement.parentElement);
    reply.dataset.tokens = "0";
    reply.dataset.model = m;
    return reply;
  });
  input.value = "";
  chatController = new AbortController();
  $("chat-stop").disabled = false;
  $("chat-send").disabled = true;
  for (let i = 0; i < models.length; i++) {
    const messages = [...conversations[i], {role: "user", content: text}];
    const {got, failed, stopped} = await streamReply(models[i], messages, replies[i]);
    if (failed !== null && !got && i === 0) {
      // the message is dropped, as agiasi chat drops the line; the conversation goes on
      userTurn.parentElement.remove();
      if (pair) pair.remove(); else replies[0].parentElement.remove();
      input.value = text;
      $("chat-error").textContent = failed;
      break;
    }
    if (failed !== null && !got) replies[i].textContent = failed;
    if (stopped) replies[i].parentElement.append(el("span", T("stopped_reply"), "stopped"));
    replies[i].parentElement.dataset.done = "1";
    conversations[i] = [...messages, {role: "assistant", content: got.trim()}];
    if (stopped) break;
  }
  chatController = null;
  $("chat-stop").disabled = true;
  $("chat-send").disabled = false;
}

// the agiasi chat line that answers as the page does
let chatCmdTimer = null;
async function chatCommand() {
  const models = [$("chat-model").value.trim(), $("chat-model-b").value.trim()].filter(Boolean);
  if (!models.length) { $("chat-command").textContent = ""; return; }
  try {
    const r = await api("/api/chat/command", {
      models, system: $("chat-system").value || null, temperature: $("chat-temperature").value.trim(),
      top_p: $("chat-top-p").value.trim(), max_new_tokens: $("chat-max").value.trim(),
    });
    $("chat-command").textContent = r.commands.join("\n");
    $("chat-error").textContent = "";
  } catch (e) { $("chat-command").textContent = ""; $("chat-error").textContent = e.message; }
}
for (const id of ["chat-model", "chat-model-b", "chat-system", "chat-temperature", "chat-top-p", "chat-max"]) {
  $(id).addEventListener("input", () => { clearTimeout(chatCmdTimer); chatCmdTimer = setTimeout(chatCommand, 300); });
}

function releaseChat() {
  // the models go back (GPU memory too) when the page leaves the chat or goes away
  fetch("/api/chat/release", {method: "POST", keepalive: true,
    headers: {"Content-Type": "application/json", "X-Agiasi-Studio": "1"}, body: "{}"}).catch(() => {});
}
addEventListener("pagehide", releaseChat);

$("chat-input").addEventListener("keydown", (e) => {
  // Enter that confirms an IME conversion (kana → kanji) is not "send"
  if (e.key !== "Enter" || e.isComposing || e.keyCode === 229 || e.shiftKey) return;
  e.preventDefault();
  sendChat();
});
$("chat-send").addEventListener("click", sendChat);
$("chat-stop").addEventListener("click", () => { if (chatController) chatController.abort(); });
$("chat-new").addEventListener("click", () => {
  if (chatController) chatController.abort();
  conversations = [[], []];
  $("chat-log").replaceChildren();
  $("chat-error").textContent = "";
});
$("chat-latest").addEventListener("click", async () => {
  const r = await api("/api/runs");
  const run = r.runs.find((x) => x.saved_step);
  if (run) $("chat-model").value = `${run.name}/step_${run.saved_step}`;
  chatCommand();
});

// ------------------------------------------------------------------ export

const xform = $("export-form");
xform.addEventListener("submit", (e) => e.preventDefault());
function exportValues() {
  const values = {};
  for (const f of xform.elements) {
    if (!f.name) continue;
    if (f.type === "checkbox") values[f.name] = f.checked;
    else if (f.value.trim() !== "") values[f.name] = f.value.trim();
  }
  return values;
}
let xTimer = null;
xform.addEventListener("input", () => { clearTimeout(xTimer); xTimer = setTimeout(exportCommand, 250); });
xform.addEventListener("change", () => { clearTimeout(xTimer); xTimer = setTimeout(exportCommand, 250); });

// the GGUF type table: a tick is the type in --gguf, sizes from the checkpoint's parameters
let typesFor = null;
async function ggufTypes() {
  const ckpt = ($("x-checkpoint").value || "").trim();
  const chosen = new Set(($("x-gguf").value || "").split(",").map((x) => x.trim().toLowerCase()).filter(Boolean));
  const table = $("gguf-types");
  if (typesFor !== ckpt) {
    typesFor = ckpt;
    try {
      const r = await api("/api/gguf-types?checkpoint=" + encodeURIComponent(ckpt));
      table.replaceChildren();
      const head = el("tr");
      for (const k of ["", "gguf_type", "gguf_bpw", "gguf_size", "gguf_imatrix", "gguf_writer"]) head.append(el("th", k ? T(k) : ""));
      table.append(head);
      for (const t of r.types) {
        const tr = el("tr");
        tr.dataset.type = t.name;
        const box = el("input");
        box.type = "checkbox";
        box.addEventListener("change", () => {
          const now = ($("x-gguf").value || "").split(",").map((x) => x.trim()).filter(Boolean).filter((x) => x.toLowerCase() !== t.name);
          if (box.checked) now.push(t.name);
          $("x-gguf").value = now.join(",");
          $("x-gguf").dispatchEvent(new Event("input", {bubbles: true}));
        });
        const cell = el("td");
        cell.append(box);
        const size = t.size_bytes === null ? "–" : t.size_bytes >= 2 ** 30 ? (t.size_bytes / 2 ** 30).toFixed(2) + " GiB" : (t.size_bytes / 2 ** 20).toFixed(1) + " MiB";
        const im = t.needs_imatrix ? T("imatrix_required") : t.low_bit ? T("imatrix_default") : "–";
        tr.append(cell, el("td", t.name), el("td", t.bpw.toFixed(2)), el("td", "≈ " + size), el("td", im, t.needs_imatrix ? "wrong" : ""), el("td", t.writer));
        table.append(tr);
      }
    } catch (e) { table.replaceChildren(el("tr", e.message, "error")); }
  }
  for (const tr of table.querySelectorAll("tr[data-type]")) tr.querySelector("input").checked = chosen.has(tr.dataset.type);
}

async function exportCommand() {
  ggufTypes();
  for (const e of xform.querySelectorAll(".error")) e.textContent = "";
  try {
    const r = await api("/api/export/command", {values: exportValues()});
    $("export-form-error").textContent = "";
    $("export-command").textContent = r.command;
    $("export-start").disabled = false;
  } catch (e) {
    $("export-form-error").textContent = e.message;
    const m = e.message.match(/--([a-z0-9-]+)/);
    if (m && $("xe-" + m[1].replace(/-/g, "_"))) $("xe-" + m[1].replace(/-/g, "_")).textContent = e.message;
    $("export-command").textContent = "";
    $("export-start").disabled = true;
  }
}

$("export-start").addEventListener("click", async () => {
  try {
    const r = await api("/api/exports", {values: exportValues()});
    location.hash = "export=" + encodeURIComponent(r.out);
  } catch (e) { $("export-form-error").textContent = e.message; }
});

async function refreshExports() {
  const table = $("exports");
  try {
    const r = await api("/api/exports");
    table.replaceChildren();
    if (!r.exports.length) { table.append(el("tr", T("no_exports"))); return; }
    for (const x of r.exports) {
      const tr = el("tr");
      const a = el("a", x.name);
      a.href = "#export=" + encodeURIComponent(x.name);
      const name = el("td");
      name.append(a);
      const state = el("td", T(x.state), "state " + x.state);
      if (x.error) state.append(el("div", x.error, "error"));
      tr.append(name, state);
      table.append(tr);
    }
  } catch (e) { table.replaceChildren(el("tr", e.message, "error")); }
}

let exportTimer = null;
async function viewExport(name) {
  clearTimeout(exportTimer);
  $("export-view").hidden = false;
  $("export-title").textContent = name;
  try {
    const r = await api("/api/export?out=" + encodeURIComponent(name));
    $("export-state").textContent = T(r.state);
    $("export-state").dataset.state = r.state;
    $("export-error").textContent = r.error || "";
    $("export-report").textContent = r.report_text || "";
    $("export-modelfile").textContent = r.Modelfile || "";
    $("export-run").textContent = (r.run_commands || []).join("\n");
    $("export-log").textContent = (r.log || []).join("\n");
    const files = $("export-files");
    files.replaceChildren();
    for (const f of r.files || []) { const tr = el("tr"); tr.append(el("th", f.name), el("td", f.size.toLocaleString() + " B")); files.append(tr); }
    if (r.state === "running") exportTimer = setTimeout(() => viewExport(name), 1500);
    else refreshExports();
  } catch (e) { $("export-error").textContent = e.message; }
}

// ------------------------------------------------------------------ evaluate

const vform = $("eval-form");
vform.addEventListener("submit", (e) => e.preventDefault());
function evalValues() {
  const values = {};
  for (const f of vform.elements) {
    if (!f.name) continue;
    if (f.type === "checkbox") values[f.name] = f.checked;
    else if (f.value.trim() !== "") values[f.name] = f.value.trim();
  }
  return values;
}
let vTimer = null;
for (const ev of ["input", "change"]) vform.addEventListener(ev, () => { clearTimeout(vTimer); vTimer = setTimeout(evalCommand, 250); });

async function evalCommand() {
  try {
    const r = await api("/api/eval/command", {values: evalValues()});
    $("eval-form-error").textContent = "";
    $("eval-command").textContent = r.command;
    $("eval-start").disabled = false;
  } catch (e) {
    $("eval-form-error").textContent = e.message;
    $("eval-command").textContent = "";
    $("eval-start").disabled = true;
  }
}

$("eval-start").addEventListener("click", async () => {
  try {
    const r = await api("/api/evals", {values: evalValues()});
    location.hash = "eval=" + r.id;
  } catch (e) { $("eval-form-error").textContent = e.message; }
});

async function refreshEvals() {
  const table = $("evals");
  try {
    const r = await api("/api/evals");
    table.replaceChildren();
    if (!r.evals.length) { table.append(el("tr", T("no_evals"))); return; }
    for (const x of r.evals) {
      const tr = el("tr");
      const a = el("a", x.id);
      a.href = "#eval=" + x.id;
      const name = el("td");
      name.append(a);
      const state = el("td", T(x.state), "state " + x.state);
      if (x.error) state.append(el("div", x.error, "error"));
      tr.append(name, state, el("td", (x.models || []).join(", ")));
      table.append(tr);
    }
  } catch (e) { table.replaceChildren(el("tr", e.message, "error")); }
}

let evalTimer = null;
async function viewEval(id) {
  clearTimeout(evalTimer);
  $("eval-view").hidden = false;
  $("eval-title").textContent = id;
  try {
    const r = await api("/api/eval?id=" + encodeURIComponent(id));
    $("eval-state").textContent = T(r.state);
    $("eval-state").dataset.state = r.state;
    $("eval-error").textContent = r.error || "";
    $("eval-table").textContent = r.table || "";
    $("eval-log").textContent = (r.log || []).join("\n");
    const table = $("eval-disagree");
    table.replaceChildren();
    table.previousElementSibling.hidden = !(r.disagreements && r.disagreements.length);
    if (r.disagreements && r.disagreements.length) {
      const head = el("tr");
      head.append(el("th", "item"), el("th", T("gold")), ...(r.models || []).map((m) => el("th", m.split("/").slice(-2).join("/"))));
      table.append(head);
      for (const d of r.disagreements) {
        const tr = el("tr");
        const q = el("td");
        q.append(el("div", `${d.task} ${d.id}`, "note"), el("div", d.question.split("\n").slice(-3).join(" ")));
        const name = (i) => (d.choices && d.choices[i] !== undefined ? `${i}: ${d.choices[i]}` : String(i));
        tr.append(q, el("td", name(d.gold)), ...d.picks.map((p) => el("td", name(p), p === d.gold ? "right" : "wrong")));
        table.append(tr);
      }
    }
    if (r.state === "running") evalTimer = setTimeout(() => viewEval(id), 1500);
    else refreshEvals();
  } catch (e) { $("eval-error").textContent = e.message; }
}

listFiles("");
showCommand();
route();
