"""What the explorer page shows, as JSON-able dicts: pure functions of (model, tokenizer, request values).

Every number comes from the library itself, so the page can be held against it:

- tokens: ``Tokenizer.encode`` / ``decode_bytes``;
- architecture: ``internals.explained_tree`` (what ``minigpt2 inspect --explain`` prints),
  ``shape_walkthrough``, ``parameter_breakdown``, ``num_parameters``, the config;
- next token: the fp32 logits of the last position, computed as generation's prefill computes
  them (the transformer on the prompt, the tied unembedding on its last position); the page
  applies the processors itself (static/processors.js, held against ``minigpt2.sampling`` by
  the browser tests) and ``step`` draws or picks a token with ``sampling.process`` +
  ``sampling.sample`` / ``sampling.greedy``;
- attention: ``run_with_cache(ids, names=["h.L.attn.pattern"])``, one layer per call;
- logit lens: ``logit_lens(model, ids, k)``;
- strategies: ``model.stream`` (``model.generate`` for beam search) per strategy, each token
  shown with its probability under the distribution it was drawn from (``sampling.process``
  on the model's logits at that step) and the top alternatives.

Each function validates its inputs and raises ``BadValue`` (a ValueError that names the
request field) with the value and the limit. Nothing here knows about HTTP; routes.py does.
Large float arrays travel as base64 little-endian float32 (``{"dtype", "shape", "base64"}``):
the 50257 logits of GPT-2 are 268 kB that way instead of ~1 MB of JSON numbers.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import internals, sampling
from ..generation import generate

if TYPE_CHECKING:
    from ..model import GPT2
    from ..tokenizer import Tokenizer


class BadValue(ValueError):
    """A request value that cannot be used; ``param`` names the field (for the HTTP error body)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------ helpers
def f32(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as ``{"dtype": "float32", "shape", "base64"}`` (little-endian float32 bytes)."""
    a = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def piece(tokenizer: Tokenizer, token_id: int) -> str:
    """One token as text for display: its bytes decoded, or ``\\xNN`` escapes where they are not
    whole UTF-8 characters (a character split over two tokens); ``<id N>`` for an id the
    tokenizer does not have (a padded model vocabulary). Spaces and newlines stay as they are:
    the page makes them visible."""
    try:
        data = tokenizer.decode_bytes([token_id])
    except ValueError:
        return f"<id {token_id}>"
    return data.decode("utf-8", errors="backslashreplace")


def vocabulary(model: GPT2, tokenizer: Tokenizer) -> list[str]:
    """``piece`` of every id the model can predict, 0 .. vocab_size - 1 (sent to the page once)."""
    return [piece(tokenizer, i) for i in range(model.config.vocab_size)]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(param: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise BadValue(param, f"{param} must be a finite number, got {x!r}")
    return float(x)


def _integer(param: str, x: Any, low: int, high: int) -> int:
    if not _is_int(x) or not low <= x <= high:
        raise BadValue(param, f"{param} must be an integer in [{low}, {high}], got {x!r}")
    return x


def check_ids(model: GPT2, input_ids: Any, *, extra: int = 0) -> list[int]:
    """The prompt's token ids, checked: a non-empty list of ids in [0, vocab_size) whose
    length plus ``extra`` new tokens fits in n_positions."""
    if not isinstance(input_ids, (list, tuple)):
        raise BadValue("input_ids", f"input_ids must be a list of token ids, got {input_ids!r:.40} (type {type(input_ids).__name__})")
    bad = next((i for i, x in enumerate(input_ids) if not _is_int(x)), None)
    if bad is not None:
        x = input_ids[bad]
        raise BadValue("input_ids", f"input_ids must hold token ids (integers), but input_ids[{bad}] is {x!r:.40} "
                                    f"(type {type(x).__name__})")
    if not input_ids:
        raise BadValue("input_ids", "input_ids is empty: give at least one token")
    V, n = model.config.vocab_size, model.config.n_positions
    bad = next((i for i in input_ids if not 0 <= i < V), None)
    if bad is not None:
        raise BadValue("input_ids", f"token id {bad} is outside the model's vocabulary [0, {V})")
    if len(input_ids) + extra > n:
        more = f" + {extra} new tokens" if extra else ""
        raise BadValue("input_ids", f"prompt of {len(input_ids)} tokens{more} exceeds n_positions={n}")
    return list(input_ids)


def _tensor(model: GPT2, ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=model.device)  # (1, T)


# ---------------------------------------------------------------------- what the library has
def _processor_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(sampling.Processors)}


#: The next-token panel's processors, in transformers' order (``sampling.process``).
PANEL_PROCESSORS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "typical_p")


def available_warpers() -> list[str]:
    """The processors the page shows, in transformers' order."""
    return list(PANEL_PROCESSORS)


def model_info(model: GPT2, tokenizer: Tokenizer, name: str | None = None) -> dict[str, Any]:
    """Metadata the page needs once: the checkpoint, its sizes, what the library can do."""
    c = model.config
    return {
        "name": name or model.name_or_path or "GPT-2",
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "n_positions": c.n_positions,
        "vocab_size": c.vocab_size,
        "num_parameters": internals.num_parameters(model),
        "eos_token_id": tokenizer.eos_token_id,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "processors": available_warpers(),
        "strategies": [s.to_dict() for s in strategies()],
        "defaults": dataclasses.asdict(ProcessorSettings()),
    }


# ------------------------------------------------------------------------------- tokens
def tokens(model: GPT2, tokenizer: Tokenizer, prompt: Any = None, input_ids: Any = None) -> dict[str, Any]:
    """The prompt as GPT-2 sees it: ids and their BPE pieces, counted against n_positions.

    Give ``prompt`` (text: encoded with the tokenizer; an empty prompt is ``<|endoftext|>``,
    GPT-2's start of a document, as ``minigpt2 generate ""``) or ``input_ids`` (the page sends
    these after step-through picks, since decoding and re-encoding may not give the same ids).
    A prompt longer than n_positions is not an error here (``too_long`` says so, and the other
    panels refuse it with the numbers).
    """
    note = None
    if input_ids is not None:
        if prompt is not None:
            raise BadValue("prompt", "give prompt or input_ids, not both")
        if not isinstance(input_ids, (list, tuple)) or not input_ids or not all(_is_int(i) for i in input_ids):
            raise BadValue("input_ids", "input_ids must be a non-empty list of token ids")
        V = model.config.vocab_size
        bad = next((i for i in input_ids if not 0 <= i < V), None)
        if bad is not None:
            raise BadValue("input_ids", f"token id {bad} is outside the model's vocabulary [0, {V})")
        ids = list(input_ids)
    else:
        if not isinstance(prompt, str):
            raise BadValue("prompt", f"prompt must be a string, got {type(prompt).__name__}")
        ids = tokenizer.encode(prompt)
        if not ids:
            ids, note = [tokenizer.eos_token_id], "empty prompt: GPT-2 starts from <|endoftext|>"
        V = model.config.vocab_size
        bad = next((i for i in ids if i >= V), None)
        if bad is not None:
            raise BadValue("prompt", f"the tokenizer gives id {bad}, outside the model's vocabulary [0, {V})")
    n = model.config.n_positions
    return {
        "input_ids": ids,
        "pieces": [piece(tokenizer, i) for i in ids],
        "count": len(ids),
        "n_positions": n,
        "too_long": len(ids) > n,
        "text": tokenizer.decode(ids),
        "note": note,
    }


# ------------------------------------------------------------------------- architecture
# The other two families, for the comparison table. Sizes are the base checkpoints', as
# transformers builds them from these configs (tests/test_explore_data.py rebuilds each on
# the meta device and counts): bert-base-uncased = BertConfig() with BertForMaskedLM;
# facebook/bart-base = BartConfig(vocab_size=50265, d_model=768, 6 + 6 layers, 12 heads,
# ffn 3072, 1024 positions); t5-base = T5Config(vocab_size=32128, d_model=768, d_kv=64,
# d_ff=3072, 12 + 12 layers, 12 heads).
OTHER_FAMILIES: list[dict[str, Any]] = [
    {
        "model": "BERT (bert-base)", "family": "encoder-only",
        "stacks": "one encoder stack",
        "self_attention": "unmasked: every position sees all",
        "cross_attention": "none",
        "objective": "recover masked tokens (~15% per text)",
        "output": "a contextual vector per input token",
        "positions": "learned absolute table (512) + segment embeddings",
        "layer_norm": "after each residual add (post-LN)",
        "n_layer": "12", "n_embd": 768, "n_head": 12, "inner_dim": 3072, "n_positions": 512,
        "vocab_size": 30522, "num_parameters": 109_514_298,
        "good_at": "understanding a given text: classification, tagging, extractive QA, embeddings",
    },
    {
        "model": "BART (bart-base)", "family": "encoder-decoder",
        "stacks": "encoder, then decoder",
        "self_attention": "encoder unmasked; decoder masked",
        "cross_attention": "every decoder block reads the encoder output",
        "objective": "rebuild a corrupted text (denoising)",
        "output": "generated output text",
        "positions": "learned absolute table (1024)",
        "layer_norm": "after each residual add (post-LN)",
        "n_layer": "6 + 6", "n_embd": 768, "n_head": 12, "inner_dim": 3072, "n_positions": 1024,
        "vocab_size": 50265, "num_parameters": 139_420_416,
        "good_at": "text in, text out: summarisation, translation, rewriting",
    },
    {
        "model": "T5 (t5-base)", "family": "encoder-decoder",
        "stacks": "encoder, then decoder",
        "self_attention": "encoder unmasked; decoder masked",
        "cross_attention": "every decoder block reads the encoder output",
        "objective": "write the masked-out spans (span corruption)",
        "output": "generated output text",
        "positions": "none in the input: a learned relative bias on attention scores",
        "layer_norm": "before each sub-layer, RMSNorm (no mean, no bias)",
        "n_layer": "12 + 12", "n_embd": 768, "n_head": 12, "inner_dim": 3072, "n_positions": None,
        "vocab_size": 32128, "num_parameters": 222_903_552,
        "good_at": "every task framed as text in, text out",
    },
]

COMPARISON_ROWS = [
    ("family", "Family"), ("stacks", "Stacks"), ("self_attention", "Self-attention"),
    ("cross_attention", "Cross-attention"), ("objective", "Trained to"), ("output", "Output"),
    ("positions", "Positions"), ("layer_norm", "LayerNorm"), ("n_layer", "Layers"),
    ("n_embd", "Width (d_model)"), ("n_head", "Heads"), ("inner_dim", "MLP width"),
    ("n_positions", "Context (positions)"), ("vocab_size", "Vocabulary"),
    ("num_parameters", "Parameters"), ("good_at", "Good at"),
]


def comparison(model: GPT2) -> dict[str, Any]:
    """The notebook's architecture table: GPT-2 (this checkpoint's own numbers) beside BERT,
    BART and T5 (their base sizes). ``rows`` is [(key, label)], ``columns`` one dict each."""
    c = model.config
    gpt2 = {
        "model": f"GPT-2 ({model.name_or_path or 'this checkpoint'})", "family": "decoder-only",
        "stacks": "one decoder stack",
        "self_attention": "masked (causal): position i sees 0..i",
        "cross_attention": "none",
        "objective": "predict the next token, at every position",
        "output": "next-token distribution at each position",
        "positions": f"learned absolute table ({c.n_positions})",
        "layer_norm": "before each sub-layer (pre-LN) + a final one",
        "n_layer": str(c.n_layer), "n_embd": c.n_embd, "n_head": c.n_head, "inner_dim": c.inner_dim,
        "n_positions": c.n_positions, "vocab_size": c.vocab_size, "num_parameters": internals.num_parameters(model),
        "good_at": "open-ended generation, continuing text, scoring text (perplexity)",
    }
    return {"rows": COMPARISON_ROWS, "columns": [gpt2, *OTHER_FAMILIES]}


def _module_counts(model: GPT2, path: str | None) -> dict[str, Any]:
    """Parameters under one path of the explained tree ("*" = every block: block 0's shape)."""
    if path is None:
        return {}
    if path == "":
        return {"parameters": internals.num_parameters(model), "shapes": {}}
    if path == "lm_head":  # its weight is wte's: shown with its shape, counted once (under wte)
        return {"parameters": 0, "shapes": {"weight": list(model.lm_head.weight.shape)}, "tied_to": "transformer.wte.weight"}
    module = model.get_submodule(path.replace("*", "0"))
    shapes = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
    return {"parameters": sum(p.numel() for p in module.parameters()), "shapes": shapes}


def architecture(model: GPT2) -> dict[str, Any]:
    """The checkpoint's module tree with shapes, parameter counts and ``inspect --explain``'s
    notes; the forward pass's shapes; parameters per component; the config; the comparison
    with BERT / BART / T5. Reads only the config and the parameters' shapes."""
    tree = []
    for line, path, notes in internals.explained_tree(model):
        stripped = line.lstrip()
        tree.append({"line": stripped, "depth": (len(line) - len(stripped)) // 2, "path": path, "notes": notes,
                     **_module_counts(model, path)})
    c = model.config
    config = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "extra"}
    config.update(head_dim=c.head_dim, inner_dim=c.inner_dim)
    return {
        "tree": tree,
        "walkthrough": internals.shape_walkthrough(model),
        "parameter_table": internals.parameter_table(model),
        "parameters": internals.parameter_breakdown(model),
        "num_parameters": internals.num_parameters(model),
        "config": config,
        "comparison": comparison(model),
    }


# --------------------------------------------------------------------------- next token
def last_logits(model: GPT2, ids: Sequence[int]) -> torch.Tensor:
    """fp32 next-token logits [V] after ``ids``, as generation's prefill computes them: the
    transformer on the prompt, the tied unembedding on the last position only."""
    with torch.inference_mode():
        h = model.transformer(_tensor(model, ids))  # (1, T, C)
        return model.lm_head(h[0, -1]).float()  # (V,)


def next_token(model: GPT2, input_ids: Any) -> dict[str, Any]:
    """The raw next-token logits at the last position, for the page's processors: ``logits``
    is [vocab_size] float32 (base64), ``input_ids`` the prompt they follow."""
    ids = check_ids(model, input_ids)
    return {"input_ids": ids, "logits": f32(last_logits(model, ids))}


@dataclass(frozen=True)
class ProcessorSettings:
    """The next-token panel's controls, with transformers' meanings and sampling defaults
    (``do_sample=True`` alone is temperature 1.0 and top-k 50). min_p / typical_p: None = off."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float = 1.0

    @classmethod
    def parse(cls, values: Any) -> ProcessorSettings:
        """From the request's ``settings`` object; BadValue names a bad or unknown field."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise BadValue("settings", f"settings must be an object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BadValue(unknown[0], f"unknown setting {unknown[0]!r}; settings are {', '.join(sorted(known))}")
        v = {**dataclasses.asdict(cls()), **values}
        t = _number("temperature", v["temperature"])
        if not t > 0:
            raise BadValue("temperature", f"temperature={t} must be > 0 (Pick greedy takes the most likely token)")
        k = v["top_k"]
        if not _is_int(k) or k < 0:
            raise BadValue("top_k", f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        p = _number("top_p", v["top_p"])
        if not 0 < p <= 1:
            raise BadValue("top_p", f"top_p={p} must be in (0, 1] (1 = off)")
        min_p = None if v["min_p"] is None else _number("min_p", v["min_p"])
        if min_p is not None and not 0 <= min_p <= 1:
            raise BadValue("min_p", f"min_p={min_p} must be in [0, 1]")
        typical = None if v["typical_p"] is None else _number("typical_p", v["typical_p"])
        if typical is not None and not 0 < typical <= 1:
            raise BadValue("typical_p", f"typical_p={typical} must be in (0, 1] (1 = off)")
        r = _number("repetition_penalty", v["repetition_penalty"])
        if not r > 0:
            raise BadValue("repetition_penalty", f"repetition_penalty={r} must be > 0 (1 = off)")
        return cls(t, k, p, min_p, typical, r)

    def processors(self, do_sample: bool) -> sampling.Processors:
        """The library's ``Processors`` for these settings (greedy: the repetition penalty only,
        as in ``generate(do_sample=False)``)."""
        kw: dict[str, Any] = dict(repetition_penalty=self.repetition_penalty, do_sample=do_sample)
        if do_sample:
            kw.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
            for name in ("min_p", "typical_p"):
                value = getattr(self, name)
                if value is not None and not (name == "typical_p" and value == 1.0):
                    kw[name] = value
        return sampling.Processors(**kw)


def step(
    model: GPT2, tokenizer: Tokenizer, input_ids: Any, *, mode: Any, settings: Any = None, seed: Any = None
) -> dict[str, Any]:
    """Step-through generation: one token after ``input_ids``, chosen by the library.

    mode "greedy": ``sampling.greedy`` after the repetition penalty (``generate(do_sample=False)``);
    mode "sample": ``sampling.sample`` (softmax + torch.multinomial) after every processor the
    settings enable, from ``torch.Generator().manual_seed(seed)`` (a fresh random seed when
    None). Returns the token, its probability under the processed distribution, how many
    tokens the processors kept, and the new ids and text.
    """
    if mode not in ("greedy", "sample"):
        raise BadValue("mode", f"mode must be 'greedy' or 'sample', got {mode!r}")
    s = ProcessorSettings.parse(settings)
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise BadValue("seed", f"seed must be an integer in [0, 2**63), got {seed!r}")
    ids = check_ids(model, input_ids, extra=1)
    logits = last_logits(model, ids)
    p = s.processors(do_sample=mode == "sample")
    with torch.inference_mode():
        scores = sampling.process(p, _tensor(model, ids), logits[None], n_new=0, eos_ids=None)  # (1, V)
        if mode == "greedy":
            token = int(sampling.greedy(scores)[0])
        else:
            g = torch.Generator(device=model.device)
            if seed is None:
                g.seed()  # a fresh random seed
            else:
                g.manual_seed(seed)
            token = int(sampling.sample(scores, g)[0])
        probs = torch.softmax(scores[0], dim=-1)
        kept = int((scores[0] > float("-inf")).sum())
    new = ids + [token]
    return {"token_id": token, "piece": piece(tokenizer, token), "prob": float(probs[token]), "kept": kept,
            "input_ids": new, "text": tokenizer.decode(new)}


# ---------------------------------------------------------------------------- attention
def attention(model: GPT2, input_ids: Any, layer: Any) -> dict[str, Any]:
    """One layer's attention weights, ``run_with_cache``'s ``h.{layer}.attn.pattern``:
    ``pattern`` [n_head, T, T] float32 (base64), row = query position, column = key position;
    the causal mask makes every weight above the diagonal exactly 0."""
    ids = check_ids(model, input_ids)
    layer = _integer("layer", layer, 0, model.config.n_layer - 1)
    name = f"h.{layer}.attn.pattern"
    _, acts = model.run_with_cache(_tensor(model, ids), names=[name])
    return {"layer": layer, "n_head": model.config.n_head, "input_ids": ids, "pattern": f32(acts[name][0])}


# --------------------------------------------------------------------------- logit lens
def lens(model: GPT2, input_ids: Any, k: Any = 5) -> dict[str, Any]:
    """``logit_lens``: for each residual stream (``embed``, then every block's output) and each
    position, the top-``k`` next tokens after ln_f and the unembedding, with probabilities.
    ``token_ids`` and ``probs`` are [rows][T][k]; the last row is the model's own prediction."""
    ids = check_ids(model, input_ids)
    k = _integer("k", k, 1, min(20, model.config.vocab_size))
    result = internals.logit_lens(model, _tensor(model, ids), k=k)
    return {"names": result.names, "input_ids": ids, "token_ids": result.token_ids[0].tolist(),
            "probs": result.probs[0].tolist()}


# --------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Strategy:
    """One column of the strategy sweep: ``generate`` / ``stream`` keyword arguments."""

    key: str
    label: str
    group: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def beam(self) -> bool:
        return self.kwargs.get("num_beams", 1) > 1

    @property
    def sampled(self) -> bool:
        return bool(self.kwargs.get("do_sample"))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "group": self.group, "settings": dict(self.kwargs)}


def _sampled(**kw: Any) -> dict[str, Any]:
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}


def strategies() -> list[Strategy]:
    """The classic sweep on one prompt ("How to generate text", von Platen 2020; the
    transformers GPT-2 notebook), one knob at a time, every other warper off: greedy;
    temperature 0.5 / 1.0 / 1.5; top-k 1 / 50 / 500; top-p 0.95 / 0.75 / 0.5; beam search;
    then min-p 0.1 / 0.05 and typical-p 0.9 / 0.5."""
    out = [Strategy("greedy", "greedy", "greedy", {"do_sample": False})]
    out += [Strategy(f"temperature-{t}", f"temperature {t}", "temperature", _sampled(temperature=t)) for t in (0.5, 1.0, 1.5)]
    out += [Strategy(f"top_k-{k}", f"top-k {k}", "top-k", _sampled(top_k=k)) for k in (1, 50, 500)]
    out += [Strategy(f"top_p-{p}", f"top-p {p}", "top-p", _sampled(top_p=p)) for p in (0.95, 0.75, 0.5)]
    out.append(Strategy("beam-5", "beam search, 5 beams", "beam search",
                        {"do_sample": False, "num_beams": 5, "early_stopping": True}))
    out += [Strategy(f"min_p-{p}", f"min-p {p}", "min-p", _sampled(min_p=p)) for p in (0.1, 0.05)]
    out += [Strategy(f"typical_p-{p}", f"typical-p {p}", "typical-p", _sampled(typical_p=p)) for p in (0.9, 0.5)]
    return out


def check_sweep(model: GPT2, input_ids: Any, max_new_tokens: Any, seed: Any) -> tuple[list[int], int, int]:
    """The sweep's request values, checked: (ids, max_new_tokens, seed)."""
    n = _integer("max_new_tokens", max_new_tokens, 1, 256)
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise BadValue("seed", f"seed must be an integer in [0, 2**63), got {seed!r}")
    return check_ids(model, input_ids, extra=n), n, seed


class SweepColumn:
    """One strategy of the sweep, generated a few tokens at a time.

    The tokens are the library's: ``model.stream(...)`` (``model.generate`` for beam search,
    whose best beam is known only at the end), sampled ones from
    ``torch.Generator().manual_seed(seed)``, so a column equals ``model.generate`` with the same
    arguments and generator. Beside the stream a second KV cache follows the same tokens to
    give each one its probability under the distribution it was drawn from
    (``sampling.process`` with the column's processors on the model's logits at that step;
    beam search: the model's own softmax) and the ``alternatives`` most likely tokens there.
    Build and advance it on the thread that owns the model.
    """

    def __init__(
        self, model: GPT2, tokenizer: Tokenizer, input_ids: Sequence[int], strategy: Strategy,
        max_new_tokens: int, seed: int, alternatives: int = 5,
    ) -> None:
        self.model, self.tokenizer, self.strategy = model, tokenizer, strategy
        self.ids = list(input_ids)
        self.max_new_tokens = max_new_tokens
        self.alternatives = alternatives
        self.done = False
        self.finish_reason: str | None = None
        kw = dict(strategy.kwargs)
        self.processors = sampling.Processors(**{k: v for k, v in kw.items() if k in _processor_fields()})
        if strategy.beam:
            self._steps = None
        else:
            gen = torch.Generator(device=model.device).manual_seed(seed) if strategy.sampled else None
            self._steps = iter(model.stream(tokenizer, _tensor(model, self.ids), max_new_tokens=max_new_tokens,
                                            generator=gen, **kw))
        self._eos = set(_eos_ids(model))
        self._made: list[int] = []  # the tokens generated so far
        self._cache: Any = None  # the follower's KV cache (built on the first advance)
        self._pending: torch.Tensor | None = None  # logits [V] that predict the next token
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, n: int = 4) -> dict[str, Any]:
        """Up to ``n`` more tokens (beam search: all of them at once):
        ``{"key", "tokens": [{"id", "piece", "text", "prob", "eos", "alternatives"}], "done",
        "finish_reason"}``; ``finish_reason`` is "eos" or "length" once done."""
        if self.done:
            return {"key": self.strategy.key, "tokens": [], "done": True, "finish_reason": self.finish_reason}
        if self._steps is None:
            new, self.done = self._beam(), True
        else:
            new = []
            while len(new) < n and not self.done:
                step = next(self._steps, None)
                if step is None:  # the stream ended without a token (max_new_tokens reached)
                    self.done = True
                    break
                new.append(step.token)
                self.done = bool(step.finished[0])
        if self.done:
            self.finish_reason = "eos" if new and new[-1] in self._eos else "length"
        start = len(self._made)
        described = self._describe(new, self._follow(new), start) if new else []
        return {"key": self.strategy.key, "tokens": described, "done": self.done, "finish_reason": self.finish_reason}

    def _follow(self, new: list[int]) -> list[torch.Tensor]:
        """The logits [V] that predicted each token of ``new``; feeds them to the follower's
        cache so the next call can go on (the last token of a finished column is not fed)."""
        m = self.model
        with torch.inference_mode():
            if self._cache is None:
                self._cache = m.make_cache(1, len(self.ids) + self.max_new_tokens)
                h = m.transformer(_tensor(m, self.ids), None, None, self._cache)  # (1, T, C)
                self._pending = m.lm_head(h[0, -1]).float()
            feed = new[:-1] if self.done else new
            dists = [self._pending]
            if feed:
                h = m.transformer(_tensor(m, feed), None, None, self._cache)  # (1, n, C)
                dists += list(m.lm_head(h[0]).float())
            if not self.done:
                self._pending = dists.pop()  # predicts the token after ``new``
        return dists

    def _describe(self, new: list[int], logits: list[torch.Tensor], start: int) -> list[dict[str, Any]]:
        """Each new token with its probability and the top alternatives at its step."""
        out = []
        seq = self.ids + self._made + new
        with torch.inference_mode():
            for i, (t, lg) in enumerate(zip(new, logits)):
                n_new = start + i
                ctx = _tensor(self.model, seq[: len(self.ids) + n_new])  # what the step saw
                scores = sampling.process(self.processors, ctx, lg[None], n_new=n_new, eos_ids=None)[0]
                probs = torch.softmax(scores, dim=-1)
                top = probs.topk(min(self.alternatives, probs.shape[-1]))
                eos = t in self._eos
                out.append({
                    "id": t, "piece": piece(self.tokenizer, t), "prob": float(probs[t]), "eos": eos,
                    "text": "" if eos else self._utf8.decode(_token_bytes(self.tokenizer, t), final=False),
                    "alternatives": [{"id": j, "piece": piece(self.tokenizer, j), "prob": q}
                                     for j, q in zip(top.indices.tolist(), top.values.tolist())],
                })
        self._made.extend(new)
        return out

    def _beam(self) -> list[int]:
        """Beam search through ``generate``; the best beam's new tokens, up to its EOS."""
        out = generate(self.model, _tensor(self.model, self.ids), max_new_tokens=self.max_new_tokens,
                       **self.strategy.kwargs)
        new = out[0, len(self.ids):].tolist()
        for i, t in enumerate(new):  # a finished beam is padded after its EOS
            if t in self._eos:
                return new[: i + 1]
        return new


def _eos_ids(model: GPT2) -> list[int]:
    """The EOS ids ``generate`` stops on by default: generation_config.json's, else config.json's."""
    gc = model.generation_config or {"eos_token_id": model.config.eos_token_id}
    eos = gc.get("eos_token_id") if isinstance(gc, Mapping) else getattr(gc, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if _is_int(eos) else [i for i in eos if _is_int(i)]


def _token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    try:
        return tokenizer.decode_bytes([token])
    except ValueError:
        return b""
