"""The decoding fast path: GPT-2's forward, flattened, on the host's fastest matrix kernels.

Generation spends a token's time streaming every weight matrix once (see kernels.py) and,
in eager PyTorch, a few more milliseconds on everything around those 49 products: module
calls, small tensor ops, views, and their bookkeeping, whose data the streamed weights
have just pushed out of the CPU caches. :class:`Decoder` is the model's forward for
generation with that overhead taken out, and nothing else changed:

- each weight matrix goes through the kernel chosen for this host (kernels.py), prepared
  once and kept in a table keyed weakly by the model (not a parameter or buffer); a prompt
  (more than kernels.ROWS rows) takes the many-row kernel (in fp32 the model's own addmm);
- the same operations in the same order as model.py (and so as transformers), on the
  same tensors: no module calls, the hidden state kept as one (B*T, C) matrix that the
  residual branches are added into in place, one copy of k and v into the cache straight
  from the fused q|k|v output (KVCache.update_fused), and ln_f and the unembedding on the
  last position only. With the plain kernel, fp32 results are bit-identical to the plain
  path (and so to transformers), GPT-2's GELU included: in fp32 it is the 8-step formula
  computed in place (the same operations in the same order, one allocation instead of 7);
- two deliberate differences, in half precision only. GPT-2's GELU is PyTorch's fused tanh
  GELU (the same function computed in fp32 and rounded once) instead of 8 bf16-rounded steps,
  closer to the exact function and 0.4 ms a token faster on the 124M model (for a prompt's
  rows on oneDNN, in the epilogue of c_fc's product, without rounding the pre-activation to
  half precision first; where the native kernel is built with AVX-512, the same function in
  place in C, native.gelu_tanh_: 0.5 against 2 ms for a 1000-token prompt's layer). And a
  decode step's attention runs in fp32 (:func:`one_token_attention`, or the same computation
  in C, native.one_token_attention, where the native kernel is built), 2-4x faster than
  PyTorch's bf16 SDPA for one query. (In fp32 the
  fused kernel is 3-5x faster too but not the same bits: ~1 % of its outputs differ from
  NewGELUActivation's by up to ~1 float32 eps x |x|; fp32 keeps the exact formula so that a
  prompt's logits stay bit-identical to transformers' whatever the step kernel.)

Where every block matrix runs on the native kernel, a one-token step (batch up to
kernels.ROWS rows) does not go op by op at all: :func:`build_native_step` hands it to
native.DecodeStep, the same computation in one C call and one OpenMP parallel region (the
~200 small torch ops of a step cost ~1 ms of a 5.5 ms bf16 token of GPT-2 124M here). In half
precision it rounds where the ops above round (equal to them in the checks here); in fp32 it
is within fp32 rounding of them (its own layer-norm sums and GELU evaluation), and greedy tokens
stay transformers' (tested). Under autocast, and with a cache of another dtype, steps go op by op.

Rules (CONVENTIONS.md, "Fast paths"): it runs only with autograd off, in eval mode, on
CPU, and with no hooks of any kind on the model (minigpt2's ``hooks`` or torch's forward
hooks on any module it would bypass); anything else takes the plain path. Prepared
weights are rebuilt when a source weight changes: they are keyed on each tensor's
``_version`` and ``data_ptr()`` (in-place edits, optimizer steps, ``load_state_dict``,
``.to()``, ``.data =``), checked before every step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module_hooks

from . import hugepages, kernels, native
from .kernels import PreparedLinear

if TYPE_CHECKING:
    from .cache import KVCache
    from .compiled import GraphDecoder
    from .model import GPT2, Conv1D, GPT2Attention


@dataclass
class _Prepared:
    """One model's prepared weights for one batch bucket."""

    batch: int
    block_kernel: str
    unembed_kernel: str
    blocks: list[PreparedLinear]  # one per Conv1D, in model.modules() order
    unembed: PreparedLinear
    rows_kernel: str = "plain"  # the block matrices' kernel for products of more than kernels.ROWS rows
    choice: tuple = ()  # (block kernel, its upcast inner, unembedding kernel, its inner, rows kernel)
    rows: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)  # (N, in) -> (N, out)
    keys: list[tuple] = field(default_factory=list)  # source_key of every weight it was built from
    forced: str | None = None  # kernels.forced() when it was built
    # the decode steps' thread counts: one StepThreads per batch size (rows of a step)
    threads: dict[int, StepThreads] = field(default_factory=dict)

    @property
    def extra_bytes(self) -> int:
        return sum(p.extra_bytes for p in self.blocks) + self.unembed.extra_bytes


_prepared: weakref.WeakKeyDictionary[GPT2, _Prepared] = weakref.WeakKeyDictionary()


def conv1ds(model: GPT2) -> list[Conv1D]:
    """Every Conv1D of the model, in forward order (4 per block)."""
    from .model import Conv1D

    return [m for m in model.transformer.h.modules() if isinstance(m, Conv1D)]


class _HookWatch:
    """Every place a hook can sit on one model, gathered once and cheap to test again: torch's
    global forward hooks, each module's hook dicts (torch mutates them in place), and
    minigpt2's tapped modules (``GPT2.hooks``)."""

    def __init__(self, model: GPT2) -> None:
        from .model import _Tapped

        modules = list(model.modules())
        self.dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.tapped = [m for m in modules if isinstance(m, _Tapped)]

    def any(self) -> bool:
        if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks or any(self.dicts):
            return True
        return any(m.taps is not None for m in self.tapped)


def usable(model: GPT2, hooks: _HookWatch | None = None) -> bool:
    """Whether the fast path may run now: autograd off, eval mode, CPU, GPT-2's own modules
    (nothing swapped in), and no hooks of any kind on the model (``hooks``: the model's
    _HookWatch, if the caller has one)."""
    if torch.is_grad_enabled() or model.training or model.device.type != "cpu":
        return False
    return _standard(model) and not (hooks or _HookWatch(model)).any()


def _standard(model: GPT2) -> bool:
    """The Decoder reproduces these module types only; a model with a module swapped in
    (a custom norm or activation, a wrapped block) takes the plain path."""
    from .model import ACTIVATIONS, GPT2MLP, Conv1D, GPT2Attention, GPT2Block

    t = model.transformer
    if type(t.ln_f) is not torch.nn.LayerNorm or type(t.wte) is not torch.nn.Embedding:
        return False
    if model.lm_head.weight is not t.wte.weight:
        return False
    for b in t.h:
        if type(b) is not GPT2Block or type(b.attn) is not GPT2Attention or type(b.mlp) is not GPT2MLP:
            return False
        if type(b.ln_1) is not torch.nn.LayerNorm or type(b.ln_2) is not torch.nn.LayerNorm:
            return False
        if type(b.mlp.act) not in ACTIVATIONS.values():
            return False
        convs = (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
        if any(type(c) is not Conv1D for c in convs):
            return False
    return True


def _sources(model: GPT2) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]:
    """Block matrices as ([out, in] view, bias), and the unembedding [V, C]."""
    blocks = [(c.weight.t(), c.bias) for c in conv1ds(model)]  # Conv1D stores [in, out]
    return blocks, model.lm_head.weight


#: Measure kernels on at least this many bytes of block weights (more than a last-level
#: cache holds), so the choice reflects streaming from memory, as decoding does.
SAMPLE_BYTES = 256 * 2**20


def _sample(blocks: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The first whole blocks (4 matrices each) holding SAMPLE_BYTES, or all of them."""
    total = 0
    for i in range(0, len(blocks), 4):
        total += sum(w.numel() * w.element_size() for w, _ in blocks[i : i + 4])
        if total >= SAMPLE_BYTES:
            return blocks[: i + 4]
    return blocks


def prepare(model: GPT2, batch_size: int) -> _Prepared:
    """The model's prepared weights for ``batch_size`` rows, built or rebuilt if needed.

    One set per model (a second set would double the memory again): it is rebuilt when a
    weight changed, when the chosen kernels differ, or when oneDNN's layout was packed for
    another batch bucket.
    """
    E = model.lm_head.weight
    bucket = kernels.batch_bucket(batch_size)
    convs = conv1ds(model)
    keys = [kernels.source_key(c.weight, c.bias) for c in convs] + [kernels.source_key(E, None)]
    forced = kernels.forced()
    p = _prepared.get(model)
    if p is not None and p.keys == keys and p.batch == bucket and p.forced == forced:
        return p  # the common case: every generate after the first
    c = model.config
    blocks = _sources(model)[0]
    role = f"blocks n_embd={c.n_embd} inner={c.inner_dim}"
    with torch.no_grad():
        # The kernels read the unembedding in place (or copy it): on huge pages, as the copies
        # made below are (hugepages.py; once moved, this costs nothing again). (The block
        # parameters stay as they are: ``plain`` reads them in place, measured so below.)
        hugepages.collapse([E])
        # Decide on enough blocks to stream from memory (all blocks share their shapes), and
        # on the unembedding; then how the block matrices take many rows (a prompt).
        sample = _sample(blocks)
        block_kernel = kernels.choose(role, sample, bucket)
        block_inner = kernels.upcast_inner(role, sample, bucket) if block_kernel == "upcast" else None
        block_pool = "numpy" if "numpy" in (block_kernel, block_inner) else "torch"
        if block_pool == "numpy":  # a step runs on numpy's threads: the unembedding too
            unembed_kernel, unembed_inner = block_kernel, block_inner
        else:
            # native first: it reads the embedding in place as plain does (no copy either), and
            # with it the C step ends with the unembedding instead of handing it to torch
            torch_kernels = ["native"] + [k for k in kernels.KERNELS if k not in ("numpy", "native")]
            unembed_kernel = kernels.choose("unembed", [(E, None)], bucket, candidates=torch_kernels)
            unembed_inner = None
            if unembed_kernel == "upcast":
                unembed_inner = kernels.upcast_inner("unembed", [(E, None)], bucket, torch_kernels)
        rows_kernel = kernels.choose_rows(role, blocks[:4], block_kernel)
        p = _prepared.get(model)
        if (
            p is not None
            and p.keys == keys
            and p.choice == (block_kernel, block_inner, unembed_kernel, unembed_inner, rows_kernel)
            and (p.batch == bucket or "mkldnn" not in p.choice)
        ):
            p.batch, p.forced = bucket, forced
            return p
        # Drop the old copies before building new ones (the local name held them too: switching
        # gpt2-xl fp32 from numpy's copies to oneDNN's peaked at 19.5 GB instead of 14.2).
        _prepared.pop(model, None)
        p = None
        arena = hugepages.Arena()  # every copy of this set in one: they are freed together
        prepared = [PreparedLinear(block_kernel, w, b, bucket, block_inner, arena) for w, b in blocks]
        p = _Prepared(
            batch=bucket,
            block_kernel=block_kernel,
            unembed_kernel=unembed_kernel,
            blocks=prepared,
            unembed=PreparedLinear(unembed_kernel, E, None, bucket, unembed_inner, arena),
            rows_kernel=rows_kernel,
            choice=(block_kernel, block_inner, unembed_kernel, unembed_inner, rows_kernel),
            rows=[_rows_mm(rows_kernel, pl, w, b) for pl, (w, b) in zip(prepared, blocks)],
            keys=keys,
            forced=forced,
        )
    _prepared[model] = p
    return p


def _rows_mm(
    kernel: str, step: PreparedLinear, w: torch.Tensor, b: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The many-row product for one block matrix: the step kernel's own when they agree (the
    same copy), else the plain addmm on the parameter or a per-call fp32 upcast (no copy)."""
    if kernel == step.kernel:
        return step.mm
    if kernel == "upcast":
        return kernels.upcast_rows(w, b)
    return PreparedLinear(kernel, w, b, 1).mm  # plain: views of the parameters


def release(model: GPT2) -> None:
    """Free the model's prepared weights (they are rebuilt on the next fast-path use)."""
    _prepared.pop(model, None)


def extra_bytes(model: GPT2) -> int:
    """Memory the fast path holds for this model beyond its parameters."""
    p = _prepared.get(model)
    return 0 if p is None else p.extra_bytes


def kernel_names(model: GPT2) -> dict[str, str]:
    """The kernels in use for the block matrices and the unembedding ({} before first use).

    ``blocks`` and ``unembed`` serve decoding steps (up to kernels.ROWS rows), ``upcast:K``
    meaning an fp32 copy on fp32 kernel K; ``prefill`` is the block matrices' kernel for more
    rows (a prompt)."""
    p = _prepared.get(model)
    if p is None:
        return {}

    def name(pl: PreparedLinear) -> str:
        return f"upcast:{pl.fp32.kernel}" if pl.kernel == "upcast" else pl.kernel  # upcast: the fp32 kernel too

    return {"blocks": name(p.blocks[0]), "unembed": name(p.unembed), "prefill": p.rows_kernel}


def _norm(ln: torch.nn.LayerNorm) -> tuple:
    """torch.layer_norm's arguments for ``ln`` (what F.layer_norm passes, without its wrapper)."""
    return (ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _attention(attn: GPT2Attention, lib: native.Library | None) -> Callable[..., torch.Tensor]:
    """GPT2Attention._sdpa in eval mode; without the upcast option, its one SDPA call directly,
    except for one new token in half precision: computed in fp32 by the native kernel
    (native.one_token_attention) when ``lib`` is given, else by :func:`one_token_attention`."""
    if attn.upcast:
        return attn._sdpa
    scale = attn.scale

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if q.shape[2] == 1 and q.dtype in (torch.bfloat16, torch.float16):
            if (lib is not None and q.dtype in lib.dtypes and q.dtype == k.dtype == v.dtype  # (autocast: an fp32 cache)
                    and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):  # fmt: skip
                # the same fp32 computation in one C call, reading the half-precision cache as it
                # is: 12 heads x 64 at 144 positions, 18 us a layer against 40 (one_token_attention)
                return native.one_token_attention(q, k, v, mask, scale, lib)
            return one_token_attention(q, k, v, mask, scale)
        is_causal = mask is None and q.shape[2] > 1  # as _sdpa: no mask and one new token sees every key
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)

    return sdpa


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scale) v for one new token of half-precision q (B, nh, 1, hs) against
    k, v (B, nh, S, hs), with the bool mask (B or 1, 1, 1, S) (True = may attend) or None;
    returns (B, nh, 1, hs) in q's dtype.

    Scores, softmax and the weighted sum run in fp32 (as reorder_and_upcast_attn does; as
    close to the exact values as PyTorch's fused kernel, which also accumulates in fp32).
    Why not that kernel: on the CPU its bf16 path serves one query 2-4x slower than this
    (measured here, 12 heads x 64, per layer: 77 us against 37 at 144 cached positions, 535
    against 125 at 1000, and 4.4 ms against 2.6 at batch 8 and 1000), so a long bf16 generation
    spent more time in attention than in the weights."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)  # (B, nh, 1, S)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ------------------------------------------------------------------ GPT-2's GELU, in place
# The constants as 0-dim float32 tensors: multiplying by a Python float goes through a
# wrapped-number path that costs more than the multiplication of a 3072-vector; the value
# used (the float32 of the constant, as opmath for fp32 and bf16 alike) is the same.
_HALF, _ONE = torch.tensor(0.5), torch.tensor(1.0)
_KAPPA, _BETA = torch.tensor(0.044715), torch.tensor(math.sqrt(2.0 / math.pi))


def gelu_new_(x: torch.Tensor) -> torch.Tensor:
    """NewGELUActivation on x, overwriting x (which the caller owns): the same operations as
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in model.py and transformers, in the
    same order (a + b = b + a exactly), so the same bits, with one allocation instead of 7.
    (``x.pow(3.0)`` is the op ``torch.pow(x, 3.0)`` calls, x * x * x on CPU, without the
    function form's overhead: 3x faster on a 1000 x 3072 prefill activation here.)"""
    t = x.pow(3.0)
    t.mul_(_KAPPA).add_(x).mul_(_BETA).tanh_().add_(_ONE)
    return x.mul_(_HALF).mul_(t)


#: Rows of a prompt's MLP activation that GELU works through at a time: 8 passes over a
#: block of 128 x 3072 fp32 (1.5 MB) stay in the core's cache, 8 passes over a 1000-token
#: prompt's 12 MB do not (elementwise, so the same bits either way).
GELU_ROWS = 128


def _gelu_new_by_rows(x: torch.Tensor) -> torch.Tensor:
    """gelu_new_ on x (N, inner), GELU_ROWS rows at a time."""
    for part in x.split(GELU_ROWS):
        gelu_new_(part)
    return x


# ------------------------------------------------------------------------ the decoder
class Decoder:
    """GPT-2's forward for generation: token ids in, fp32 logits of the last position out.

    Built by :func:`decoder` once per ``generate`` call; :meth:`ready` is checked before every
    step (hooks installed meanwhile, a weight edited), so the plain path takes over whenever
    the fast one may not run. The inputs are generation's, already checked: ids [B, T] in
    the vocabulary, positions [B or 1, T], the 0/1 mask [B, past + T] or None, the cache.
    """

    def __init__(self, model: GPT2, p: _Prepared, hooks: _HookWatch | None = None) -> None:
        from .model import NewGELUActivation

        self.model, self.p = model, p
        c, t = model.config, model.transformer
        self.C, self.nh, self.hs = c.n_embd, c.n_head, c.head_dim
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, _norm(t.ln_f)
        # Per block: (ln_1, attention, c_attn, attn.c_proj, ln_2, c_fc, act, mlp.c_proj), once
        # with the decode-step kernels and once with the many-row ones (a prompt).
        self.layers, self.layers_rows = [], []
        # (ln_1, attention, ln_2, act) per block without the native C calls, which torch.compile
        # cannot trace (compiled.CompiledStep compiles these)
        self.portable: list[tuple] = []
        lib = native.library() if model.device.type == "cpu" else None
        for i, b in enumerate(t.h):
            act = act_rows = portable_act = b.mlp.act.forward
            if type(b.mlp.act) is NewGELUActivation and model.dtype == torch.float32:
                act, act_rows = gelu_new_, _gelu_new_by_rows  # the formula in place, bit for bit
                portable_act = gelu_new_
            elif type(b.mlp.act) is NewGELUActivation:
                act = act_rows = portable_act = _gelu_tanh  # half precision: see the module docstring
                if native.fast_gelu(lib, model.dtype):  # the same function in place, in C
                    act = act_rows = functools.partial(native.gelu_tanh_, lib=lib)
            ln_1, sdpa, ln_2 = _norm(b.ln_1), _attention(b.attn, lib), _norm(b.ln_2)
            self.portable.append((ln_1, _attention(b.attn, None), ln_2, portable_act))
            step, rows = p.blocks[4 * i : 4 * i + 4], p.rows[4 * i : 4 * i + 4]
            c_fc_rows = rows[2]
            half_gelu = type(b.mlp.act) is NewGELUActivation and model.dtype != torch.float32
            if half_gelu and c_fc_rows is step[2].mm and step[2].mm_gelu_tanh is not None:
                # A prompt's rows on oneDNN: the same tanh GELU in the epilogue of c_fc's
                # product (no pass over the activation of its own, and the pre-activation is not
                # rounded to half precision first): a 1000-token bf16 prefill ~3 % faster here.
                # Not for the one-row steps: there oneDNN's fused product measured ~8 % slower
                # a token than the product and a separate GELU.
                c_fc_rows, act_rows = step[2].mm_gelu_tanh, _identity
            self.layers.append((ln_1, sdpa, step[0].mm, step[1].mm, ln_2, step[2].mm, act, step[3].mm))
            self.layers_rows.append((ln_1, sdpa, rows[0], rows[1], ln_2, c_fc_rows, act_rows, rows[3]))
        self.unembed = p.unembed.mm
        # The block matrices on the native kernel: one-token steps run whole in C
        self.native_step = build_native_step(model, p, lib)
        # The decode steps' thread count: one for torch when numpy's BLAS does the products,
        # else a StepThreads per batch size (_threads).
        self.user_threads = torch.get_num_threads()
        self.numpy_step = p.blocks[0].pool == "numpy" and p.unembed.pool == "numpy" and self.user_threads > 1
        self.blas_threads = kernels.numpy_blas_threads() if self.numpy_step else None
        self._probe_x = (torch.ones(1, c.n_embd, dtype=model.dtype), torch.ones(1, c.inner_dim, dtype=model.dtype))
        # What ready() looks at before every step, gathered once: the hooks, and the weights
        # the prepared copies were made from (their version counters and addresses).
        self._hooks = hooks or _HookWatch(model)
        weights = [w for c in conv1ds(model) for w in (c.weight, c.bias)] + [model.lm_head.weight]
        # (Inference tensors have no version counter, and cannot be edited outside inference mode.)
        self._versioned = [w for w in weights if not w.is_inference()]
        # Addresses of every parameter: the layer norms and embeddings are read in place (an
        # in-place edit is seen as it is), but `p.data = new` gives them new storage, which the
        # tensors held here would not follow.
        copied = {id(w) for w in weights}
        self._weights = weights + [w for w in model.parameters() if id(w) not in copied]
        self._keys = self._weight_keys()
        self.check_each_step = True  # see ready()
        self._answer: bool | None = None  # ready()'s last answer

    def _weight_keys(self) -> tuple[list[int], list[int]]:
        return [w._version for w in self._versioned], [w.data_ptr() for w in self._weights]

    def ready(self) -> bool:
        """Whether this step may take the fast path (rebuilding prepared weights if one changed).

        With ``check_each_step`` False (set by a caller that runs no one else's code between its
        steps: greedy and sampled generate()), the answer once computed stands for this
        Decoder's later calls: the checks read every module's hook dicts and every weight's
        version and address, ~0.12 ms a step on the caches a decode step leaves (1.5 % of a
        124M fp32 token on the AMD EPYC host here). A hook added or a weight edited from another
        thread meanwhile is then only partly seen until the next call: layer norms, biases and
        embeddings are read in place, the prepared matrices are not rebuilt."""
        if not self.check_each_step and self._answer is not None:
            return self._answer
        answer = self._check()
        self._answer = answer
        return answer

    def _check(self) -> bool:
        if torch.is_grad_enabled() or self.model.training:
            return False
        if self._hooks.any():
            return False
        if self._weight_keys() != self._keys:
            keep = self.check_each_step
            fresh = Decoder(self.model, prepare(self.model, self.p.batch), self._hooks)
            self.__dict__.update(fresh.__dict__)
            self.check_each_step = keep
        return True

    def hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Final hidden states after ln_f: (B, C) of the last position, or (B, T, C)."""
        from .model import attention_bias

        B, T = ids.shape
        C, nh, hs = self.C, self.nh, self.hs
        past = 0 if cache is None else cache.length
        bias = attention_bias(mask, T, past, ids.device)
        # As model.py: token + position embeddings; the residual stream as (B*T, C) rows, ours
        # to add into in place (the same sums as x = x + f(x)).
        x = (F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)).view(B * T, C)
        layers = self.layers if B * T <= kernels.ROWS else self.layers_rows
        for i, (ln_1, sdpa, c_attn, attn_proj, ln_2, c_fc, act, mlp_proj) in enumerate(layers):
            qkv = c_attn(torch.layer_norm(x, *ln_1)).view(B, T, 3, nh, hs)
            if cache is not None:
                k, v = cache.update_fused(i, qkv.narrow(2, 1, 2))  # (B, nh, S, hs): past + new
            else:
                k, v = qkv.select(2, 1).transpose(1, 2), qkv.select(2, 2).transpose(1, 2)
            y = sdpa(qkv.select(2, 0).transpose(1, 2), k, v, bias)  # (B, nh, T, hs)
            x.add_(attn_proj(y.transpose(1, 2).reshape(B * T, C)))
            x.add_(mlp_proj(act(c_fc(torch.layer_norm(x, *ln_2)))))
        if cache is not None:
            cache.advance(T)
        x = x.view(B, T, C)[:, -1] if last_only else x.view(B, T, C)
        return torch.layer_norm(x, *self.ln_f)  # per row, so the same bits as on every position

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits for hidden states h (..., C): the tied unembedding on the host's kernel."""
        return self.unembed(h.reshape(-1, self.C)).view(*h.shape[:-1], -1).float()

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """fp32 logits of the last position [B, V], or of every position [B, T, V] with
        ``last_only=False`` (assisted decoding checks its drafts so); the cache (if any) is
        appended to. Steps of up to kernels.ROWS rows run on the thread count ``threads`` picks,
        and with the numpy kernel always inside ``_on``: outside it OpenBLAS's and torch's
        thread pools spin against each other (a 5-token check of gpt2-large's shape took 16x a
        one-token step that way)."""
        if ids.numel() > kernels.ROWS:
            return self._forward(ids, positions, mask, cache, last_only)
        threads = self._threads(ids.shape[0])
        if threads is None and not self.numpy_step:
            return self._forward(ids, positions, mask, cache, last_only)
        # Only one-token steps teach StepThreads a step's time: a short prompt (up to kernels.ROWS
        # tokens) or a check of several drafts can take several steps' time, which would read as
        # a contended team and send the steps back to one thread at every call.
        step = last_only and ids.shape[1] == 1
        if threads is None:
            n = self.user_threads
        else:
            n = threads.next() if step else threads.n  # 1 or the full team
        t = time.perf_counter()
        with self._on(n):
            logits = self._forward(ids, positions, mask, cache, last_only)
        if threads is not None and step:
            threads.record(n, time.perf_counter() - t)
            if n == 1 and threads.probe_due():
                threads.probed(self._probe(threads.n, 0), self._probe(1, 1))
        return logits

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None,
        last_only: bool,
    ) -> torch.Tensor:
        """The logits, by the whole native step where it applies (one new token per row, a cache
        of the model's dtype, no autocast), else by hidden() and logits(). A cache whose rows
        write at different positions (the server's slots) says where: ``write_positions``."""
        step = self.native_step
        if (step is not None and last_only and cache is not None and ids.shape[1] == 1 and ids.shape[0] <= kernels.ROWS
                and cache.kv.dtype == step.dtype and not cache.static and not torch.is_autocast_enabled("cpu")):  # fmt: skip
            from .model import attention_bias

            past = cache.length
            bias = attention_bias(mask, 1, past, ids.device)  # (B, 1, 1, S) bool or None
            out = step(ids, positions, None if bias is None else bias.view(ids.shape[0], past + 1), cache.kv, past,
                       getattr(cache, "write_positions", None))  # fmt: skip
            cache.advance(1)
            return out if step.unembeds else self.logits(out)
        return self.logits(self.hidden(ids, positions, mask, cache, last_only))

    def _threads(self, rows: int) -> StepThreads | None:
        """The StepThreads of steps with ``rows`` rows (kept with the prepared kernels across
        generate calls), or None (one thread, or switched off). One per batch size, since a step's
        time depends on its rows: one size's times must not judge another's (a bf16 model whose
        batch-1 steps came first ran its batch-8 steps on one thread, which took over 2x the
        fastest one-row step: 251 against 420 tok/s, on the AVX2 host emulated here)."""
        # the user's team, read when the Decoder was built: generate runs the numpy kernel's
        # steps inside between_steps, where torch is set to one thread
        st = StepThreads.current_for(self.p.threads.get(rows), self.user_threads)
        if st is None:
            self.p.threads.pop(rows, None)
        else:
            self.p.threads[rows] = st
        return st

    @contextlib.contextmanager
    def _on(self, n: int) -> Iterator[None]:
        """Run the products on ``n`` threads (1, or the full team), restoring the settings after:
        torch's, and for the numpy kernel OpenBLAS's (torch then runs on one thread, since the
        products are OpenBLAS's and two spinning thread pools slow each other down)."""
        single = n == 1
        before = torch.get_num_threads()
        if self.numpy_step or single:
            torch.set_num_threads(1)
        if self.numpy_step and single:
            kernels.set_numpy_blas_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
            if self.numpy_step and single:
                kernels.set_numpy_blas_threads(self.blas_threads)

    def _probe(self, n: int, layer: int) -> float:
        """Seconds for one block's three large products on n threads, after an untimed product
        that wakes the team (a step pays that once, not once per product). The team and the
        single thread are timed on different blocks, so neither finds its weights in cache."""
        blocks, i = self.p.blocks, 4 * min(layer, len(self.layers) - 1)
        x, h = self._probe_x
        with self._on(n):
            blocks[i + 1].mm(x)
            t = time.perf_counter()
            blocks[i].mm(x)
            blocks[i + 2].mm(x)
            blocks[i + 3].mm(h)
            return time.perf_counter() - t


def build_native_step(model: GPT2, p: _Prepared, lib: native.Library | None) -> native.DecodeStep | None:
    """The whole one-token step in C (native.DecodeStep) for a model whose block products run on
    the native kernel, with GPT-2's own GELU and one LayerNorm epsilon throughout (the
    unembedding too where it is native; else the step ends with ln_f and the chosen kernel
    unembeds); None otherwise (then Decoder.hidden runs the step op by op)."""
    from .model import NewGELUActivation

    if lib is None or model.dtype not in lib.dtypes or p.block_kernel != "native":
        return None
    t = model.transformer
    norms = [ln for b in t.h for ln in (b.ln_1, b.ln_2)] + [t.ln_f]
    if any(type(b.mlp.act) is not NewGELUActivation for b in t.h) or len({ln.eps for ln in norms}) != 1:
        return None
    if any(ln.weight is None or ln.bias is None for ln in norms):
        return None
    layers = []
    for i, b in enumerate(t.h):
        w = p.blocks[4 * i : 4 * i + 4]
        layers.append((b.ln_1.weight, b.ln_1.bias, w[0].weight, w[0].bias, w[1].weight, w[1].bias,
                       b.ln_2.weight, b.ln_2.bias, w[2].weight, w[2].bias, w[3].weight, w[3].bias))  # fmt: skip
    try:
        return native.DecodeStep(lib, wte=t.wte.weight.detach(), wpe=t.wpe.weight.detach(), n_head=model.config.n_head,
                                 layers=[tuple(None if x is None else x.detach() for x in layer) for layer in layers],
                                 scales=[b.attn.scale for b in t.h], eps=t.ln_f.eps,
                                 ln_f=(t.ln_f.weight.detach(), t.ln_f.bias.detach()),
                                 unembed=p.unembed.weight if p.unembed_kernel == "native" else None)  # fmt: skip
    except ValueError:  # a layout it does not take (a non-contiguous embedding, say): op by op
        return None


ENV_THREADS = "MINIGPT2_ADAPTIVE_THREADS"


class StepThreads:
    """How many threads a decode step runs on: the full team (torch's setting), or one thread
    while other processes compete for the cores.

    A decode step runs ~60 parallel regions (each matrix product, each attention) of a team
    that waits at the end of each region for its slowest thread. When another process holds
    one of the cores, each region can wait a scheduler time slice for the thread that is not
    running: on a 2-core host here a 124M fp32 step went from 16 ms to 0.3-2 s when other
    processes woke up, while the same step on one thread took 21-31 ms throughout. So:

    - the first step runs on one thread (``fastest[1]``: what one thread does), then the team
      is probed with a single matrix product on the team and on one thread (a whole step on
      a contended team could cost seconds); the steps move to the team unless its product is
      slower (``PROBE_OK``: the probe detects contention; it cannot weigh the team's gain, since
      three products read cold from memory gain less from a second thread than a whole step);
    - a team step slower than ``TRIGGER`` x the fastest one-thread step moves the steps back
      to one thread at once;
    - after ``TRIAL`` team steps, the team stays only if its fastest step beats the fastest
      one-thread step by ``PAYS`` (a small model's step may not gain from a second thread).
      On a quiet machine the first step, the probe and these trial steps are all that is spent;
    - on one thread, the team is probed again after ``interval`` steps; the interval doubles
      whenever the team disappoints (a failed probe, a slow team step) and starts over after
      a long run of good team steps.

    The state lives with the model's prepared kernels, so it carries over between generate
    calls. Thread counts are process-wide (torch's, and OpenBLAS's for the numpy kernel):
    the Decoder sets them for the step and restores them right after (the user's settings
    hold between steps). ``MINIGPT2_ADAPTIVE_THREADS=0`` keeps them for every step.
    """

    TRIGGER = 2.0
    PROBE_OK = 1.0
    PAYS = 0.95
    TRIAL = 4
    FIRST_INTERVAL, MAX_INTERVAL = 4, 512
    GOOD_RUN = 64  # team steps without a slow one after which the interval starts over

    def __init__(self, n: int) -> None:
        self.n = n  # the full team: torch's setting
        self.current = 1
        self.fastest = {n: float("inf"), 1: float("inf")}
        self.interval, self.countdown = self.FIRST_INTERVAL, 1  # probe after the first step
        self.good = 0  # team steps in a row that were not slow
        self.switches = 0  # how often the choice changed (tests, the bench)

    @classmethod
    def current_for(cls, previous: StepThreads | None, n: int | None = None) -> StepThreads | None:
        """``previous`` if it still applies (same team size ``n``: torch's setting unless given), a
        fresh one if not, None when there is nothing to choose (one thread) or the choice is
        switched off."""
        n = torch.get_num_threads() if n is None else n
        if n <= 1 or os.environ.get(ENV_THREADS, "1").strip() == "0":
            return None
        return previous if previous is not None and previous.n == n else cls(n)

    def next(self) -> int:
        """The thread count for the next step."""
        return self.current

    def record(self, n: int, seconds: float) -> None:
        """A step took ``seconds`` on ``n`` threads."""
        self.fastest[n] = min(self.fastest[n], seconds)
        if n != self.n:
            return
        if seconds > self.TRIGGER * self.fastest[1]:
            self._back_off()
            self._switch(1)
            return
        self.good += 1
        if self.good == self.TRIAL and self.fastest[self.n] > self.PAYS * self.fastest[1]:
            self._back_off()  # the team does not pay for this step here
            self._switch(1)
        elif self.good >= self.GOOD_RUN:
            self.interval = self.FIRST_INTERVAL

    def probe_due(self) -> bool:
        """After a step on one thread: whether to probe the team now."""
        if self.current != 1:
            return False
        self.countdown -= 1
        return self.countdown <= 0

    def probed(self, team: float, single: float) -> None:
        """The probe product took ``team`` seconds on the team and ``single`` on one thread."""
        if team <= self.PROBE_OK * single:
            self._switch(self.n)
        else:
            self._back_off()

    def _back_off(self) -> None:
        # on one thread, or the team disappointed soon after a probe sent us there: wait longer
        if self.current == 1 or self.good < self.GOOD_RUN:
            self.interval = min(2 * self.interval, self.MAX_INTERVAL)
        self.countdown = self.interval

    def _switch(self, n: int) -> None:
        self.current, self.switches, self.good = n, self.switches + 1, 0


@contextlib.contextmanager
def between_steps(dec: Decoder | None) -> Iterator[None]:
    """Around generation's work between two decode steps (processors, sampling) and the step
    itself: with the numpy kernel, torch runs on one thread there too. An OpenMP team woken
    by, say, the argmax over 50257 logits spins for milliseconds afterwards and takes a core
    from OpenBLAS's threads during the next step (measured here: 21 ms steps instead of 12).
    A no-op otherwise; torch's setting is restored on exit (before each token is yielded)."""
    if dec is None or not dec.numpy_step:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def max_last(scores: torch.Tensor, dec: Decoder | GraphDecoder | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.max(scores, dim=-1)``: values and indices (B,), the same ones (the first maximal
    index; a NaN over any number; index 0 of an all -inf row). Where ``dec`` steps through the
    native library and scores are a contiguous fp32 CPU (B, V), the library's vector loop takes
    it: greedy's argmax over 50257 logits, ~5 us against torch's ~26 us warm and 60-120 us right
    after a decode step (cold caches), on the AMD EPYC host here. Else torch.max."""
    step = getattr(dec, "native_step", None)
    if step is not None and scores.dtype == torch.float32 and scores.dim() == 2 and scores.is_contiguous() \
            and scores.device.type == "cpu" and scores.shape[1] > 0:  # fmt: skip
        return step.lib.max_rows(scores)
    return torch.max(scores, dim=-1)


def decoder(model: GPT2, batch_size: int, check_each_step: bool = True) -> Decoder | GraphDecoder | None:
    """The fast path for generating ``batch_size`` rows, or None where it may not run
    (see :func:`usable`): then the caller runs the plain model. With ``compile_decoding`` on
    CUDA, the CUDA-graph decoder (compiled.GraphDecoder). ``check_each_step``: see
    Decoder.ready."""
    dec = _decoder(model, batch_size)
    if dec is not None:
        dec.check_each_step = check_each_step
    return dec


def _decoder(model: GPT2, batch_size: int) -> Decoder | GraphDecoder | None:
    """decoder() but for check_each_step."""
    hooks = _HookWatch(model)  # one walk over the modules serves the check now and before every step
    if getattr(model, "_compile_decoding", False):
        from . import compiled

        if compiled.uses_graphs(model):  # CUDA graphs of the one-token step (compiled.py)
            return compiled.graph_decoder(model, hooks)
    if not usable(model, hooks):
        return None
    if getattr(model, "_compile_decoding", False):
        from .compiled import CompiledDecoder  # the opt-in compiled step (compiled.py)

        return CompiledDecoder(model, prepare(model, batch_size), hooks)
    return Decoder(model, prepare(model, batch_size), hooks)
