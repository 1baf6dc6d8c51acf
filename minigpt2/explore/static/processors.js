// minigpt2.sampling in the browser: the logits processors of the next-token panel.
//
// Same order and semantics as minigpt2/sampling.py (itself transformers' generate,
// `_get_logits_processor`): repetition penalty -> temperature -> top-k -> top-p -> min-p
// -> typical-p. Arithmetic follows PyTorch's on float32 tensors: every scalar is rounded to
// float32 before the operation and every result after it (Math.fround), and top-p's cumulative
// sum is accumulated in double precision and rounded, as torch.cumsum does on the CPU. What
// cannot be matched bit for bit is the softmax's exp (PyTorch vectorises its own), so a
// probability may differ in the 7th significant digit; the browser tests hold kept counts
// and probabilities against minigpt2.sampling on the same logits.
//
// References: CTRL (Keskar et al., 2019) for the repetition penalty; Fan et al. (2018) for
// top-k; Holtzman et al. (2020) for top-p; Nguyen et al. (2024) for min-p; Meister et al.
// (2023) for typical sampling; transformers' logits_process.py for the exact rules.

const f = Math.fround;

// Why a token was removed (0 = kept), in pipeline order.
export const REASONS = ["", "top-k", "top-p", "min-p", "typical-p"];

// Softmax of float32 scores as float32 probabilities ([] of -inf gives 0s).
export function softmax(scores) {
  let max = -Infinity;
  for (let i = 0; i < scores.length; i++) if (scores[i] > max) max = scores[i];
  const out = new Float32Array(scores.length);
  if (max === -Infinity) return out;
  let sum = 0;
  for (let i = 0; i < scores.length; i++) {
    const e = scores[i] === -Infinity ? 0 : Math.exp(f(scores[i] - max));
    out[i] = e;
    sum += e;
  }
  for (let i = 0; i < out.length; i++) out[i] = f(out[i] / sum);
  return out;
}

// Natural-log softmax, float32 (for typical-p's entropy).
function logSoftmax(scores) {
  let max = -Infinity;
  for (let i = 0; i < scores.length; i++) if (scores[i] > max) max = scores[i];
  let sum = 0;
  for (let i = 0; i < scores.length; i++) if (scores[i] !== -Infinity) sum += Math.exp(f(scores[i] - max));
  const logSum = Math.log(sum);
  const out = new Float32Array(scores.length);
  for (let i = 0; i < scores.length; i++) out[i] = f(f(scores[i] - max) - logSum);
  return out;
}

// Indices i with scores[i] > -inf, sorted ascending by keys[i] (ties by index). Removed tokens
// need no place in the order: their probability is 0, so they change no cumulative sum and
// stay removed (after top-k 50, top-p sorts 50 tokens, not the whole vocabulary).
function argsortFinite(scores, keys) {
  const idx = [];
  for (let i = 0; i < scores.length; i++) if (scores[i] !== -Infinity) idx.push(i);
  return Uint32Array.from(idx).sort((a, b) => (keys[a] < keys[b] ? -1 : keys[a] > keys[b] ? 1 : a - b));
}

// CTRL's penalty on every token already in the row: s / r if s > 0 else s * r (once per token).
export function repetitionPenalty(scores, ids, penalty) {
  const out = Float32Array.from(scores);
  const r = f(penalty);
  for (const i of new Set(ids)) {
    if (i < 0 || i >= out.length) continue;
    const s = scores[i];
    out[i] = s < 0 ? f(s * r) : f(s / r);
  }
  return out;
}

// softmax(s / t): t < 1 sharpens, t > 1 flattens.
export function temperature(scores, t) {
  const out = new Float32Array(scores.length);
  const tf = f(t);
  for (let i = 0; i < scores.length; i++) out[i] = f(scores[i] / tf);
  return out;
}

// Keep the k highest scores and every score tied with the k-th; mark the rest.
export function topK(scores, k, removed, reason, minKeep = 1) {
  k = Math.min(Math.max(k, minKeep), scores.length);
  const sorted = Float32Array.from(scores).sort(); // ascending
  const kth = sorted[scores.length - k];
  for (let i = 0; i < scores.length; i++) if (scores[i] < kth) removed[i] ||= reason;
}

// Nucleus: sorted ascending, drop a token while the mass up to and including it is <= 1 - p.
export function topP(scores, p, removed, reason, minKeep = 1) {
  const order = argsortFinite(scores, scores);
  const probs = softmax(Float32Array.from(order, (i) => scores[i]));
  const limit = f(1 - p);
  let acc = 0;
  for (let j = 0; j < order.length - minKeep; j++) {
    acc += probs[j];
    if (f(acc) <= limit) removed[order[j]] ||= reason;
  }
}

// min-p: drop tokens whose probability is below min_p x the top token's.
export function minP(scores, minPValue, removed, reason, minKeep = 1) {
  const probs = softmax(scores);
  let top = 0;
  for (let i = 0; i < probs.length; i++) if (probs[i] > top) top = probs[i];
  const threshold = f(f(minPValue) * top);
  const keep = new Set(topIndices(probs, minKeep));
  for (let i = 0; i < probs.length; i++) if (probs[i] < threshold && !keep.has(i)) removed[i] ||= reason;
}

// Locally typical sampling: keep the tokens whose surprisal is closest to the entropy,
// until their mass reaches `mass`.
export function typicalP(scores, mass, removed, reason, minKeep = 1) {
  const logp = logSoftmax(scores);
  let ent = 0;
  for (let i = 0; i < logp.length; i++) {
    if (logp[i] !== -Infinity) ent += f(logp[i] * f(Math.exp(logp[i])));
  }
  ent = f(-ent);
  const shifted = new Float32Array(logp.length);
  for (let i = 0; i < logp.length; i++) shifted[i] = Math.abs(f(-logp[i] - ent));
  const order = argsortFinite(scores, shifted);
  const probs = softmax(Float32Array.from(order, (i) => scores[i]));
  const massF = f(mass);
  let acc = 0;
  let last = 0;
  for (let j = 0; j < order.length; j++) {
    acc += probs[j];
    if (f(acc) < massF) last++;
  }
  last = Math.min(last, order.length - 1);
  const bound = shifted[order[last]];
  for (let j = minKeep; j < order.length; j++) if (shifted[order[j]] > bound) removed[order[j]] ||= reason;
}

// The n largest entries' indices, largest first (ties: lower index first).
export function topIndices(values, n) {
  const best = [];
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (best.length === n && v <= values[best[best.length - 1]]) continue;
    let j = best.length;
    while (j > 0 && values[best[j - 1]] < v) j--;
    best.splice(j, 0, i);
    if (best.length > n) best.pop();
  }
  return best;
}

// Shannon entropy in nats of a probability vector.
export function entropy(probs) {
  let h = 0;
  for (let i = 0; i < probs.length; i++) if (probs[i] > 0) h -= probs[i] * Math.log(probs[i]);
  return h;
}

// Check the controls as minigpt2's explorer checks them; an Error names the bad one.
export function checkSettings(s) {
  const finite = (name, x) => {
    if (typeof x !== "number" || !Number.isFinite(x)) throw new Error(`${name} must be a finite number, got ${x}`);
  };
  finite("temperature", s.temperature);
  if (!(s.temperature > 0)) throw new Error(`temperature=${s.temperature} must be > 0 (Pick greedy takes the most likely token)`);
  if (!Number.isInteger(s.top_k) || s.top_k < 0) throw new Error(`top_k must be an integer >= 0 (0 = off), got ${s.top_k}`);
  finite("top_p", s.top_p);
  if (!(s.top_p > 0 && s.top_p <= 1)) throw new Error(`top_p=${s.top_p} must be in (0, 1] (1 = off)`);
  if (s.min_p !== null && s.min_p !== undefined) {
    finite("min_p", s.min_p);
    if (!(s.min_p >= 0 && s.min_p <= 1)) throw new Error(`min_p=${s.min_p} must be in [0, 1]`);
  }
  if (s.typical_p !== null && s.typical_p !== undefined) {
    finite("typical_p", s.typical_p);
    if (!(s.typical_p > 0 && s.typical_p <= 1)) throw new Error(`typical_p=${s.typical_p} must be in (0, 1] (1 = off)`);
  }
  finite("repetition_penalty", s.repetition_penalty);
  if (!(s.repetition_penalty > 0)) throw new Error(`repetition_penalty=${s.repetition_penalty} must be > 0 (1 = off)`);
}

// Every processor the settings enable, as generate(do_sample=True, ...) runs them.
// Returns the scores before the warpers (`base`: after the penalty and temperature), the
// final scores, why each removed token went (`removed`: index into REASONS), the count left
// after each stage, both distributions and their entropies.
export function process(logits, ids, s) {
  checkSettings(s);
  const V = logits.length;
  let base = Float32Array.from(logits);
  if (s.repetition_penalty !== 1) base = repetitionPenalty(base, ids, s.repetition_penalty);
  if (s.temperature !== 1) base = temperature(base, s.temperature);
  const removed = new Uint8Array(V);
  const stages = [{ name: "vocabulary", kept: V }];
  const current = () => {
    const out = Float32Array.from(base);
    for (let i = 0; i < V; i++) if (removed[i]) out[i] = -Infinity;
    return out;
  };
  const count = () => removed.reduce((n, r) => n + (r ? 0 : 1), 0);
  if (s.top_k !== 0) {
    topK(current(), s.top_k, removed, 1);
    stages.push({ name: `top-k ${s.top_k}`, kept: count() });
  }
  if (s.top_p < 1) {
    topP(current(), s.top_p, removed, 2);
    stages.push({ name: `top-p ${s.top_p}`, kept: count() });
  }
  if (s.min_p !== null && s.min_p !== undefined) {
    minP(current(), s.min_p, removed, 3);
    stages.push({ name: `min-p ${s.min_p}`, kept: count() });
  }
  if (s.typical_p !== null && s.typical_p !== undefined && s.typical_p < 1) {
    typicalP(current(), s.typical_p, removed, 4);
    stages.push({ name: `typical-p ${s.typical_p}`, kept: count() });
  }
  const final = current();
  const baseProbs = softmax(base);
  const probs = softmax(final);
  return {
    base, final, removed, stages, kept: count(), baseProbs, probs,
    entropy: entropy(probs), baseEntropy: entropy(baseProbs),
  };
}
