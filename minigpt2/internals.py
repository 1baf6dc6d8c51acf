"""Looking inside GPT-2: activation caches, the logit lens, scores and parameter counts.

Everything here is built on the model's own hook points (``GPT2.hooks``), so the names are
GPT-2's: ``embed``, ``h.N.resid_pre``, ``h.N.ln_1``, ``h.N.attn.{q,k,v,pattern,out}``,
``h.N.resid_mid``, ``h.N.ln_2``, ``h.N.mlp.{act,out}``, ``h.N.resid_post``, ``ln_f``.
Nothing here is on the fast path: a model without hooks runs exactly as before.

References:
  - the logit lens: nostalgebraist, "interpreting GPT: the logit lens" (2020);
  - sliding-window perplexity: transformers' "Perplexity of fixed-length models" guide;
  - activation caches and hooks: the interpretability libraries' ``run_with_cache`` idiom,
    here with GPT-2's own module names.

This module must not import ``model`` at import time (model.py imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import GPT2, HookFn
    from .tokenizer import Tokenizer

# --------------------------------------------------------------------- activation cache
class UnknownActivationError(KeyError, ValueError):
    """A name that is not in an ``ActivationCache`` (a KeyError for dict code, a ValueError
    for everyone else); the message says which names are there."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class ActivationCache(dict):
    """Named activations from one forward, in forward order: ``{name: tensor [batch, ...]}``.

    A plain dict with two conveniences: a short ``repr`` (names and shapes, not numbers)
    and a missing name that says what is there instead of a bare KeyError.
    """

    def __missing__(self, name: str) -> torch.Tensor:
        shown = ", ".join(list(self)[:6]) + (", ..." if len(self) > 6 else "")
        raise UnknownActivationError(
            f"{name!r} is not in this cache (it holds {len(self)} activations: {shown}); "
            "run_with_cache(ids) with no names= records every activation"
        )

    def __repr__(self) -> str:
        rows = [f"  {name}: {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in self.items()]
        return f"ActivationCache({len(self)} activations\n" + "\n".join(rows) + ("\n)" if rows else ")")


def _select_names(model: GPT2, names: Any) -> list[str]:
    """The activation names ``names`` asks for, in forward order (ValueError on unknown ones)."""
    every = model.activation_names()
    if names is None:
        return every
    if callable(names):
        return [n for n in every if names(n)]
    if isinstance(names, str):
        names = [names]
    try:
        asked = list(names)
    except TypeError:
        raise ValueError(f"names= must be a list of activation names or a filter function, got {type(names).__name__}") from None
    known = set(every)
    unknown = [n for n in asked if n not in known]
    if unknown:
        raise ValueError(
            f"unknown activation name {unknown[0]!r}; names are embed, h.N.<resid_pre, ln_1, attn.q, attn.k, "
            f"attn.v, attn.pattern, attn.out, resid_mid, ln_2, mlp.act, mlp.out, resid_post> for N in "
            f"0..{model.config.n_layer - 1}, and ln_f (see model.activation_names())"
        )
    wanted = set(asked)
    return [n for n in every if n in wanted]


def run_with_cache(
    model: GPT2,
    input_ids: torch.Tensor,
    names: str | Iterable[str] | Callable[[str], bool] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    hooks: Mapping[str, HookFn] | None = None,
) -> tuple[torch.Tensor, ActivationCache]:
    """One forward that also records named activations: ``logits, acts = model.run_with_cache(ids)``.

    Returns the float32 logits [B, T, V] and an ``ActivationCache`` of detached tensors on the
    model's device, each [batch, ...]: ``embed``, ``h.N.resid_pre`` / ``ln_1`` / ``attn.out`` /
    ``resid_mid`` / ``ln_2`` / ``mlp.out`` / ``resid_post`` [B, T, C], ``h.N.attn.q`` / ``k`` /
    ``v`` [B, nh, T, hs], ``h.N.attn.pattern`` [B, nh, T, T] (softmax weights), ``h.N.mlp.act``
    [B, T, inner], ``ln_f`` [B, T, C].

    names: None records everything; otherwise a name, a list of names (ValueError on an
        unknown one) or a function name -> bool. Keep it small to save memory: an attention
        pattern is written out (the explicit, non-SDPA path) only in the layers whose
        ``h.N.attn.pattern`` is asked for.
    hooks: optional ``{name: fn}`` run before recording (ablation or patching), so the
        cache shows the effect of the intervention downstream.

    Runs under ``torch.no_grad()``; for gradients through activations use ``model.hooks``.
    """
    wanted = _select_names(model, names)
    hooks = dict(hooks or {})
    store: dict[str, torch.Tensor] = {}

    def recorder(user_fn: HookFn | None) -> HookFn:
        def record(act: torch.Tensor, name: str) -> torch.Tensor | None:
            out = user_fn(act, name) if user_fn is not None else None
            kept = out.to(device=act.device, dtype=act.dtype) if isinstance(out, torch.Tensor) else act
            store[name] = kept.detach()
            return out  # the model checks a replacement's shape

        return record

    fns: dict[str, HookFn] = dict(hooks)
    for name in wanted:
        fns[name] = recorder(hooks.get(name))
    with torch.no_grad(), model.hooks(fns):
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return logits, ActivationCache((n, store[n]) for n in wanted if n in store)


# ------------------------------------------------------------------------- logit lens
@dataclass
class LogitLens:
    """The logit lens of one forward: what each layer's residual stream "predicts".

    names: the residual stream of each row, ``embed`` then ``h.N.resid_post`` per block.
    token_ids: [batch, rows, seq, k] top-k next-token ids after ln_f and the unembedding.
    probs: [batch, rows, seq, k] their softmax probabilities (float32).
    The last row is the model's own prediction (ln_f of the last block's output, unembedded).
    """

    names: list[str]
    token_ids: torch.Tensor
    probs: torch.Tensor
    input_ids: torch.Tensor | None = None  # [batch, seq], the tokens that were run

    def __repr__(self) -> str:
        return f"LogitLens(names={self.names}, token_ids={list(self.token_ids.shape)}, probs={list(self.probs.shape)})"

    def table(self, tokenizer: Tokenizer, row: int = 0) -> str:
        """The lens of batch row ``row`` as text: one line per layer, one column per position,
        each cell the top next token and its probability (what ``minigpt2 lens`` prints)."""
        if not -self.token_ids.shape[0] <= row < self.token_ids.shape[0]:
            raise ValueError(f"row={row} is out of range for a batch of {self.token_ids.shape[0]}")
        top = self.token_ids[row, :, :, 0].tolist()  # (rows, T)
        prob = self.probs[row, :, :, 0].tolist()
        cells = [[f"{quote_token(tokenizer.decode([t]))} {p:.2f}" for t, p in zip(tr, pr)] for tr, pr in zip(top, prob)]
        names = [n.removesuffix(".resid_post") for n in self.names]
        if self.input_ids is not None:
            header = [quote_token(tokenizer.decode([i])) for i in self.input_ids[row].tolist()]
        else:
            header = [str(j) for j in range(len(cells[0]))]
        widths = [max(len(header[j]), *(len(r[j]) for r in cells)) for j in range(len(header))]
        w0 = max(len("input"), *(len(n) for n in names))
        lines = [f"{'input':<{w0}}  " + "  ".join(f"{h:<{w}}" for h, w in zip(header, widths))]
        for name, r in zip(names, cells):
            lines.append(f"{name:<{w0}}  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)))
        return "\n".join(line.rstrip() for line in lines)


def quote_token(token: str, width: int = 14) -> str:
    """A token for a table cell: quoted (so spaces show), shortened past ``width``."""
    s = repr(token)
    return s if len(s) <= width else s[: width - 2] + "\u2026" + s[-1]


def logit_lens(model: GPT2, input_ids: torch.Tensor, k: int = 5) -> LogitLens:
    """Top-k next tokens and probabilities at every layer and position.

    Each row applies the model's final LayerNorm and tied unembedding to one residual
    stream (the embeddings, then each block's output), as if the network stopped there:
    probs = softmax(lm_head(ln_f(resid))). Early rows show what the embeddings alone
    suggest; the last row equals the model's own top-k.
    """
    vocab = model.config.vocab_size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k={k!r} must be an integer in [1, vocab_size={vocab}]")
    streams = ["embed"] + [f"h.{i}.resid_post" for i in range(model.config.n_layer)]
    with torch.inference_mode():
        _, acts = run_with_cache(model, input_ids, names=streams)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        ids, probs = [], []
        for name in streams:  # one layer at a time: [B, T, V] logits are the big tensor
            p = F.softmax(model.lm_head(model.transformer.ln_f(acts[name])).float(), dim=-1)  # (B, T, V)
            top = p.topk(k, dim=-1)
            ids.append(top.indices)
            probs.append(top.values)
    return LogitLens(streams, torch.stack(ids, dim=1), torch.stack(probs, dim=1), input_ids)  # (B, rows, T, k)


# ------------------------------------------------------------------------------ score
@dataclass
class ScoreResult:
    """How well a model predicts a text.

    tokens: each token of the text, decoded on its own.
    token_ids: their ids.
    logprobs: natural-log probability of each token given the tokens before it, aligned
        with ``tokens``; None where a token is not predicted: the first token (context
        only, nothing is prepended) and, with ``stride == n_positions``, the first token
        of each later window.
    nll: total negative log-likelihood (nats) of the scored tokens.
    count: how many tokens were scored.
    perplexity: exp(nll / count).
    """

    tokens: list[str]
    token_ids: list[int]
    logprobs: list[float | None]
    nll: float
    count: int
    perplexity: float
    stride: int = field(default=0, repr=False)  # the stride the windows used

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: tokens, logprobs (null where not scored), nll, perplexity."""
        return {"tokens": self.tokens, "logprobs": self.logprobs, "nll": self.nll, "perplexity": self.perplexity}


def score(model: GPT2, tokenizer: Tokenizer, text: str, stride: int | None = None) -> ScoreResult:
    """Per-token log-probs, total NLL and perplexity of ``text`` under ``model``.

    A text longer than n_positions is read through windows of n_positions tokens that start
    every ``stride`` tokens (default n_positions // 2); each window scores only the tokens
    no earlier window scored, with everything before them in the window as context
    (transformers' sliding-window recipe, labels -100 on the context). So each token is
    scored once, with at least n_positions - stride tokens of context once the first
    window is past. The result equals transformers' loss on the same windows weighted by
    the tokens each window counts.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
        raise ValueError(f"tokenizer must have encode and decode (a minigpt2.Tokenizer), got {type(tokenizer).__name__}")
    n_pos = model.config.n_positions
    if stride is None:
        stride = max(1, n_pos // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= n_pos:
        raise ValueError(f"stride={stride!r} must be an integer in [1, n_positions={n_pos}]")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError(
            f"score needs at least 2 tokens (the first is context only); the text has {len(ids)}"
        )
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"token id {max(ids)} is outside the model's vocabulary [0, {model.config.vocab_size})")

    N = len(ids)
    seq = torch.tensor(ids, device=model.device)
    logprobs: list[float | None] = [None] * N
    prev_end = 0
    with torch.inference_mode():
        for begin in range(0, N, stride):
            end = min(begin + n_pos, N)
            first = max(prev_end, begin + 1)  # first token this window scores (needs one of context)
            window = seq[begin:end][None]  # (1, W)
            logits = model(window)[0, first - begin - 1 : end - begin - 1]  # (n, V): predict first..end-1
            lp = F.log_softmax(logits.float(), dim=-1).gather(1, seq[first:end, None])[:, 0]  # (n,)
            logprobs[first:end] = lp.tolist()
            prev_end = end
            if end == N:
                break
    scored = [lp for lp in logprobs if lp is not None]
    nll = -math.fsum(scored)
    tokens = [tokenizer.decode([i]) for i in ids]
    return ScoreResult(tokens, list(ids), logprobs, nll, len(scored), math.exp(nll / len(scored)), stride)


# ------------------------------------------------------------------ parameter counts
def num_parameters(model: GPT2, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """Number of parameters, the tied lm_head counted once (gpt2: 124,439,808).

    Same arguments and result as transformers' ``num_parameters``: ``exclude_embeddings``
    leaves out wte and wpe (and so the head tied to wte).
    """
    total = 0
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        if only_trainable and not p.requires_grad:
            continue
        if exclude_embeddings and name in ("transformer.wte.weight", "transformer.wpe.weight"):
            continue
        total += p.numel()
    return total


def parameter_breakdown(model: GPT2) -> dict[str, int]:
    """Parameters per component, in module order: ``transformer.wte``, ``transformer.wpe``,
    then for each block ``transformer.h.N.ln_1`` / ``attn`` / ``ln_2`` / ``mlp``, then
    ``transformer.ln_f``. The values sum to ``num_parameters()``; the tied lm_head adds
    nothing (its weight is wte's)."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:4]) if parts[:2] == ["transformer", "h"] else ".".join(parts[:-1])
        out[key] = out.get(key, 0) + p.numel()
    return out


# ------------------------------------------------------------------ inspect, explained
def _n(x: int) -> str:
    return f"{x:,}"


def parameter_table(model: GPT2) -> list[str]:
    """The parameter table ``minigpt2 inspect`` prints: embeddings, the blocks (one block's
    parts, times n_layer), ln_f, the tied head, and the total."""
    parts = parameter_breakdown(model)
    total = num_parameters(model)
    L = model.config.n_layer
    blocks = sum(v for k, v in parts.items() if k.startswith("transformer.h."))
    block0 = {k.split(".", 3)[3]: v for k, v in parts.items() if k.startswith("transformer.h.0.")}
    per_block = sum(block0.values())
    pct = (lambda v: f"{100 * v / total:5.1f}%") if total else (lambda v: "")
    rows: list[tuple[str, str, str]] = [
        ("transformer.wte   token embeddings", _n(parts.get("transformer.wte", 0)), pct(parts.get("transformer.wte", 0))),
        ("transformer.wpe   position embeddings", _n(parts.get("transformer.wpe", 0)), pct(parts.get("transformer.wpe", 0))),
        (f"transformer.h     {L} blocks", _n(blocks), pct(blocks)),
    ]
    for local, what in (("ln_1", "LayerNorm"), ("attn", "c_attn + c_proj"), ("ln_2", "LayerNorm"), ("mlp", "c_fc + c_proj")):
        rows.append((f"  each block: {local:<5}{what}", _n(block0.get(local, 0)), ""))
    rows.append(("  each block: total", _n(per_block), ""))
    rows.append(("transformer.ln_f  final LayerNorm", _n(parts.get("transformer.ln_f", 0)), pct(parts.get("transformer.ln_f", 0))))
    rows.append(("lm_head           tied to wte, counted once", "0", ""))
    rows.append(("total", _n(total), ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'component':<{w0}}  {'parameters':>{w1}}"]
    for name, count, share in rows:
        if name == "total":
            lines.append("-" * (w0 + w1 + 9))
        lines.append(f"{name:<{w0}}  {count:>{w1}}  {share}".rstrip())
    return lines


def config_lines(model: GPT2) -> list[str]:
    """``key: value`` for every config field, plus the derived head_dim and inner_dim."""
    import dataclasses

    c = model.config
    items = [(f.name, getattr(c, f.name)) for f in dataclasses.fields(c) if f.name != "extra"]
    items += [("head_dim (n_embd / n_head)", c.head_dim), ("inner_dim (MLP width)", c.inner_dim)]
    w = max(len(k) for k, _ in items)
    return [f"{k:<{w}}  {v}" for k, v in items]


def _explanations(model: GPT2) -> dict[str, list[str]]:
    """Plain-words notes for each part of the module tree, keyed by its path (with "h.*"
    standing for every block); shapes use this model's config."""
    c = model.config
    C, V, P, nh, hs, L, inner = c.n_embd, c.vocab_size, c.n_positions, c.n_head, c.head_dim, c.n_layer, c.inner_dim
    act = {"gelu_new": "GELU (GPT-2's tanh approximation)", "gelu_pytorch_tanh": "GELU (tanh approximation)",
           "gelu": "GELU (exact)", "relu": "ReLU", "silu": "SiLU"}.get(c.activation_function, c.activation_function)
    return {
        "": [f"GPT-2 language model: token ids [B, T] in, next-token logits [B, T, {V}] out."],
        "transformer": [f"The decoder stack: embeddings, {L} block{'s' if L != 1 else ''}, final LayerNorm. [B, T] ids -> [B, T, {C}]."],
        "transformer.wte": [
            f"Token embedding table, {V} rows x {C}: row i is the vector of token i.",
            f"[B, T] ids -> [B, T, {C}]. Also the output layer (see lm_head).",
        ],
        "transformer.wpe": [
            f"Learned position embeddings, one {C}-vector per position 0..{P - 1}; added to the",
            f"token embeddings so the model knows word order. This table is why T <= {P}.",
        ],
        "transformer.drop": ["Dropout on the summed embeddings (training only; identity in eval())."],
        "transformer.h": [
            f"The {L} transformer block{'s' if L != 1 else ''}, applied in order; each reads and writes the",
            f"residual stream x [B, T, {C}]: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)).",
        ],
        "transformer.h.*": [
            f"One block; the {L} blocks have this same shape but each its own weights." if L > 1 else "The one block.",
        ],
        "transformer.h.*.ln_1": [
            f"LayerNorm before attention (pre-LN): each position's {C}-vector rescaled to",
            "mean 0, variance 1, then times a learned gain plus a learned bias.",
        ],
        "transformer.h.*.attn": [
            f"Masked (causal) self-attention, {nh} heads of {hs}: each position mixes in",
            "information from itself and earlier positions, never later ones.",
            *(["This checkpoint also divides the scores of block N by N + 1 (scale_attn_by_inverse_layer_idx)."]
              if c.scale_attn_by_inverse_layer_idx else []),
            *(["Scores and softmax are computed in float32 (reorder_and_upcast_attn)."]
              if c.reorder_and_upcast_attn else []),
        ],
        "transformer.h.*.attn.c_attn": [
            f"Queries, keys and values, each {C} wide, from one fused matmul: {C} -> 3 x {C} = {3 * C}",
            f"(one big product is faster than three small ones). [B, T, {C}] -> [B, T, {3 * C}] -> split",
            f"into q, k, v, each viewed as {nh} heads: [B, {nh}, T, {hs}].",
            f"Weights: softmax(q k^T / sqrt({hs}) + causal mask) [B, {nh}, T, T]; output: weights @ v.",
        ],
        "transformer.h.*.attn.c_proj": [
            f"Output projection: the {nh} heads' outputs side by side [B, T, {C}] -> [B, T, {C}],",
            "added to the residual stream. (Conv1D: a linear layer stored [in, out].)",
        ],
        "transformer.h.*.attn.attn_dropout": ["Dropout on the attention weights (training only)."],
        "transformer.h.*.attn.resid_dropout": ["Dropout on the attention output before the residual add (training only)."],
        "transformer.h.*.ln_2": ["LayerNorm before the MLP (pre-LN), as ln_1."],
        "transformer.h.*.mlp": [
            f"Position-wise feed-forward network: each position on its own, {C} -> {inner} -> {C}.",
        ],
        "transformer.h.*.mlp.c_fc": [
            f"Expand {C} -> {inner} ({inner // C if inner % C == 0 else inner / C}x wider): [B, T, {C}] -> [B, T, {inner}].",
        ],
        "transformer.h.*.mlp.c_proj": [f"Project back {inner} -> {C}, added to the residual stream."],
        "transformer.h.*.mlp.act": [f"The nonlinearity between them: {act}, applied element-wise."],
        "transformer.h.*.mlp.dropout": ["Dropout on the MLP output before the residual add (training only)."],
        "transformer.ln_f": [
            f"Final LayerNorm on the last block's output [B, T, {C}] (pre-LN models need one at the end).",
        ],
        "lm_head": [
            f"Unembedding: [B, T, {C}] -> logits [B, T, {V}], one score per vocabulary token.",
            "Its weight IS wte's (tied): one matrix both reads tokens in and scores them out,",
            "so it adds no parameters.",
        ],
    }


def _tree_paths(lines: list[str]) -> list[str | None]:
    """The module path of each line of ``str(model)`` (None for closing parentheses)."""
    import re

    stack: list[tuple[int, str]] = []  # (indent, path)
    out: list[str | None] = []
    for i, line in enumerate(lines):
        if i == 0:
            out.append("")
            continue
        m = re.match(r"^(\s*)\((.+?)\): ", line)
        if not m:
            out.append(None)
            continue
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        if "-" in name or name.isdigit():  # "(0-11): 12 x GPT2Block(" stands for every block
            name = "*"
        path = f"{parent}.{name}" if parent else name
        stack.append((indent, path))
        out.append(path)
    return out


def explained_tree(model: GPT2) -> list[tuple[str, str | None, list[str]]]:
    """``str(model)`` as (line, module path, notes) triples: the path is the module's name
    ("transformer.h.*.attn.c_attn", "*" standing for every block; "" for the model, None for
    a closing parenthesis) and the notes are ``inspect --explain``'s plain words for it."""
    lines = str(model).splitlines()
    notes = _explanations(model)
    return [(line, path, notes.get(path, []) if path is not None else []) for line, path in zip(lines, _tree_paths(lines))]


def module_tree(model: GPT2, explain: bool = False) -> list[str]:
    """``str(model)`` line by line (the leaf lines are transformers' print of the same
    checkpoint); with ``explain``, each part followed by ``#`` notes in plain words."""
    if not explain:
        return str(model).splitlines()
    out: list[str] = []
    for line, _, notes in explained_tree(model):
        out.append(line)
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        out.extend(f"{indent}# {note}" for note in notes)
    return out


def shape_walkthrough(model: GPT2) -> list[str]:
    """The forward pass as a list of steps and the shape after each (B batch, T tokens)."""
    c = model.config
    C, V, nh, hs, inner = c.n_embd, c.vocab_size, c.n_head, c.head_dim, c.inner_dim
    steps = [
        ("input_ids", "[B, T]"),
        ("x = wte(input_ids) + wpe(0..T-1)", f"[B, T, {C}]"),
        (f"for each of the {c.n_layer} blocks:", ""),
        ("  a = ln_1(x)", f"[B, T, {C}]"),
        ("  q, k, v = split(c_attn(a))", f"3 x [B, T, {C}] -> 3 x [B, {nh}, T, {hs}]"),
        (f"  w = softmax(q k^T / sqrt({hs}) + causal mask)", f"[B, {nh}, T, T]  (h.N.attn.pattern)"),
        ("  y = w v, heads side by side", f"[B, {nh}, T, {hs}] -> [B, T, {C}]"),
        ("  x = x + c_proj(y)", f"[B, T, {C}]  (h.N.resid_mid)"),
        ("  m = act(c_fc(ln_2(x)))", f"[B, T, {inner}]  (h.N.mlp.act)"),
        ("  x = x + c_proj(m)", f"[B, T, {C}]  (h.N.resid_post)"),
        ("x = ln_f(x)", f"[B, T, {C}]"),
        ("logits = x wte^T  (lm_head, tied)", f"[B, T, {V}]"),
    ]
    w = max(len(s) for s, _ in steps)
    return [f"{s:<{w}}  {shape}".rstrip() for s, shape in steps]


def describe(model: GPT2, explain: bool = False) -> str:
    """What ``minigpt2 inspect`` prints: module tree, parameter table, config (and, with
    ``explain``, notes on every part and the shapes that flow between them)."""
    sections = [("Module tree", module_tree(model, explain))]
    if explain:
        sections.append(("Forward pass, shapes (B = batch, T = tokens)", shape_walkthrough(model)))
    sections.append(("Parameters", parameter_table(model)))
    sections.append(("Config", config_lines(model)))
    return "\n\n".join(f"{title}\n" + "\n".join(lines) for title, lines in sections)


__all__ = [
    "ActivationCache",
    "LogitLens",
    "ScoreResult",
    "UnknownActivationError",
    "describe",
    "explained_tree",
    "logit_lens",
    "num_parameters",
    "parameter_breakdown",
    "parameter_table",
    "run_with_cache",
    "score",
]
