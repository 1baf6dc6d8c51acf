"""The opt-in compiled decode step: ``torch.compile`` of fast.Decoder's one-token step.

    model = minigpt2.GPT2.from_pretrained("gpt2", compile=True)   # or model.compile_decoding()
    model.generate(ids, max_new_tokens=64)   # the first step compiles (tens of seconds), later ones reuse it

What is compiled is the decoder's step for one new token per row against the KV cache:
embeddings, every block's layer norms, attention and MLP, ln_f and the unembedding, as
one graph (inductor fuses the small operations between the matrix products). The matrix
products stay the host's chosen kernels (kernels.py), called from the graph as an opaque
custom op, and the cache is written in place by another one, so the graph neither copies
the cache nor changes the arithmetic of the products. Shapes are dynamic (cache length,
batch size), so one compilation serves a whole generation and later ones; prompts run
through the eager Decoder (their GEMMs are compute-bound: nothing to gain).

Measured (docs/performance.md): on the 2-core CPU hosts here a 124M step is ~95 % matrix
products, and the compiled step is as fast as the eager Decoder, not faster; it is
opt-in for that reason and for its compile time (``compile_seconds``). On CUDA this is
where CUDA graphs would come from; no GPU was available to test that, so on a GPU
``compile_decoding`` warns and generation stays eager.

Rules as for the fast path (CONVENTIONS.md): nothing here is a parameter or buffer, the
compiled function lives in a table keyed weakly by the model, prepared weights are
rebuilt when a weight changes (the graph calls the kernels by handle, so a rebuild needs
no recompilation), and any hook, gradient or training mode takes the plain path.
"""

from __future__ import annotations

import itertools
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import fast

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import GPT2

_LINEARS: dict[int, Any] = {}  # handle -> the prepared kernel's mm: (N, in) -> (N, out)
_handles = itertools.count()
_ops: tuple[Any, Any] | None = None


def _custom_ops() -> tuple[Any, Any]:
    """minigpt2::prepared_linear and minigpt2::cache_write, registered on first use."""
    global _ops
    if _ops is None:

        @torch.library.custom_op("minigpt2::prepared_linear", mutates_args=())
        def prepared_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
            """x (N, in) -> (N, out_features) through the prepared kernel registered under ``handle``."""
            return _LINEARS[handle](x)

        @prepared_linear.register_fake
        def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
            return x.new_empty(x.shape[0], out_features)

        @torch.library.custom_op("minigpt2::cache_write", mutates_args=("kv",))
        def cache_write(kv: torch.Tensor, layer: int, new: torch.Tensor, start: int) -> None:
            """Store new (B, T, 2, nh, hs) k|v at positions start.. of layer in kv
            [n_layer, 2, B, nh, L, hs] (KVCache.kv), in place."""
            kv[layer].permute(1, 3, 0, 2, 4).narrow(1, start, new.shape[1]).copy_(new)

        @cache_write.register_fake
        def _(kv: torch.Tensor, layer: int, new: torch.Tensor, start: int) -> None:
            return None

        _ops = (prepared_linear, cache_write)
    return _ops


class CompiledStep:
    """One model's compiled one-token step, bound to a Decoder's prepared kernels."""

    def __init__(self, dec: fast.Decoder) -> None:
        self.handles = [next(_handles) for _ in range(4 * len(dec.layers) + 1)]
        weakref.finalize(self, _release, list(self.handles))
        self.bind(dec)
        self.compiled = torch.compile(self._step, dynamic=True)
        self.compile_seconds: dict[str, float] = {}  # signature -> seconds of the call that compiled it

    def bind(self, dec: fast.Decoder) -> None:
        """Point the handles at this Decoder's prepared kernels (after a rebuild too)."""
        p = dec.p
        for h, pl in zip(self.handles, [*p.blocks, p.unembed]):
            _LINEARS[h] = pl.mm
        self.out = [pl.out_features for pl in [*p.blocks, p.unembed]]
        # What the step reads besides the kernels (the model's own tensors, unchanged by a rebuild).
        self.wte, self.wpe, self.ln_f, self.shape = dec.wte, dec.wpe, dec.ln_f, (dec.C, dec.nh, dec.hs)
        self.layers = [(ln_1, sdpa, ln_2, act) for ln_1, sdpa, _, _, ln_2, _, act, _ in dec.layers]

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None, kv: torch.Tensor,
              start: int) -> torch.Tensor:  # fmt: skip
        prepared_linear, cache_write = _custom_ops()
        hd, out = self.handles, self.out

        def linear(x: torch.Tensor, j: int) -> torch.Tensor:
            return prepared_linear(x, hd[j], out[j])

        B = ids.shape[0]
        C, nh, hs = self.shape
        x = (F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)).view(B, C)
        for i, (ln_1, sdpa, ln_2, act) in enumerate(self.layers):
            qkv = linear(torch.layer_norm(x, *ln_1), 4 * i).view(B, 1, 3, nh, hs)
            cache_write(kv, i, qkv.narrow(2, 1, 2), start)
            k, v = kv[i, 0].narrow(2, 0, start + 1), kv[i, 1].narrow(2, 0, start + 1)  # (B, nh, S, hs)
            y = sdpa(qkv.select(2, 0).transpose(1, 2), k, v, bias)  # (B, nh, 1, hs)
            x = x + linear(y.transpose(1, 2).reshape(B, C), 4 * i + 1)
            x = x + linear(act(linear(torch.layer_norm(x, *ln_2), 4 * i + 2)), 4 * i + 3)
        return linear(torch.layer_norm(x, *self.ln_f), len(hd) - 1).float()

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None,
                 cache: KVCache) -> torch.Tensor:  # fmt: skip
        signature = f"batch {ids.shape[0]}, {'padded' if bias is not None else 'no padding'}"
        first = signature not in self.compile_seconds
        t = time.perf_counter()
        logits = self.compiled(ids, positions, bias, cache.kv, cache.length)
        if first:
            self.compile_seconds[signature] = time.perf_counter() - t
        cache.advance(1)
        return logits


def _release(handles: list[int]) -> None:
    for h in handles:
        _LINEARS.pop(h, None)


_steps: weakref.WeakKeyDictionary[GPT2, CompiledStep] = weakref.WeakKeyDictionary()


class CompiledDecoder(fast.Decoder):
    """fast.Decoder whose one-token steps run the model's compiled step (prompts stay eager)."""

    def __init__(self, model: GPT2, p: Any, hooks: Any = None) -> None:
        super().__init__(model, p, hooks)
        step = _steps.get(model)
        if step is None:
            step = _steps[model] = CompiledStep(self)
        else:
            step.bind(self)
        self.step = step

    def ready(self) -> bool:
        p = self.p
        ok = super().ready()  # may rebuild the prepared kernels
        if ok and self.p is not p:
            self.step.bind(self)
        return ok

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: KVCache | None, last_only: bool = True) -> torch.Tensor:  # fmt: skip
        from .model import attention_bias

        if cache is None or ids.shape[1] != 1 or not last_only:
            return super().__call__(ids, positions, mask, cache, last_only)
        bias = attention_bias(mask, 1, cache.length, ids.device)  # None without padding
        return self.step(ids, positions, bias, cache)


def enable(model: GPT2, enabled: bool = True) -> None:
    """Turn the compiled decode step on or off for ``model`` (see GPT2.compile_decoding)."""
    if enabled and model.device.type != "cpu":
        warnings.warn(
            f"compile=True: the compiled decode step is CPU-only in this version (CUDA graphs were not "
            f"built: no GPU was available to test them); generation on {model.device.type} stays eager",
            stacklevel=3,
        )
    model._compile_decoding = bool(enabled)
    if not enabled:
        _steps.pop(model, None)


def compile_seconds(model: GPT2) -> dict[str, float]:
    """Seconds each compilation of the model's decode step took, by signature ({} if none yet)."""
    step = _steps.get(model)
    return {} if step is None else dict(step.compile_seconds)
