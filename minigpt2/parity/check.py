"""The checks ``minigpt2 parity`` runs, as functions: against transformers, or against a file.

- :func:`compare_to_transformers`: a minigpt2 model and transformers' GPT2LMHeadModel on the
  same input; activations, logits, top-1, and on request loss + gradients and greedy
  generation. Optionally writes the reference file as it goes (``export=``).
- :func:`compare_to_reference`: a minigpt2 model, or another implementation's dump, held
  against a reference file; transformers is not needed.
- :func:`export_reference`: only write the reference file.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .capture import (
    Capture,
    _check_ids,
    capture_minigpt2,
    capture_transformers,
    default_names,
    load_transformers,
    require_transformers,
    shifted_targets,
    transformers_from_model,
)
from .reffile import load_reference, save_reference
from .report import (
    FP32_RTOL,
    HALF_RTOL,
    TOP1_MAX_MARGIN,
    GenerationCheck,
    ParityReport,
    compare,
    default_rtol,
    is_half,
)

if TYPE_CHECKING:
    from ..model import GPT2

#: Attention patterns are recorded without ``all_activations`` only while all of them
#: together stay under this many elements (n_layer x batch x n_head x T x T): they are the
#: one activation that grows with the square of the input.
PATTERN_BUDGET = 2**25


def _patterns_fit(n_layer: int, n_head: int, input_ids: torch.Tensor) -> bool:
    B, T = input_ids.shape[0], input_ids.shape[-1]
    return n_layer * B * n_head * T * T <= PATTERN_BUDGET


def _as_ids(input_ids: Any) -> torch.Tensor:
    if isinstance(input_ids, (list, tuple)):
        input_ids = torch.tensor(input_ids)
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    return input_ids[None] if input_ids.dim() == 1 else input_ids


def _reference_model(model: GPT2, reference: Any, device: torch.device) -> tuple[Any, str]:
    """(transformers model, how it was made) for the ``reference`` argument."""
    transformers = require_transformers("compare_to_transformers")
    if reference is None:
        return transformers_from_model(model), "this model's own weights"
    if isinstance(reference, (str, os.PathLike)):
        return load_transformers(reference, device=device), f"loaded from {os.fspath(reference)}"
    if isinstance(reference, transformers.PreTrainedModel):
        return reference, "a transformers model given by the caller"
    raise ValueError(
        f"reference must be None, a checkpoint path / Hub id, or a transformers model; got {type(reference).__name__}"
    )


def compare_to_transformers(
    model: GPT2,
    input_ids: torch.Tensor,
    *,
    reference: Any = None,
    all_activations: bool = False,
    rtol: float | None = None,
    grad: bool = False,
    generate: int = 0,
    export: str | os.PathLike[str] | None = None,
    text: str | None = None,
) -> ParityReport:
    """Hold a minigpt2 model against transformers' GPT2LMHeadModel, activation by activation.

    model: a ``minigpt2.GPT2`` (any dtype; half precision is judged by top-1 agreement).
    input_ids: [B, T] token ids (a 1-D tensor or a list is one row).
    reference: what transformers runs. None: a GPT2LMHeadModel built from this model's
        config and weights (float32), which checks the computation alone. A checkpoint
        directory or Hub id: transformers loads it, which also checks the loading, and holds
        a converted or quantised model against its original. A transformers model: used as
        it is (eval mode for the duration).
    all_activations: the table shows every activation, attention patterns included; by
        default it shows ``embed``, each block's ``resid_mid`` and ``resid_post``, ``ln_f`` and
        ``logits`` (all are compared either way, to narrow a failure down).
    rtol: tolerance, max |ours - ref| <= rtol x max |ref| (default 1e-4). For a half-precision
        model the default is per row: 4 x how far transformers' own model in that dtype is
        from its float32 one (at least 2^-8 for bf16, 2^-11 for fp16).
    grad: also compare the loss and every parameter's gradient.
    generate: greedy-decode this many tokens from row 0 in both and compare them.
    export: also write the reference (transformers' values, gradients included) to this file.
    text: the text the ids came from, stored in the exported file.

    Returns a :class:`ParityReport` (``.passed``, ``.first_failure``, ``.table()``, ...).
    Raises ImportError without transformers (``pip install "minigpt2[parity]"``), ValueError
    for bad ids or a reference it cannot load.
    """
    input_ids = _check_ids(_as_ids(input_ids), model.config.vocab_size, model.config.n_positions)
    hf, how = _reference_model(model, reference, model.device)
    c = model.config
    patterns = all_activations or _patterns_fit(c.n_layer, c.n_head, input_ids)
    ref = capture_transformers(hf, input_ids, patterns=patterns or export is not None, grad=grad or export is not None)
    if export is not None:
        save_reference(ref, export, config=_hf_config(hf), text=text,
                       producer=f"{ref.source} GPT2LMHeadModel (eager attention), float32")
    ours = capture_minigpt2(model, input_ids, patterns=patterns, grad=grad)
    if not grad:
        ref.grads = {}
    if not patterns:  # recorded for the file only
        ref.activations = {n: t for n, t in ref.activations.items() if not n.endswith(".attn.pattern")}
    noise = None
    if is_half(model.dtype) and rtol is None:
        # What half precision costs transformers itself, row by row: the yardstick for ours.
        half_hf = copy.deepcopy(hf).to(model.dtype)
        noise = capture_transformers(half_hf, input_ids, patterns=patterns, grad=grad)
        del half_hf
    report = compare(
        ours, ref, rtol=rtol, shown=None if all_activations else default_names(c.n_layer), grad=grad,
        dtype=model.dtype, noise=noise,
        ours_label=f"{ours.source}, {_dtype_name(model.dtype)} weights on {model.device}"
        + (f", {model.name_or_path}" if getattr(model, "name_or_path", None) else ""),
        reference_label=f"{ref.source} GPT2LMHeadModel (eager attention), float32, {how}",
    )
    report.notes += reference_notes(hf, model)
    if not patterns:
        report.notes.append("attention patterns not compared for this long an input (all_activations / --all forces them)")
    if generate:
        report.generation = generation_check(model, hf, input_ids[:1], generate, rtol=report.rtol)
    return report


def compare_to_reference(
    reference: str | os.PathLike[str],
    *,
    model: GPT2 | None = None,
    dump: str | os.PathLike[str] | None = None,
    all_activations: bool = False,
    rtol: float | None = None,
    grad: bool = False,
    dtype: torch.dtype | None = None,
) -> ParityReport:
    """Hold a minigpt2 model, or another implementation's dump, against a reference file.

    reference: a file written by ``minigpt2 parity --export`` (or :func:`export_reference`).
    model: run this minigpt2 model on the file's input_ids (exactly one of model / dump).
    dump: a safetensors file with any subset of the reference's names, computed by any
        implementation on the same input_ids (docs/parity.md).
    all_activations, rtol, grad: as :func:`compare_to_transformers`; with ``grad`` the
        reference must hold the gradients, and the dump (if any) whichever it has.
    dtype: the precision the dump was computed in, when its float32 tensors came from a
        half-precision model (default: the model's dtype, or the dump's logits dtype).
    Raises FileNotFoundError / ValueError for missing or unreadable files, files run on other
    input ids, or a reference without what ``grad`` asks for.
    """
    if (model is None) == (dump is None):
        raise ValueError("give exactly one of model= or dump= to hold against the reference")
    ref = load_reference(reference, grads=grad)
    if grad and not ref.grads:
        raise ValueError(f"{reference} holds no gradients (write it with minigpt2 parity --export)")
    n_layer = _layers(ref)
    if model is not None:
        # The usual targets are scored by model.loss itself; any others by cross-entropy.
        usual = ref.targets is None or torch.equal(ref.targets, shifted_targets(ref.input_ids))
        targets = None if usual else ref.targets
        patterns = all_activations or any(n.endswith(".attn.pattern") for n in ref.activations)
        if not all_activations and not _patterns_fit(model.config.n_layer, model.config.n_head, ref.input_ids):
            patterns = False
        ours = capture_minigpt2(model, ref.input_ids, patterns=patterns, grad=grad, targets=targets)
        dtype = dtype or model.dtype
        label = f"{ours.source}, {_dtype_name(model.dtype)} weights on {model.device}" + (
            f", {model.name_or_path}" if getattr(model, "name_or_path", None) else "")
    else:
        ours = load_reference(dump, grads=grad, require_input_ids=False)
        dtype = dtype or ours.dtype
        label = ours.source
    shown = None if all_activations else default_names(n_layer)
    report = compare(ours, ref, rtol=rtol, shown=shown, grad=grad, dtype=dtype,
                     ours_label=label, reference_label=f"{ref.source}")
    if model is not None and not all_activations and not patterns:
        report.notes.append("attention patterns not compared for this long an input (--all forces them)")
    return report


def export_reference(
    path: str | os.PathLike[str],
    reference: Any,
    input_ids: torch.Tensor,
    *,
    text: str | None = None,
    device: torch.device | str | None = None,
) -> Path:
    """Write the reference file of a checkpoint on ``input_ids``: transformers' float32
    activations (attention patterns included), logits, loss and every parameter's gradient.

    reference: a checkpoint directory / Hub id, or a transformers GPT2LMHeadModel.
    Returns the file's path. Raises ImportError without transformers.
    """
    transformers = require_transformers("export_reference")
    hf = reference if isinstance(reference, transformers.PreTrainedModel) else load_transformers(reference, device=device)
    ref = capture_transformers(hf, _as_ids(input_ids), patterns=True, grad=True)
    return save_reference(ref, path, config=_hf_config(hf), text=text,
                          producer=f"{ref.source} GPT2LMHeadModel (eager attention), float32")


# ------------------------------------------------------------------------------ generation
@contextlib.contextmanager
def _plain_generation_config(hf: Any, steps: int, eos: Any, pad: Any) -> Iterator[Any]:
    """A generation config with greedy decoding and nothing else, for the duration.

    transformers merges the model's own generation_config into any one passed in, so a
    checkpoint's sampling defaults (do_sample, repetition_penalty, ...) would leak into the
    reference; minigpt2 applies only EOS / pad from that file. Swap in a clean one.
    """
    transformers = require_transformers()
    before = hf.generation_config
    clean = transformers.GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad,
        bos_token_id=getattr(hf.config, "bos_token_id", None),
    )
    hf.generation_config = clean
    try:
        yield clean
    finally:
        hf.generation_config = before


def generation_check(
    model: GPT2, hf: Any, input_ids: torch.Tensor, steps: int, *, rtol: float | None = None
) -> GenerationCheck:
    """Greedy-decode ``steps`` tokens from ``input_ids`` [1, T] in both and find where they part.

    Both use the checkpoint's EOS (minigpt2's reading of it) and stop there. At the first
    differing step both are re-run on the common prefix to measure the margins (see
    :class:`GenerationCheck`); a near-tie is reported as one and passes.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generate={steps!r} must be a positive number of tokens")
    input_ids = _as_ids(input_ids)[:1].long()
    T = input_ids.shape[1]
    if T + steps > model.config.n_positions:
        raise ValueError(f"prompt of {T} tokens + {steps} generated tokens exceeds n_positions={model.config.n_positions}")
    defaults = model.generation_config or {}
    eos = defaults.get("eos_token_id", model.config.eos_token_id)
    pad = defaults.get("pad_token_id", model.config.pad_token_id)
    first_eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    pad = first_eos if pad is None else pad
    ids = input_ids.to(model.device)
    mask = torch.ones_like(ids)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad)
    hf_ids = input_ids.to(next(hf.parameters()).device)
    with _plain_generation_config(hf, steps, eos, pad) as gc, _eval(hf), torch.no_grad():
        theirs = hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), generation_config=gc)
    a, b = ours[0, T:].tolist(), theirs[0, T:].tolist()
    check = GenerationCheck(steps=steps, ours=a, reference=b)
    n = min(len(a), len(b))
    s = next((i for i in range(n) if a[i] != b[i]), None)
    if s is None and len(a) == len(b):
        return check
    s = n if s is None else s
    check.first_diff_step = s
    check.ours_token = a[s] if s < len(a) else None
    check.ref_token = b[s] if s < len(b) else None
    if check.ours_token is None or check.ref_token is None:
        return check
    prefix = torch.cat([input_ids, torch.tensor([a[:s]], dtype=torch.long)], dim=1)
    with torch.no_grad(), _eval(hf), _eval(model):
        ours_l = model(prefix.to(model.device))[0, -1].cpu().double()  # MPS has no float64
        ref_l = hf(prefix.to(hf_ids.device)).logits[0, -1].cpu().double()
    u, r = check.ours_token, check.ref_token
    check.ref_margin = (ref_l[r] - ref_l[u]).item()
    check.ours_margin = (ours_l[u] - ours_l[r]).item()
    check.logits_diff = (ours_l - ref_l).abs().max().item()
    scale = ref_l.abs().max().item()
    half = is_half(model.dtype)
    tol = (HALF_RTOL[model.dtype] if half else FP32_RTOL) if rtol is None else rtol
    # Each logit may be off by tol x scale, so two of them can swap order when they are
    # within twice that; in half precision the top-1 margin bound of the logits check.
    check.tie_bound = (TOP1_MAX_MARGIN if half else 2 * tol) * scale
    check.near_tie = check.ref_margin <= check.tie_bound and check.logits_diff <= tol * scale
    return check


@contextlib.contextmanager
def _eval(module: torch.nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


# ------------------------------------------------------------------------------ helpers
def reference_notes(hf: Any, model: GPT2) -> list[str]:
    """What the reference did that is worth knowing before reading the table."""
    notes = []
    head, wte = hf.get_output_embeddings(), hf.transformer.wte
    ours_tied = model.lm_head.weight is model.transformer.wte.weight
    if ours_tied and head is not None and head.weight.data_ptr() != wte.weight.data_ptr():
        notes.append(
            "transformers did not tie lm_head to wte: the checkpoint stores an lm_head.weight that differs "
            "from transformer.wte.weight (or sets tie_word_embeddings=false); minigpt2 always unembeds with wte"
        )
    return notes


def _hf_config(hf: Any) -> dict[str, Any]:
    config = hf.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        config.pop(key, None)
    return config


def _layers(capture: Capture) -> int:
    layers = [int(n.split(".")[1]) for n in capture.activations if n.startswith("h.") and n.split(".")[1].isdigit()]
    return max(layers) + 1 if layers else 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["compare_to_reference", "compare_to_transformers", "export_reference", "generation_check", "default_rtol"]
