// The explorer page: one prompt drives every panel; each panel reads one JSON endpoint whose
// numbers are minigpt2's own (see minigpt2/explore/data.py). The next-token controls run the
// processors here (processors.js) on the logits the server sent once, so moving a control
// costs no request.

import * as P from "./processors.js";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const state = {
  meta: null, vocab: [], ids: [], version: 0, logits: null, logitsIds: null,
  attn: null, head: 0, lens: null, steps: 0, sweepAbort: null,
};
// For tests and benchmarks: the state, the processors, and how long each panel took (ms).
window.explore = { state, processors: P, timings: {}, ready: false, loaded: 0 };

// ------------------------------------------------------------------------------- helpers
class ApiError extends Error {
  constructor(message, param) { super(message); this.param = param; }
}

// A server started with `minigpt2 serve --api-key KEY` guards the API: the page is opened as
// /explore#key=KEY. The fragment never leaves the browser (not in requests, not in the server's
// logs); the key is kept for this tab and the fragment cleared from the address bar.
const API_KEY = (() => {
  const m = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("minigpt2-api-key", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("minigpt2-api-key");
})();
const NEEDS_KEY = "this server needs its API key: open the page as /explore#key=YOUR_KEY";

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (API_KEY) h.Authorization = `Bearer ${API_KEY}`;
  return h;
}

async function api(path, body, signal) {
  const init = body === undefined ? { signal, headers: headers(false) } : {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  };
  const r = await fetch(path, init);
  let j = null;
  try { j = await r.json(); } catch { /* not JSON: reported below */ }
  if (r.status === 401) throw new ApiError(`${NEEDS_KEY} (${j?.error?.message ?? "HTTP 401"})`);
  if (!r.ok) throw new ApiError(j?.error?.message ?? `${path}: HTTP ${r.status}`, j?.error?.param);
  if (j === null) throw new ApiError(`${path}: the server sent no JSON`);
  return j;
}

function showError(panel, message) {
  const box = $(`${panel}-error`);
  if (message) { box.textContent = message; box.hidden = false; } else { box.textContent = ""; box.hidden = true; }
}

// A seed box's integer. A number box empties itself on text it cannot parse ("?seed=abc"), and
// Number("") is 0: read what was typed (kept in data-typed by readQuery) and refuse it instead.
function readSeed(id) {
  const box = $(id);
  const text = (box.value === "" ? box.dataset.typed ?? "" : box.value).trim();
  if (!/^\d+$/.test(text)) {
    throw new Error(`seed must be an integer >= 0, got ${text === "" ? "an empty box" : JSON.stringify(text)}`);
  }
  return Number(text);
}

function fail(panel, e) {
  if (e?.name === "AbortError") return;
  showError(panel, e?.message ?? String(e));
}

// A token piece with its whitespace made visible: GPT-2 pieces carry their leading space.
function visible(s) {
  return s.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, "\u240d");
}

function fmtP(p) {
  if (p >= 0.001) return `${(100 * p).toFixed(p >= 0.1 ? 1 : 2)}%`;
  return p === 0 ? "0" : p.toExponential(1);
}

const fmtN = (n) => n.toLocaleString("en-US");
const short = (s, n = 10) => (s.length > n ? `${s.slice(0, n - 1)}\u2026` : s);

function f32(o) {
  const bin = atob(o.base64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

const tip = $("tip");
function showTip(ev, text) {
  tip.textContent = text;
  tip.hidden = false;
  const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
  tip.style.left = `${x}px`;
  tip.style.top = `${y}px`;
}
const hideTip = () => { tip.hidden = true; };

function timed(name, start) { window.explore.timings[name] = performance.now() - start; }

// --------------------------------------------------------------------------- prompt flow
let debounce = null;
$("prompt").addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(() => loadPrompt({ prompt: $("prompt").value }), 250);
});

// Tokenize (text or ids), then every panel for those ids; stale answers are dropped.
async function loadPrompt(body) {
  const v = ++state.version;
  stopSweep();
  const t0 = performance.now();
  let tk;
  try {
    tk = await api("/api/explore/tokens", body);
  } catch (e) {
    if (v !== state.version || e?.name === "AbortError") return;
    fail("tokens", e);
    // Nothing below may show the previous prompt's numbers as if they were this one's.
    state.logits = null;
    state.attn = null;
    for (const id of ["tokens", "bars", "next-summary", "heads", "lens", "sweep"]) $(id).replaceChildren();
    clearBig();
    for (const panel of ["next", "attention", "lens", "sweep"]) showError(panel, `no tokens: ${e.message}`);
    return;
  }
  if (v !== state.version) return;
  showError("tokens", null);
  state.ids = tk.input_ids;
  renderTokens(tk);
  timed("tokens", t0);
  await Promise.all([loadNext(v), loadAttention(v), loadLens(v)]);
  if (v !== state.version) return;
  window.explore.loaded = v; // every panel but the sweep shows this prompt
  runSweep(v);
}

function renderTokens(tk) {
  const box = $("tokens");
  box.replaceChildren();
  tk.pieces.forEach((p, i) => {
    const chip = el("span", "tok");
    chip.dataset.id = tk.input_ids[i];
    chip.dataset.index = i;
    chip.dataset.piece = p;
    chip.title = `position ${i}, id ${tk.input_ids[i]}`;
    chip.append(el("span", "p", visible(p)), el("span", "i", String(tk.input_ids[i])));
    box.append(chip);
  });
  const count = $("tokens-count");
  count.replaceChildren();
  const n = el("span", tk.too_long ? "too-long" : "", `${tk.count} tokens`);
  n.id = "token-count";
  n.dataset.count = tk.count;
  count.append(n, ` of n_positions = ${fmtN(tk.n_positions)}`);
  if (tk.too_long) count.append(el("span", "too-long", ` (${tk.count - tk.n_positions} too many: the other panels cannot run it)`));
  if (tk.note) count.append(` \u00b7 ${tk.note}`);
  count.append(" \u00b7 \u2423 is a space, \u21b5 a newline; a \\x.. piece is part of a character split over tokens");
}

// ------------------------------------------------------------------------------ next token
const CONTROLS = [
  { key: "temperature", label: "temperature", min: 0.05, max: 2, step: 0.05, value: 1 },
  { key: "top_k", label: "top-k (0 = off)", min: 0, max: 200, step: 1, value: 50, int: true },
  { key: "top_p", label: "top-p (1 = off)", min: 0.01, max: 1, step: 0.01, value: 1 },
  { key: "min_p", label: "min-p (0 = off)", min: 0, max: 1, step: 0.01, value: 0 },
  { key: "typical_p", label: "typical-p (1 = off)", min: 0.01, max: 1, step: 0.01, value: 1 },
  { key: "repetition_penalty", label: "repetition penalty", min: 0.5, max: 2, step: 0.05, value: 1 },
];

function buildControls() {
  const box = $("controls");
  for (const c of CONTROLS) {
    const d = state.meta.defaults[c.key]; // the library's defaults (None = off for min-p, typical-p)
    if (d !== null && d !== undefined) c.value = d;
    const range = el("input");
    Object.assign(range, { type: "range", min: c.min, max: c.max, step: c.step, value: c.value, id: `${c.key}-range` });
    const num = el("input");
    Object.assign(num, { type: "number", min: c.min, step: c.step, value: c.value, id: c.key });
    range.addEventListener("input", () => { num.value = range.value; renderNext(); });
    num.addEventListener("input", () => { range.value = num.value; renderNext(); });
    const label = el("label", "", c.label);
    label.htmlFor = c.key;
    box.append(label, range, num);
  }
}

// The controls as generate's arguments (min-p 0 and typical-p 1 mean off: null).
function readSettings() {
  const s = {};
  for (const c of CONTROLS) {
    const input = $(c.key);
    if (!input) continue;
    const raw = input.value.trim();
    const x = raw === "" ? NaN : Number(raw);
    s[c.key] = x;
  }
  if (Number.isNaN(s.top_k)) throw new Error("top_k must be an integer >= 0 (0 = off), got an empty box");
  for (const [k, v] of Object.entries(s)) if (Number.isNaN(v)) throw new Error(`${k} must be a number, got an empty box`);
  if (s.min_p === 0) s.min_p = null;
  if (s.typical_p === 1) s.typical_p = null;
  return { min_p: null, typical_p: null, ...s };
}

async function loadNext(v) {
  const t0 = performance.now();
  try {
    const r = await api("/api/explore/next", { input_ids: state.ids });
    if (v !== state.version) return;
    state.logits = f32(r.logits);
    state.logitsIds = r.input_ids;
    showError("next", null);
    renderNext();
    timed("next", t0);
  } catch (e) {
    if (v !== state.version) return;
    state.logits = null;
    $("bars").replaceChildren();
    $("next-summary").replaceChildren();
    fail("next", e);
  }
}

function renderNext() {
  if (!state.logits) return;
  const t0 = performance.now();
  let res;
  try {
    res = P.process(state.logits, state.logitsIds, readSettings());
  } catch (e) {
    showError("next", e.message);
    return;
  }
  showError("next", null);
  const V = state.logits.length;
  const summary = $("next-summary");
  summary.replaceChildren();
  const stages = el("div", "stages");
  res.stages.forEach((st, i) => {
    if (i) stages.append("\u2192");
    stages.append(el("span", "stage", `${st.name}: ${fmtN(st.kept)}`));
  });
  const kept = el("b", "", fmtN(res.kept));
  kept.id = "kept-count";
  kept.dataset.kept = res.kept;
  const line = el("div", "small");
  line.append(kept, ` of ${fmtN(V)} tokens can be drawn \u00b7 entropy `, el("b", "", `${res.entropy.toFixed(3)} nats`),
    ` (before the warpers ${res.baseEntropy.toFixed(3)})`);
  summary.append(stages, line);

  const top = P.topIndices(res.base, 20);
  let scale = 0;
  for (const i of top) scale = Math.max(scale, res.baseProbs[i], res.probs[i]);
  const bars = $("bars");
  bars.replaceChildren();
  for (const i of top) {
    const why = P.REASONS[res.removed[i]];
    const label = el("div", "bar-label", visible(state.vocab[i] ?? `<id ${i}>`));
    label.title = `id ${i}`;
    const track = el("div", "bar-track");
    const b = el("div", "bar-base");
    b.style.width = `${(100 * res.baseProbs[i]) / scale}%`;
    const fbar = el("div", "bar-final");
    fbar.style.width = `${(100 * res.probs[i]) / scale}%`;
    track.append(b, fbar);
    const val = el("div", "bar-val", why ? "0" : fmtP(res.probs[i]));
    const reason = el("div", "reason", why ? `removed by ${why}` : `was ${fmtP(res.baseProbs[i])}`);
    const row = [label, track, val, reason];
    for (const c of row) {
      c.classList.add("bar");
      if (why) c.classList.add("bar-row-removed");
      c.dataset.id = i;
    }
    val.dataset.prob = res.probs[i];
    val.dataset.baseProb = res.baseProbs[i];
    val.dataset.removedBy = why;
    bars.append(...row);
  }
  const ms = performance.now() - t0;
  window.explore.timings.controls = ms;
  summary.append(el("div", "muted small", `light bar: probability after the penalty and temperature; dark: after every ` +
    `processor, renormalised \u00b7 computed here in ${ms.toFixed(0)} ms`));
}

// Step-through: the library picks (greedy) or draws (sample) one token; everything updates.
async function step(mode) {
  if (!state.ids.length) return;
  let settings;
  try {
    settings = readSettings();
    P.checkSettings(settings);
  } catch (e) {
    showError("next", e.message);
    return;
  }
  let seed = 0;
  if (mode === "sample") {
    try {
      seed = readSeed("step-seed");
    } catch (e) {
      showError("next", e.message);
      return;
    }
  }
  for (const b of [$("pick-greedy"), $("pick-sample")]) b.disabled = true;
  $("step-status").textContent = "asking minigpt2\u2026";
  try {
    const r = await api("/api/explore/step", {
      input_ids: state.ids, mode, settings, seed: mode === "sample" ? seed + state.steps : null,
    });
    state.steps += 1;
    const item = el("li", "", `${mode === "greedy" ? "greedy" : `sampled (seed ${seed + state.steps - 1})`}: `);
    item.append(el("code", "", visible(r.piece)), ` p = ${fmtP(r.prob)}, one of ${fmtN(r.kept)} kept by minigpt2.sampling`);
    item.dataset.id = r.token_id;
    $("step-history").append(item);
    $("prompt").value = r.text;
    $("step-status").textContent = "";
    await loadPrompt({ input_ids: r.input_ids });
  } catch (e) {
    $("step-status").textContent = "";
    fail("next", e);
  } finally {
    for (const b of [$("pick-greedy"), $("pick-sample")]) b.disabled = false;
  }
}
$("pick-greedy").addEventListener("click", () => step("greedy"));
$("pick-sample").addEventListener("click", () => step("sample"));

// ------------------------------------------------------------------------------- attention
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(w) {
  const x = Math.min(1, Math.max(0, w)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const t = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + t * (VIRIDIS[i + 1][k] - c)));
}

function weight(head, q, k) {
  const T = state.attn.T;
  return state.attn.data[(head * T + q) * T + k];
}

$("layer").addEventListener("change", () => loadAttention(state.version));

async function loadAttention(v) {
  const layer = Number($("layer").value);
  $("attention-status").textContent = "computing\u2026";
  const t0 = performance.now();
  try {
    const r = await api("/api/explore/attention", { input_ids: state.ids, layer });
    if (v !== state.version || layer !== Number($("layer").value)) return;
    const T = r.input_ids.length;
    state.attn = { layer: r.layer, nHead: r.n_head, T, data: f32(r.pattern), ids: r.input_ids };
    state.head = Math.min(state.head, r.n_head - 1);
    showError("attention", null);
    renderHeads();
    renderBig();
    $("attention-status").textContent = `layer ${r.layer}: ${r.n_head} heads over ${T} tokens (h.${r.layer}.attn.pattern)`;
    timed("attention", t0);
  } catch (e) {
    if (v !== state.version) return;
    state.attn = null;
    $("heads").replaceChildren();
    clearBig();
    $("attention-status").textContent = "";
    fail("attention", e);
  }
}

// A T x T image of one head: weights in viridis, the causal mask (keys after the query) hatched grey.
function headImage(ctx, head) {
  const T = state.attn.T;
  const img = ctx.createImageData(T, T);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      const o = 4 * (q * T + k);
      const rgb = k > q ? ((q + k) % 2 ? [236, 236, 236] : [218, 218, 218]) : colour(weight(head, q, k));
      img.data.set([...rgb, 255], o);
    }
  }
  return img;
}

function renderHeads() {
  const box = $("heads");
  box.replaceChildren();
  const { nHead, T } = state.attn;
  for (let h = 0; h < nHead; h++) {
    const wrap = el("div", h === state.head ? "head selected" : "head");
    wrap.dataset.head = h;
    const c = el("canvas");
    c.width = T;
    c.height = T;
    const size = nHead > 16 ? 56 : 72;
    c.style.width = `${size}px`;
    c.style.height = `${size}px`;
    c.getContext("2d").putImageData(headImage(c.getContext("2d"), h), 0, 0);
    wrap.append(c, el("span", "", `head ${h}`));
    wrap.addEventListener("click", () => { state.head = h; renderHeads(); renderBig(); });
    box.append(wrap);
  }
}

function clearBig() {
  const c = $("attn-big");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

function renderBig() {
  const c = $("attn-big");
  const ctx = c.getContext("2d");
  const { T } = state.attn;
  const off = document.createElement("canvas");
  off.width = T;
  off.height = T;
  off.getContext("2d").putImageData(headImage(off.getContext("2d"), state.head), 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.drawImage(off, 0, 0, c.width, c.height);
  $("attn-readout").textContent = `head ${state.head}: rows are queries (attending), columns keys (attended to); ` +
    "grey cells are masked (a position never sees later ones). Hover a cell.";
}

function bigCell(ev) {
  const c = $("attn-big");
  const r = c.getBoundingClientRect();
  const T = state.attn.T;
  const k = Math.floor(((ev.clientX - r.left) / r.width) * T);
  const q = Math.floor(((ev.clientY - r.top) / r.height) * T);
  return q >= 0 && q < T && k >= 0 && k < T ? [q, k] : null;
}

$("attn-big").addEventListener("mousemove", (ev) => {
  if (!state.attn) return;
  const cell = bigCell(ev);
  if (!cell) return hideTip();
  const [q, k] = cell;
  const qt = visible(state.vocab[state.attn.ids[q]] ?? "");
  const kt = visible(state.vocab[state.attn.ids[k]] ?? "");
  const out = $("attn-readout");
  out.dataset.head = state.head;
  out.dataset.query = q;
  out.dataset.key = k;
  let text;
  if (k > q) {
    out.dataset.weight = "0";
    out.dataset.masked = "true";
    text = `query ${q} '${qt}' \u2192 key ${k} '${kt}': masked (causal: key is later), weight 0`;
  } else {
    const w = weight(state.head, q, k);
    out.dataset.weight = String(w);
    out.dataset.masked = "false";
    text = `query ${q} '${qt}' \u2192 key ${k} '${kt}': ${w.toFixed(4)}`;
  }
  out.textContent = `layer ${state.attn.layer}, head ${state.head}\n${text}`;
  showTip(ev, text);
});
$("attn-big").addEventListener("mouseleave", hideTip);

// ------------------------------------------------------------------------------ logit lens
async function loadLens(v) {
  $("lens-status").textContent = "computing\u2026";
  const t0 = performance.now();
  try {
    const r = await api("/api/explore/lens", { input_ids: state.ids, k: 5 });
    if (v !== state.version) return;
    state.lens = r;
    showError("lens", null);
    renderLens();
    timed("lens", t0);
  } catch (e) {
    if (v !== state.version) return;
    state.lens = null;
    $("lens").replaceChildren();
    $("lens-status").textContent = "";
    fail("lens", e);
  }
}

function renderLens() {
  const r = state.lens;
  const table = $("lens");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", "layer", "after \u2192"));
  r.input_ids.forEach((id) => head.append(el("th", "", short(visible(state.vocab[id] ?? "")))));
  table.append(head);
  const last = r.names.length - 1;
  r.names.forEach((name, row) => {
    const tr = el("tr");
    const label = name === "embed" ? "embed" : name.replace(".resid_post", "") + (row === last ? " = output" : "");
    tr.append(el("th", "layer", label));
    r.token_ids[row].forEach((ids, pos) => {
      const p = r.probs[row][pos];
      const td = el("td");
      td.dataset.row = row;
      td.dataset.pos = pos;
      td.dataset.id = ids[0];
      td.dataset.prob = p[0];
      td.append(short(visible(state.vocab[ids[0]] ?? "")), el("span", "pr", fmtP(p[0])));
      td.style.background = `rgba(47, 95, 208, ${(0.06 + 0.6 * p[0]).toFixed(3)})`;
      if (pos + 1 < r.input_ids.length && ids[0] === r.input_ids[pos + 1]) td.style.fontWeight = "700";
      const lines = ids.map((id, j) => `${fmtP(p[j]).padStart(7)}  '${visible(state.vocab[id] ?? "")}'`);
      const text = `${label}, after position ${pos}: top ${ids.length}\n${lines.join("\n")}`;
      td.addEventListener("mousemove", (ev) => showTip(ev, text));
      td.addEventListener("mouseleave", hideTip);
      tr.append(td);
    });
    table.append(tr);
  });
  $("lens-status").textContent = `ln_f and the unembedding applied to each residual stream (rows), at each position ` +
    `(columns): the top next token and its probability; bold where it is the token that follows in the prompt. Hover for the top 5.`;
}

// ------------------------------------------------------------------------------ strategies
function stopSweep() {
  if (state.sweepAbort) state.sweepAbort.abort();
  state.sweepAbort = null;
}

$("sweep-run").addEventListener("click", () => runSweep(state.version));

async function runSweep(v) {
  stopSweep();
  const n = Number($("sweep-tokens").value);
  const box = $("sweep");
  box.replaceChildren();
  delete box.dataset.done;
  showError("sweep", null);
  let seed;
  try {
    seed = readSeed("sweep-seed");
  } catch (e) {
    showError("sweep", e.message);
    box.dataset.done = "true";
    return;
  }
  const ctl = new AbortController();
  state.sweepAbort = ctl;
  const t0 = performance.now();
  $("sweep-status").textContent = "generating\u2026";
  try {
    const r = await fetch("/api/explore/strategies", {
      method: "POST", headers: headers(true), signal: ctl.signal,
      body: JSON.stringify({ input_ids: state.ids, max_new_tokens: n, seed }),
    });
    if (!r.ok) {
      let j = null;
      try { j = await r.json(); } catch { /* reported below */ }
      if (r.status === 401) throw new ApiError(NEEDS_KEY);
      throw new ApiError(j?.error?.message ?? `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (v !== state.version) return;
        onSweepEvent(frame, t0);
      }
    }
  } catch (e) {
    if (e?.name === "AbortError") return;
    $("sweep-status").textContent = "";
    fail("sweep", e);
  } finally {
    if (state.sweepAbort === ctl) state.sweepAbort = null;
  }
}

function onSweepEvent(frame, t0) {
  let event = "message";
  let payload = "";
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) payload += line.slice(5).trim();
  }
  const d = payload ? JSON.parse(payload) : {};
  if (event === "columns") {
    const box = $("sweep");
    for (const c of d.columns) {
      const card = el("div", "column");
      card.dataset.key = c.key;
      const h = el("h4", "", c.label);
      const st = el("span", "state", "\u2026");
      h.append(st);
      const settings = Object.entries(c.settings).map(([k, x]) => `${k}=${x}`).join(", ");
      card.append(h, el("div", "muted small", settings), el("div", "text"));
      box.append(card);
    }
    $("sweep-status").innerHTML = "";
    $("sweep-status").append(`seed ${d.seed}, ${d.max_new_tokens} new tokens; tint = probability under the distribution ` +
      "each token was drawn from ", el("span", "legend"), " (0 \u2192 1); hover a token for its alternatives");
  } else if (event === "tokens") {
    const card = document.querySelector(`#sweep .column[data-key="${CSS.escape(d.key)}"]`);
    if (!card) return;
    const text = card.querySelector(".text");
    for (const t of d.tokens) {
      // A newline shows as a visible mark before the line break it makes.
      const shown = t.eos ? "<|endoftext|>" : t.text.replace(/\n/g, "\u21b5\n");
      const span = el("span", t.eos ? "gtok eos" : "gtok", shown);
      span.dataset.id = t.id;
      span.dataset.prob = t.prob;
      span.style.background = `rgba(47, 95, 208, ${(0.05 + 0.8 * t.prob).toFixed(3)})`;
      if (t.prob > 0.55) span.style.color = "#fff";
      const alts = t.alternatives.map((a) => `${fmtP(a.prob).padStart(7)}  '${visible(a.piece)}'`).join("\n");
      const info = `'${visible(t.piece)}' (id ${t.id}): p = ${fmtP(t.prob)}\nalternatives at this step:\n${alts}`;
      span.addEventListener("mousemove", (ev) => showTip(ev, info));
      span.addEventListener("mouseleave", hideTip);
      text.append(span);
    }
    if (d.done) {
      card.dataset.done = "true";
      card.querySelector(".state").textContent = d.finish_reason === "eos" ? "ended at <|endoftext|>" : "done";
    }
  } else if (event === "error") {
    showError("sweep", d.error?.message ?? "the sweep failed");
  } else if (event === "end") {
    $("sweep").dataset.done = "true";
    timed("sweep", t0);
  }
}

// ---------------------------------------------------------------------------- architecture
async function loadArchitecture() {
  try {
    const a = await api("/api/explore/architecture");
    renderArchitecture(a);
  } catch (e) {
    fail("architecture", e);
  }
}

function renderArchitecture(a) {
  const tree = $("tree");
  tree.replaceChildren();
  for (const row of a.tree) {
    const line = el("div", "line");
    line.textContent = "  ".repeat(row.depth) + row.line;
    if (row.parameters !== undefined && row.path !== null) {
      const shapes = Object.entries(row.shapes ?? {}).map(([k, s]) => `${k} [${s.join(", ")}]`).join(", ");
      const count = row.tied_to ? `tied to ${row.tied_to}: counted once` : `${fmtN(row.parameters)} params`;
      line.append(el("span", "meta", [count, shapes].filter(Boolean).join(" \u00b7 ")));
    }
    tree.append(line);
    for (const n of row.notes ?? []) tree.append(el("div", "note line", "  ".repeat(row.depth + 1) + "# " + n));
  }
  const toggle = () => tree.querySelectorAll(".note").forEach((n) => { n.hidden = !$("explain").checked; });
  $("explain").addEventListener("change", toggle);
  toggle();
  $("walkthrough").textContent = a.walkthrough.join("\n");
  $("param-table").textContent = a.parameter_table.join("\n");
  const table = $("comparison");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", "", ""));
  a.comparison.columns.forEach((c) => head.append(el("th", "", c.model)));
  table.append(head);
  for (const [key, label] of a.comparison.rows) {
    const tr = el("tr");
    tr.append(el("th", "", label));
    a.comparison.columns.forEach((c, i) => {
      let x = c[key];
      if (x === null || x === undefined) x = key === "n_positions" ? "no limit in the model (relative)" : "";
      else if (typeof x === "number") x = fmtN(x);
      const td = el("td", i === 0 ? "this" : "", String(x));
      td.dataset.key = key;
      tr.append(td);
    });
    table.append(tr);
  }
}

// --------------------------------------------------------------------------------- start
// ?prompt=...&tokens=...&seed=... set the prompt and the sweep's length and seed (a link to share).
function readQuery() {
  const q = new URLSearchParams(window.location.search);
  if (q.has("prompt")) $("prompt").value = q.get("prompt");
  if (q.has("tokens")) $("sweep-tokens").value = q.get("tokens");
  if (q.has("seed")) {
    for (const id of ["sweep-seed", "step-seed"]) {
      const box = $(id);
      box.value = q.get("seed");
      box.dataset.typed = q.get("seed");  // the box drops text that is not a number: keep it to refuse it
      box.addEventListener("input", () => delete box.dataset.typed, { once: true });
    }
  }
}

async function start() {
  readQuery();
  try {
    const [meta, vocab] = await Promise.all([api("/api/explore/model"), api("/api/explore/vocab")]);
    state.meta = meta;
    state.vocab = vocab.pieces;
  } catch (e) {
    const g = $("global-error");
    g.textContent = `cannot reach the model: ${e.message}`;
    g.hidden = false;
    return;
  }
  const m = state.meta;
  $("model-line").textContent = `${m.name}: ${m.n_layer} layers, ${m.n_head} heads, n_embd ${m.n_embd}, ` +
    `${fmtN(m.num_parameters)} parameters, vocabulary ${fmtN(m.vocab_size)}, n_positions ${fmtN(m.n_positions)} ` +
    `(${m.dtype} on ${m.device})`;
  const layer = $("layer");
  for (let i = 0; i < m.n_layer; i++) layer.append(new Option(String(i), String(i)));
  buildControls();
  loadArchitecture();
  await loadPrompt({ prompt: $("prompt").value });
  window.explore.ready = true;
}

start();
