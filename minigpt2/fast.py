"""Inference fast paths: the host's fastest matrix kernel for every weight while decoding.

The model file stays plain: each Conv1D has a ``kernel`` slot that is None. Generation
enters :func:`fast_path` around its model calls; inside, every Conv1D's slot holds a
:class:`~minigpt2.kernels.PreparedLinear` for the kernel chosen for this host (see
kernels.py) and the returned ``unembed`` does the same for the tied [V, C] unembedding.

Rules (CONVENTIONS.md, "Fast paths"):
- prepared weights are not parameters or buffers (``state_dict`` is untouched); they live
  in a table keyed weakly by the model, built lazily under ``no_grad``;
- they are rebuilt when a weight changes: each is keyed on its source tensors'
  ``_version`` and ``data_ptr()`` (in-place edits, optimizer steps, ``load_state_dict``,
  ``.to()``), checked every time the fast path is entered;
- they are used only with autograd off, in eval mode, and with no hooks installed; anything
  else (training, gradients, ``hooks`` / ``run_with_cache``) takes the plain path.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn.modules import module as _module_hooks

from . import kernels
from .kernels import PreparedLinear

if TYPE_CHECKING:
    from .model import GPT2, Conv1D

Unembed = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Prepared:
    """One model's prepared weights for one batch bucket."""

    batch: int
    block_kernel: str
    unembed_kernel: str
    blocks: list[PreparedLinear]  # one per Conv1D, in model.modules() order
    unembed: PreparedLinear
    keys: list[tuple] = field(default_factory=list)  # source_key of every weight it was built from
    forced: str | None = None  # kernels.forced() when it was built

    @property
    def extra_bytes(self) -> int:
        return sum(p.extra_bytes for p in self.blocks) + self.unembed.extra_bytes


_prepared: weakref.WeakKeyDictionary[GPT2, _Prepared] = weakref.WeakKeyDictionary()


# The model's Conv1D layers and hookable modules, found once (walking the module tree at
# every decoding step would cost more than the rest of this file's bookkeeping).
_structure: weakref.WeakKeyDictionary[GPT2, tuple[list[Conv1D], list[torch.nn.Module]]] = weakref.WeakKeyDictionary()


def _modules(model: GPT2) -> tuple[list[Conv1D], list[torch.nn.Module]]:
    if model not in _structure:
        from .model import Conv1D

        convs = [m for m in model.transformer.h.modules() if isinstance(m, Conv1D)]
        tapped = [m for m in model.modules() if hasattr(m, "taps")]
        _structure[model] = (convs, tapped)
    return _structure[model]


def conv1ds(model: GPT2) -> list[Conv1D]:
    """Every Conv1D of the model, in forward order (4 per block)."""
    return _modules(model)[0]


def usable(model: GPT2) -> bool:
    """Whether the fast path may run now: autograd off, eval mode, no hooks installed (neither
    minigpt2's ``hooks`` nor torch forward hooks on the modules it would bypass)."""
    if torch.is_grad_enabled() or model.training:
        return False
    convs, tapped = _modules(model)
    if any(m.taps is not None for m in tapped):
        return False
    if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in (model.lm_head, *convs))


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
    keys = [kernels.source_key(c.weight, c.bias) for c in conv1ds(model)] + [kernels.source_key(E, None)]
    forced = kernels.forced()
    p = _prepared.get(model)
    if p is not None and p.keys == keys and p.batch == bucket and p.forced == forced:
        return p  # the common case: every decoding step after the first
    c = model.config
    blocks = _sources(model)[0]
    with torch.no_grad():
        # Decide on enough blocks to stream from memory (all blocks share their shapes), and
        # on the unembedding.
        block_kernel = kernels.choose(f"blocks n_embd={c.n_embd} inner={c.inner_dim}", _sample(blocks), bucket)
        unembed_kernel = kernels.choose("unembed", [(E, None)], bucket)
        p = _prepared.get(model)
        if (
            p is not None
            and p.keys == keys
            and (p.block_kernel, p.unembed_kernel) == (block_kernel, unembed_kernel)
            and (p.batch == bucket or "mkldnn" not in (block_kernel, unembed_kernel))
        ):
            p.batch, p.forced = bucket, forced
            return p
        _prepared.pop(model, None)  # drop the old copies before building new ones
        p = _Prepared(
            batch=bucket,
            block_kernel=block_kernel,
            unembed_kernel=unembed_kernel,
            blocks=[PreparedLinear(block_kernel, w, b, bucket) for w, b in blocks],
            unembed=PreparedLinear(unembed_kernel, E, None, bucket),
            keys=keys,
            forced=forced,
        )
    _prepared[model] = p
    return p


def release(model: GPT2) -> None:
    """Free the model's prepared weights (they are rebuilt on the next fast-path use)."""
    _prepared.pop(model, None)


def extra_bytes(model: GPT2) -> int:
    """Memory the fast path holds for this model beyond its parameters."""
    p = _prepared.get(model)
    return 0 if p is None else p.extra_bytes


def kernel_names(model: GPT2) -> dict[str, str]:
    """The kernels in use for the block matrices and the unembedding ({} before first use)."""
    p = _prepared.get(model)
    return {} if p is None else {"blocks": p.block_kernel, "unembed": p.unembed_kernel}


def plain_unembed(model: GPT2) -> Unembed:
    return lambda h: model.lm_head(h).float()


@contextlib.contextmanager
def fast_path(model: GPT2, batch_size: int) -> Iterator[Unembed]:
    """Inside the block, the model's Conv1D layers use the prepared kernels; yields
    ``unembed(h) -> float32 logits`` for hidden states h (B, T, C) (pass the last position
    only while generating). Where the fast path may not run (see :func:`usable`), or on
    devices without candidates, this is the plain path and nothing is installed."""
    if not usable(model) or model.device.type != "cpu":
        yield plain_unembed(model)
        return
    p = prepare(model, batch_size)
    convs = conv1ds(model)
    previous = [c.kernel for c in convs]
    install = p.block_kernel != "plain"
    try:
        if install:
            for c, k in zip(convs, p.blocks):
                c.kernel = k
        if p.unembed_kernel == "plain":
            yield plain_unembed(model)
        else:
            yield lambda h: p.unembed(h).float()
    finally:
        if install:
            for c, k in zip(convs, previous):
                c.kernel = k
