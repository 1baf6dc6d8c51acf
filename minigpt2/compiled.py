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
opt-in for that reason and for its compile time (``compile_seconds``).

On CUDA the same flag gives CUDA graphs (:class:`GraphStep`): the step is compiled with
``mode="reduce-overhead"``, so a whole token (~12 launches a block, hundreds in all) replays as
one graph with no Python in between. A graph replays fixed addresses and shapes, so the step
runs against a *static* cache (gpt-fast's design, and transformers' StaticCache): the cache's
length is bucketed (:func:`static_length`), its buffer is zeroed and marked static and kept in
a per-model pool across generate calls (a graph recorded on one buffer replays on it), the
position to write arrives as a tensor, and attention reads every slot of the bucket with a
mask that hides the slots not yet written. One graph serves every step of a bucket.

Rules as for the fast path (CONVENTIONS.md): nothing here is a parameter or buffer, the
compiled function lives in a table keyed weakly by the model, prepared weights are
rebuilt when a weight changes (the graph calls the kernels by handle, so a rebuild needs
no recompilation), and any hook, gradient or training mode takes the plain path.
"""

from __future__ import annotations

import itertools
import time
import types
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
        self.compiled = torch.compile(_own_code(self._step), dynamic=True)
        self.compile_seconds: dict[str, float] = {}  # signature -> seconds of the call that compiled it

    def bind(self, dec: fast.Decoder) -> None:
        """Point the handles at this Decoder's prepared kernels (after a rebuild too)."""
        p = dec.p
        # The decoder's own products (a half-precision c_fc may carry the GELU: fast.Decoder).
        products = [f for _, _, c_attn, proj, _, c_fc, _, mlp_proj in dec.layers for f in (c_attn, proj, c_fc, mlp_proj)]
        for h, mm in zip(self.handles, [*products, p.unembed.mm]):
            _LINEARS[h] = mm
        self.out = [pl.out_features for pl in [*p.blocks, p.unembed]]
        # What the step reads besides the kernels (the model's own tensors, unchanged by a rebuild).
        self.wte, self.wpe, self.ln_f, self.shape = dec.wte, dec.wpe, dec.ln_f, (dec.C, dec.nh, dec.hs)
        self.layers = dec.portable  # (ln_1, attention, ln_2, act): no native C calls, which break the graph

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


def _own_code(method: Any) -> Any:
    """``method`` with a private copy of its code object. Dynamo keeps compiled graphs per code
    object and stops compiling for one after ``torch._dynamo.config.recompile_limit`` (8)
    graphs; each model's step guards on that model's tensors, so with one shared code object a
    process's ninth model (or signature) would quietly run eager. A copy per step gives each
    model its own allowance."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(own, method.__self__)


def _release(handles: list[int]) -> None:
    for h in handles:
        _LINEARS.pop(h, None)


_steps: weakref.WeakKeyDictionary[GPT2, CompiledStep] = weakref.WeakKeyDictionary()


class CompiledDecoder(fast.Decoder):
    """fast.Decoder whose one-token steps run the model's compiled step (prompts stay eager)."""

    def __init__(self, model: GPT2, p: Any, hooks: Any = None) -> None:
        super().__init__(model, p, hooks)
        self.native_step = None  # one-token steps are the compiled graph's (prompts run op by op)
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
            self.native_step = None  # (the rebuild brought a plain Decoder's)
            self.step.bind(self)
        return ok

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: KVCache | None, last_only: bool = True) -> torch.Tensor:  # fmt: skip
        from .model import attention_bias

        if cache is None or ids.shape[1] != 1 or not last_only:
            return super().__call__(ids, positions, mask, cache, last_only)
        bias = attention_bias(mask, 1, cache.length, ids.device)  # None without padding
        return self.step(ids, positions, bias, cache)


# ------------------------------------------------------------------ CUDA: CUDA graphs
#: The smallest static cache length; lengths are rounded up to a power of two from here (and
#: capped at n_positions), so a handful of graphs serve every length.
MIN_STATIC_LENGTH = 128


def static_length(max_len: int, n_positions: int) -> int:
    """The static cache length that holds ``max_len`` positions: the next power of two from
    MIN_STATIC_LENGTH, at most ``n_positions`` (attention reads every slot of it, masked, so
    a bucket costs at most twice the reads of the positions in use, and few graphs are built)."""
    L = MIN_STATIC_LENGTH
    while L < max_len:
        L *= 2
    return min(L, n_positions)


def uses_graphs(model: GPT2) -> bool:
    """Whether the model's compiled step is the CUDA-graph one (GraphStep, a static cache):
    on CUDA. (The tests run GraphStep on the CPU too, where inductor compiles it without
    graphs, by patching this.)"""
    return model.device.type == "cuda"


_pools: weakref.WeakKeyDictionary[GPT2, dict[tuple, list[torch.Tensor]]] = weakref.WeakKeyDictionary()


def static_cache(model: GPT2, batch_size: int, max_len: int) -> KVCache:
    """A zeroed KVCache of ``static_length(max_len)`` positions whose buffer comes from the
    model's pool and goes back to it when the cache is garbage collected.

    The buffer is marked as a static address (``torch._dynamo.mark_static_address``): the
    graph writes it in place and replays on the same memory, so the next generate call of
    the same shape finds the same buffer and replays the graph already recorded. A second
    cache alive at the same time (two interleaved ``stream`` generators) gets a buffer of its
    own (the graph is recorded once more for that address). Zeroed on every checkout: slots
    not yet written are read by attention (masked), and a masked slot must not hold a NaN or
    an inf from an earlier sequence (0 x inf is NaN).

    The pool keeps every buffer it made, per (batch size, length bucket, dtype, device), for
    the model's life: ``model.compile_decoding(False)`` frees them (and the compiled step)."""
    from .cache import KVCache

    c = model.config
    L = static_length(max_len, c.n_positions)
    w = model.transformer.wte.weight
    key = (batch_size, L, w.dtype, w.device)
    free = _pools.setdefault(model, {}).setdefault(key, [])
    if free:
        kv = free.pop().zero_()
    else:
        with torch.inference_mode(False):  # a normal tensor: steps in and out of inference mode may write it
            kv = torch.zeros(c.n_layer, 2, batch_size, c.n_head, L, c.head_dim, device=w.device, dtype=w.dtype)
        torch._dynamo.mark_static_address(kv)
    cache = KVCache(c.n_layer, batch_size, c.n_head, L, c.head_dim, buffer=kv, static=True)
    weakref.finalize(cache, free.append, kv)
    return cache


class GraphStep:
    """One model's one-token step on CUDA, compiled with ``mode="reduce-overhead"`` (CUDA graphs)
    against a static cache (see the module docstring).

    The arithmetic is model.py's, module by module (Conv1D's addmm, the model's activation and
    attention function), with one difference: attention reads every slot of the static cache
    under a mask instead of the filled positions only. Masked slots weigh exactly 0 after the
    softmax, so the result differs from the eager step only by the attention kernel's order of
    summation (fp32 logits within the parity tolerance; greedy tokens equal on the tests)."""

    def __init__(self, model: GPT2) -> None:
        t, c = model.transformer, model.config
        self.shape = (c.n_embd, c.n_head, c.head_dim)
        # Modules, not their tensors: the step reads each parameter through its module when it is
        # traced, so dynamo guards on it and a parameter replaced later (``ln.weight = ...``,
        # ``load_state_dict(assign=True)``) is traced again rather than read stale.
        self.wte, self.wpe, self.ln_f = t.wte, t.wpe, t.ln_f
        self.layers = [
            (b.ln_1, b.attn.c_attn, b.attn._sdpa, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.act, b.mlp.c_proj)
            for b in t.h
        ]
        # CUDA graphs on CUDA; elsewhere (the tests' CPU runs) inductor alone.
        mode = "reduce-overhead" if model.device.type == "cuda" else "default"
        self.compiled = torch.compile(_own_code(self._step), mode=mode, fullgraph=True)
        self.compile_seconds: dict[str, float] = {}
        self.slots: dict[tuple, torch.Tensor] = {}  # (L, device) -> arange(L): the write position as a view

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, kv: torch.Tensor,
              slot: torch.Tensor) -> torch.Tensor:  # fmt: skip
        B = ids.shape[0]
        C, nh, hs = self.shape
        L = kv.shape[4]
        x = (F.embedding(ids, self.wte.weight) + F.embedding(positions, self.wpe.weight)).view(B, C)
        # Key slots this token may see: the ones written so far and itself, and not padding.
        visible = torch.arange(L, device=ids.device) <= slot  # (L,)
        if keep is not None:
            visible = visible & keep  # (B, L)
        mask = visible.view(-1, 1, 1, L)
        for i, (ln_1, c_attn, sdpa, attn_proj, ln_2, c_fc, act, mlp_proj) in enumerate(self.layers):
            qkv = c_attn(torch.layer_norm(x, *fast._norm(ln_1))).view(B, 3, nh, hs)
            # Write this token's k and v at the slot, in place (gpt-fast's index_put on a static buffer).
            kv[i][:, :, :, slot] = qkv[:, 1:].transpose(0, 1).unsqueeze(3)  # (2, B, nh, 1, hs)
            y = sdpa(qkv[:, 0].unsqueeze(2), kv[i, 0], kv[i, 1], mask)  # (B, nh, 1, hs)
            x = x + attn_proj(y.transpose(1, 2).reshape(B, C))
            x = x + mlp_proj(act(c_fc(torch.layer_norm(x, *fast._norm(ln_2)))))
        return F.linear(torch.layer_norm(x, *fast._norm(self.ln_f)), self.wte.weight).float()

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: KVCache) -> torch.Tensor:  # fmt: skip
        """fp32 logits [B, V] of one new token per row; ids, positions [B, 1] (positions may be
        [1, 1]); mask [B, cache.length + 1] 0/1 or None; the cache is written and advanced."""
        L, start = cache.max_len, cache.length
        slots = self.slots.get((L, ids.device))
        if slots is None:
            slots = self.slots[(L, ids.device)] = torch.arange(L, device=ids.device)
        keep = None
        if mask is not None:  # padding: the mask over every slot of the bucket (unwritten ones hidden anyway)
            keep = F.pad(mask.bool(), (0, L - mask.shape[1]))
        signature = f"batch {ids.shape[0]}, length {L}, {'padded' if keep is not None else 'no padding'}"
        first = signature not in self.compile_seconds
        t = time.perf_counter()
        # A new iteration for CUDA graph trees: the last step's output buffers may be reused.
        # (Process-wide: outputs of another reduce-overhead model held across this call would
        # be marked reusable too; clone those, as torch asks of any graph output kept.)
        torch.compiler.cudagraph_mark_step_begin()
        logits = self.compiled(ids, positions, keep, cache.kv, slots.narrow(0, start, 1))
        if first:
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            self.compile_seconds[signature] = time.perf_counter() - t
        cache.advance(1)
        # The graph's output lives in its memory pool and is overwritten by the next replay;
        # generation keeps logits across steps (output_logits, the stream's log-probs).
        return logits.clone()


_graph_steps: weakref.WeakKeyDictionary[GPT2, GraphStep] = weakref.WeakKeyDictionary()


class GraphDecoder:
    """What fast.decoder returns on CUDA with compile_decoding on: one-token steps against a
    static cache run the model's GraphStep; prompts, drafts checked several at a time, a
    cache that is not static, hooks, gradients and training mode run the plain model."""

    numpy_step = False  # fast.between_steps: nothing to do on CUDA

    def __init__(self, model: GPT2, hooks: fast._HookWatch) -> None:
        self.model, self._hooks = model, hooks
        self.check_each_step = True  # see fast.Decoder.ready
        self._answer: bool | None = None
        step = _graph_steps.get(model)
        if step is None:
            step = _graph_steps[model] = GraphStep(model)
        self.step = step

    def ready(self) -> bool:
        """Whether this step may take the graph (the checks of fast.Decoder.ready; with
        ``check_each_step`` False, the answer once computed stands, as there)."""
        if not self.check_each_step and self._answer is not None:
            return self._answer
        self._answer = not (torch.is_grad_enabled() or self.model.training or self._hooks.any())
        return self._answer

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: KVCache | None, last_only: bool = True) -> torch.Tensor:  # fmt: skip
        from .generation import _forward_all, _forward_last

        if cache is None or ids.shape[1] != 1 or not last_only or not cache.static:
            forward = _forward_last if last_only else _forward_all
            return forward(self.model, ids, positions, mask, cache)
        return self.step(ids, positions, mask, cache)


def graph_decoder(model: GPT2, hooks: fast._HookWatch) -> GraphDecoder | None:
    """The CUDA-graph decoder for ``model``, or None where the plain model must run (see
    fast.usable: autograd on, training mode, hooks, a module swapped in)."""
    if torch.is_grad_enabled() or model.training or not fast._standard(model) or hooks.any():
        return None
    return GraphDecoder(model, hooks)


def enable(model: GPT2, enabled: bool = True) -> None:
    """Turn the compiled decode step on or off for ``model`` (see GPT2.compile_decoding)."""
    if enabled and model.device.type not in ("cpu", "cuda"):
        warnings.warn(
            f"compile=True: the compiled decode step runs on CPU and CUDA; generation on "
            f"{model.device.type} stays eager",
            stacklevel=3,
        )
    model._compile_decoding = bool(enabled)
    if not enabled:
        _steps.pop(model, None)
        _graph_steps.pop(model, None)
        _pools.pop(model, None)


def compile_seconds(model: GPT2) -> dict[str, float]:
    """Seconds each compilation of the model's decode step took, by signature ({} if none
    yet): the first call of each signature. (On CUDA, torch's graph trees record the graph on
    the signature's second call, which these seconds do not include.)"""
    step = _steps.get(model) or _graph_steps.get(model)
    return {} if step is None else dict(step.compile_seconds)
