"""GPT-2, top to bottom, in plain PyTorch.

References:
  1) OpenAI's TensorFlow release: https://github.com/openai/gpt-2/blob/master/src/model.py
  2) transformers' modeling_gpt2.py, whose module names, tensor layouts and numerics
     this file reproduces, so that a Hub state dict loads with no renaming table.
  3) "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019).

Reading order: Conv1D, the activations, GPT2Attention, GPT2MLP, GPT2Block, GPT2Model
(embeddings + the block stack + ln_f), GPT2 (the language-model head on top).

Shapes: B = batch, T = new tokens in this call, S = keys attended to (past + T),
C = n_embd, nh = n_head, hs = head_dim = C // nh, V = vocab_size.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import generation, internals
from .cache import KVCache
from .config import GPT2Config
from .generation_config import GenerationConfig

#: fn(activation, name) -> replacement tensor or None (keep the activation).
HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]


class Conv1D(nn.Module):
    """A linear layer with the weight stored [in, out] (nx, nf), as GPT-2's TF code did.

    y = x @ W + b. OpenAI wrote it as a 1x1 convolution; the name and the transposed
    layout stayed in every checkpoint, so keeping them means loading needs no transpose.
    """

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight)  # (B*T, nf)
        return out.view(*x.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


# Activations. Each class name is transformers' for that config value, so `print(model)`
# shows the same leaf lines as transformers' print of the same checkpoint.
class NewGELUActivation(nn.Module):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel, eq. 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GELUTanh(nn.Module):
    """The same tanh approximation, through PyTorch's fused kernel (config: gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class GELUActivation(nn.Module):
    """The exact GELU, x * Phi(x), with Phi the standard normal CDF (config: gelu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class SiLUActivation(nn.Module):
    """x * sigmoid(x) (config: silu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu_new": NewGELUActivation,
    "gelu_pytorch_tanh": GELUTanh,
    "gelu": GELUActivation,
    "relu": nn.ReLU,
    "silu": SiLUActivation,
}


class _Tapped(nn.Module):
    """A module whose activations hooks can read or replace (see ``GPT2.hooks``).

    ``taps`` maps a local name ("ln_1", "attn.q", ...) to (fn, full name); it is None
    unless hooks are installed, so the normal forward pays one attribute test per tap.
    """

    taps: dict[str, tuple[HookFn, str]] | None = None

    def tap(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.taps is None or name not in self.taps:
            return x
        fn, full_name = self.taps[name]
        return _apply_hook(fn, x, full_name)


def _apply_hook(fn: HookFn, x: torch.Tensor, name: str) -> torch.Tensor:
    """fn(x, name), checked: None keeps x; a replacement must have x's shape (cast to its dtype/device)."""
    out = fn(x, name)
    if out is None:
        return x
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"hook for {name!r} returned {got}; expected a tensor of shape {tuple(x.shape)}")
    return out.to(device=x.device, dtype=x.dtype)  # e.g. torch.zeros(shape): fp32 on cpu


def _chain(outer: HookFn, inner: HookFn) -> HookFn:
    """Two hooks on one name (nested ``hooks()`` blocks): the outer block's first."""
    return lambda x, name: _apply_hook(inner, _apply_hook(outer, x, name), name)


class GPT2Attention(_Tapped):
    """Masked multi-head self-attention with q, k, v from one fused projection (c_attn)."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = config.n_head, config.head_dim, layer_idx
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)  # q, k, v side by side
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # softmax(q k^T * scale) v: scale = 1/sqrt(hs) ("Attention Is All You Need", eq. 1),
        # further divided by (layer + 1) in checkpoints trained with that option.
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.upcast = config.reorder_and_upcast_attn

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if self.taps is not None:
            q, k, v = self.tap("q", q), self.tap("k", k), self.tap("v", v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs): past + new
        if self.taps is not None and "pattern" in self.taps:
            y = self._explicit_attention(q, k, v, mask)
        else:
            y = self._sdpa(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The fused kernel. mask None means plain causal attention over q and k of equal length,
        or no mask at all for one new token (it may see every key)."""
        dtype = q.dtype
        if self.upcast and dtype != torch.float32:  # reorder_and_upcast_attn: scores in fp32
            q, k, v = q.float(), k.float(), v.float()
        is_causal = mask is None and q.shape[2] > 1
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
        )
        return y.to(dtype)

    def _explicit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The same attention written out, so the pattern can be read (inspection path only)."""
        T, S = q.shape[2], k.shape[2]
        att = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # (B, nh, T, S)
        if mask is None:
            mask = causal_mask(T, S, q.device)
        att = att.masked_fill(~mask, float("-inf"))
        att = self.tap("pattern", F.softmax(att, dim=-1)).to(v.dtype)  # rows sum to 1
        return self.attn_dropout(att) @ v  # (B, nh, T, hs)


class GPT2MLP(_Tapped):
    """Position-wise feed-forward: expand to inner_dim (4 C), nonlinearity, project back."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.inner_dim, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.inner_dim)
        self.act = ACTIVATIONS[config.activation_function]()
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tap("act", self.act(self.c_fc(x)))  # (B, T, inner_dim)
        return self.dropout(self.c_proj(h))


class GPT2Block(_Tapped):
    """One pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        if self.taps is None:
            x = x + self.attn(self.ln_1(x), mask, cache)
            x = x + self.mlp(self.ln_2(x))
            return x
        # The same two lines, with every intermediate offered to the hooks.
        x = self.tap("resid_pre", x)
        x = x + self.tap("attn.out", self.attn(self.tap("ln_1", self.ln_1(x)), mask, cache))
        x = self.tap("resid_mid", x)
        x = x + self.tap("mlp.out", self.mlp(self.tap("ln_2", self.ln_2(x))))
        return self.tap("resid_post", x)


class GPT2Model(_Tapped):
    """Token + position embeddings, the stack of blocks, and the final LayerNorm."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C), after ln_f. See ``GPT2.forward`` for the arguments."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids[None]  # one row
        input_ids = _check_input_ids(input_ids, self.config.vocab_size)
        B, T = input_ids.shape
        if cache is not None:
            _check_cache(cache, B, self.config)
        past = cache.length if cache is not None else 0
        _check_length(past, T, self.config.n_positions, cache)
        if attention_mask is not None:
            attention_mask = _check_attention_mask(attention_mask, B, past + T, input_ids.device)
        if position_ids is None:
            position_ids = default_position_ids(T, past, attention_mask, input_ids.device)
        else:
            position_ids = _check_position_ids(position_ids, B, T, self.config.n_positions)
        mask = attention_bias(attention_mask, T, past, input_ids.device)

        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        x = self.tap("embed", self.drop(x)) if self.taps is not None else self.drop(x)
        for block in self.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its inside during backward.
                x = checkpoint(block, x, mask, cache, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        return self.tap("ln_f", x) if self.taps is not None else x


class GPT2(nn.Module):
    """GPT-2 with its language-model head: logits = ln_f(transformer(ids)) @ wte^T."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, counted once
        self._compile_decoding = False  # compile_decoding(): generation's one-token step compiled
        # The defaults of generate: the checkpoint's generation_config.json once loaded; for a
        # model built from a config, what transformers derives from that config (bos / eos / pad).
        self.generation_config = GenerationConfig.from_model_config(config.to_dict())
        self.name_or_path: str | None = None  # where from_pretrained found the weights
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: scale residual-path projections by 1/sqrt(N), N = 2 per block
        # (attention and MLP each add to the residual stream).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (Conv1D, nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits, float32 [B, T, V], whatever the weights' dtype.

        input_ids: [B, T] token ids in [0, vocab_size) (a 1-D tensor is one row).
        attention_mask: [B, past + T], 1 for real tokens and 0 for padding.
        position_ids: [B, T]. By default they continue from the cache, and with padding
            they follow the mask (cumsum - 1), so a left-padded row matches the row alone.
        cache: a ``KVCache`` that this call reads from and appends to.
        """
        h = self.transformer(input_ids, attention_mask, position_ids, cache)
        return self.lm_head(h).float()

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each block in the backward pass (training only): less memory, same gradients."""
        return self.transformer.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.transformer.gradient_checkpointing = bool(value)

    def gradient_checkpointing_enable(self) -> None:
        """transformers' spelling of ``model.gradient_checkpointing = True``."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Next-token cross-entropy: logits at t are scored against labels at t + 1 (the shift
        happens here), -100 is ignored, as in transformers' ``GPT2LMHeadModel(labels=...)``.

        Explicit ``labels`` keep transformers' semantics exactly: every label that is not -100
        is a target, whatever the mask says about the position that predicts it.

        Without ``labels`` they come from ``input_ids`` and the mask: a target counts only when
        it is a real token *and* the position predicting it is one. So a padded row's loss is
        the row's loss alone, with left padding too. (transformers' usual recipe,
        ``labels = input_ids.masked_fill(attention_mask == 0, -100)``, also scores the first
        real token of a left-padded row as predicted from the padding before it: the same as
        this with right padding or none, one target more per left-padded row.)

        ``reduction="mean"`` averages over counted targets; "sum" returns the sum, for gradient
        accumulation normalised by the targets of all micro-batches.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
        input_ids = _check_input_ids(input_ids[None] if _is_1d(input_ids) else input_ids, self.config.vocab_size)
        if labels is None:
            labels = input_ids
            if attention_mask is not None:
                real = _check_attention_mask(attention_mask, *input_ids.shape, labels.device) != 0
                counted = real.clone()
                counted[:, 1:] &= real[:, :-1]  # the predicting position (t - 1) is real too
                labels = labels.masked_fill(~counted, -100)
        else:
            labels = _check_labels(labels[None] if _is_1d(labels) else labels, self.config.vocab_size)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        logits = self(input_ids, attention_mask)  # (B, T, V) fp32
        targets = labels[:, 1:].to(logits.device)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction=reduction
        )

    # -------------------------------------------------------------- generation
    generate = generation.generate  # model.generate(input_ids, ..., max_new_tokens=N): see generation.py
    stream = generation.stream  # model.stream(tokenizer, prompt, ...): the same, step by step
    compute_transition_scores = generation.compute_transition_scores  # each generated token's score

    def compile_decoding(self, enabled: bool = True) -> GPT2:
        """Opt in to (or out of) the compiled decode step: generation's one-token step runs
        as one ``torch.compile`` graph (see compiled.py). Compiled lazily by the first
        generation step (tens of seconds; ``minigpt2.compiled.compile_seconds(model)``). On
        CUDA it is CUDA graphs against a static cache (``mode="reduce-overhead"``). Returns
        the model."""
        from .compiled import enable

        enable(self, enabled)
        return self

    # ------------------------------------------------------------------- cache
    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache for ``batch_size`` rows of up to ``max_len`` (default n_positions) tokens.

        With the compiled decode step on CUDA (``compile_decoding``) it is a static cache
        (compiled.static_cache): zeroed, of a bucketed length >= max_len, pooled per model."""
        c = self.config
        max_len = c.n_positions if max_len is None else max_len
        if max_len > c.n_positions:
            raise ValueError(f"max_len={max_len} exceeds n_positions={c.n_positions}")
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be positive")
        w = self.transformer.wte.weight
        if self._compile_decoding:
            from . import compiled

            if compiled.uses_graphs(self):
                return compiled.static_cache(self, batch_size, max_len)
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.head_dim, device=w.device, dtype=w.dtype)

    # ------------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, HookFn]) -> Iterator[GPT2]:
        """Read or replace named activations during forwards inside the ``with`` block.

        Names: ``embed``, ``h.N.{resid_pre, ln_1, attn.q, attn.k, attn.v, attn.pattern,
        attn.out, resid_mid, ln_2, mlp.act, mlp.out, resid_post}``, ``ln_f``. Each fn gets
        (activation, name) and returns a replacement of the same shape, or None to keep it.
        Hooks are removed on exit, also after an exception. Blocks may nest (e.g.
        ``run_with_cache`` inside a patching block): on a shared name the outer hook runs first.
        """
        targets = self._tap_targets()
        plan: dict[int, dict[str, tuple[HookFn, str]]] = {}
        for name, fn in fns.items():
            if name not in targets:
                raise ValueError(f"unknown activation name {name!r}; see model.activation_names()")
            if not callable(fn):
                raise ValueError(f"hook for {name!r} is not callable")
            module, local = targets[name]
            plan.setdefault(id(module), {})[local] = (fn, name)
        modules = {id(m): m for m, _ in targets.values()}
        previous = {key: m.taps for key, m in modules.items()}  # an enclosing hooks() block's
        try:
            for key, taps in plan.items():
                merged = dict(previous[key] or {})
                for local, (fn, name) in taps.items():
                    merged[local] = (_chain(merged[local][0], fn) if local in merged else fn, name)
                modules[key].taps = merged
            yield self
        finally:
            for key, m in modules.items():
                m.taps = previous[key]

    def _tap_targets(self) -> dict[str, tuple[_Tapped, str]]:
        """Every hookable name -> (module that emits it, its local name there)."""
        t = self.transformer
        out: dict[str, tuple[_Tapped, str]] = {"embed": (t, "embed")}
        for i, block in enumerate(t.h):  # in the order the forward computes them
            for local in ("resid_pre", "ln_1"):
                out[f"h.{i}.{local}"] = (block, local)
            for local in ("q", "k", "v", "pattern"):
                out[f"h.{i}.attn.{local}"] = (block.attn, local)
            for local in ("attn.out", "resid_mid", "ln_2"):
                out[f"h.{i}.{local}"] = (block, local)
            out[f"h.{i}.mlp.act"] = (block.mlp, "act")
            for local in ("mlp.out", "resid_post"):
                out[f"h.{i}.{local}"] = (block, local)
        out["ln_f"] = (t, "ln_f")
        return out

    def activation_names(self) -> list[str]:
        """Every name ``hooks`` and ``run_with_cache`` accept, in forward order."""
        return list(self._tap_targets())

    # Inspection (internals.py): activation cache and parameter counts.
    run_with_cache = internals.run_with_cache
    num_parameters = internals.num_parameters
    parameter_breakdown = internals.parameter_breakdown

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
    ) -> GPT2:
        """Load a checkpoint from a local directory or the Hugging Face Hub (see loading.py).

        ``compile=True`` opts in to the compiled decode step (``compile_decoding``)."""
        from .loading import load_pretrained

        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        model = load_pretrained(cls, name_or_path, revision=revision, device=device, dtype=dtype)
        return model.compile_decoding() if compile else model

    def save_pretrained(self, directory: str | os.PathLike[str], **card: Any) -> None:
        """Write a checkpoint directory that transformers and minigpt2 both load (see loading.py)."""
        from .loading import save_pretrained

        save_pretrained(self, directory, **card)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype


# --------------------------------------------------------------------------- masks
def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool: query i (at absolute position S - T + i) may see keys 0 .. S - T + i."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


def attention_bias(attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device) -> torch.Tensor | None:
    """The boolean mask SDPA needs (True = may attend), or None for plain causal attention.

    None covers the common cases without building anything: no padding and either no
    past (SDPA's is_causal) or a single new token (it may see every key).
    """
    S = past + T
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0 or T == 1:
            return None
        return causal_mask(T, S, device)[None, None]  # (1, 1, T, S)
    mask = causal_mask(T, S, device)[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    # A padding query may have no visible key at all (left padding, first positions); let
    # such a query see itself so softmax never divides by zero (its output is unused). Rows
    # with a visible key keep exactly the causal & padding mask, as transformers builds it.
    itself = torch.arange(S, device=device)[None, :] == torch.arange(past, S, device=device)[:, None]
    return mask | (itself & ~mask.any(dim=-1, keepdim=True))  # (B, 1, T, S)


def default_position_ids(
    T: int, past: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Positions of the T new tokens: past .. past + T - 1, or, with padding, counted over
    real tokens only (cumsum(mask) - 1, padding at 0), as transformers 5's generate does."""
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(past, past + T, device=device)[None]  # (1, T)
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos[:, past:]  # (B, T)


# ---------------------------------------------------------------------- input checks
def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The ids as int64 (or int32), after checking type, shape and range."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a LongTensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    # nn.Embedding indexes with int64 or int32 only; widen the small integer types.
    return input_ids if input_ids.dtype in (torch.int64, torch.int32) else input_ids.long()


def _is_1d(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 1


def _check_labels(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Labels are token ids in [0, vocab_size) or -100 (ignored); cross_entropy would
    raise a bare IndexError (or a CUDA assert) for anything else."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of token ids, got {got}")
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= vocab_size))]
    if bad.numel():
        raise ValueError(f"label {int(bad[0])} is outside the vocabulary [0, {vocab_size}) and is not -100 (ignore)")
    return labels.long()


def _check_length(past: int, T: int, n_positions: int, cache: KVCache | None) -> None:
    if past + T > n_positions:
        raise ValueError(
            f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds n_positions={n_positions}"
        )
    if cache is not None and past + T > cache.max_len:
        raise ValueError(f"cache holds {cache.max_len} positions; {past} cached + {T} new do not fit")


def _check_cache(cache: KVCache, B: int, config: GPT2Config) -> None:
    """A cache made for another batch size or another model would fail deep inside a layer."""
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache (model.make_cache), got {type(cache).__name__}")
    if cache.batch_size != B:
        raise ValueError(f"cache was made for batch_size={cache.batch_size}; input_ids has batch {B}")
    n_layer, _, n_head, _, head_dim = cache.k.shape
    if (n_layer, n_head, head_dim) != (config.n_layer, config.n_head, config.head_dim):
        raise ValueError(
            f"cache has n_layer={n_layer}, n_head={n_head}, head_dim={head_dim}; the model has "
            f"n_layer={config.n_layer}, n_head={config.n_head}, head_dim={config.head_dim}"
        )


def _check_attention_mask(mask: torch.Tensor, B: int, S: int, device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor of 0/1, got {type(mask).__name__}")
    if mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] != S:
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} does not match [batch={B}, cached + new={S}]"
        )
    return mask.to(device)


def _check_position_ids(position_ids: torch.Tensor, B: int, T: int, n_positions: int) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (
        torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8,
    ):
        got = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must be an integer tensor, got {got}")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != T or position_ids.shape[0] not in (1, B):
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match [batch={B}, seq={T}]")
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if lo < 0 or hi >= n_positions:
        raise ValueError(f"position id {lo if lo < 0 else hi} is outside [0, n_positions={n_positions})")
    return position_ids.long()
