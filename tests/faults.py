"""Faults that real conversions make, planted into a GPT-2's weights or code for the parity tests.

Each weight fault edits a state dict in transformers' layout (``transformer.h.0.attn.c_attn.weight``
...), the way a faulty converter would write it, so the same fault can be planted into a
loaded model (:func:`plant`) or into a checkpoint directory (:func:`write_faulty_checkpoint`).
``EXPECTED`` says where ``minigpt2 parity`` must name each one: the first row of the default
table past the tolerance, and the first of all activations.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minigpt2 import GPT2

State = dict[str, torch.Tensor]


def drop_ln2_bias(sd: State, n_embd: int, block: int = 1) -> None:
    """A converter that maps only LayerNorm weights (gamma) and leaves the beta at 0."""
    sd[f"transformer.h.{block}.ln_2.bias"].zero_()


def transpose_c_attn(sd: State, n_embd: int, block: int = 1) -> None:
    """c_attn split into q, k, v nn.Linear layers whose [C, C] weights were not transposed:
    each third of the Conv1D [C, 3C] weight ends up transposed (shapes still fit)."""
    w = sd[f"transformer.h.{block}.attn.c_attn.weight"]
    w.copy_(torch.cat([part.t() for part in w.split(n_embd, dim=1)], dim=1))


def swap_q_k(sd: State, n_embd: int, block: int = 0) -> None:
    """The 3C outputs of c_attn read as k, q, v instead of q, k, v (weight and bias)."""
    for key in ("weight", "bias"):
        t = sd[f"transformer.h.{block}.attn.c_attn.{key}"]
        q, k, v = t.split(n_embd, dim=-1)
        t.copy_(torch.cat([k, q, v], dim=-1))


def shift_wpe(sd: State, n_embd: int) -> None:
    """Position embeddings off by one: position t reads row t + 1 (a 1-based port)."""
    w = sd["transformer.wpe.weight"]
    w[:-1] = w[1:].clone()


def stale_head(sd: State, n_embd: int) -> None:
    """An untied lm_head holding a stale copy of wte (from before a fine-tune updated wte)."""
    wte = sd["transformer.wte.weight"]
    g = torch.Generator().manual_seed(7)
    sd["lm_head.weight"] = (wte.float() - 0.05 * torch.randn(wte.shape, generator=g)).to(wte.dtype)


WEIGHT_FAULTS: dict[str, Callable[[State, int], None]] = {
    "ln_2 bias dropped in block 1": drop_ln2_bias,
    "c_attn weight transposed in block 1": transpose_c_attn,
    "q and k swapped in c_attn of block 0": swap_q_k,
    "wpe off by one position": shift_wpe,
    "untied head with a stale copy": stale_head,
}

#: fault -> (first failing row of the default table, first failing activation of all).
EXPECTED: dict[str, tuple[str, str]] = {
    "ln_2 bias dropped in block 1": ("h.1.resid_post", "h.1.ln_2"),
    "c_attn weight transposed in block 1": ("h.1.resid_mid", "h.1.attn.q"),
    "q and k swapped in c_attn of block 0": ("h.0.resid_mid", "h.0.attn.q"),
    "unscaled attention": ("h.0.resid_mid", "h.0.attn.pattern"),
    "untied head with a stale copy": ("logits", "logits"),
    "wpe off by one position": ("embed", "embed"),
}

FAULTS = list(EXPECTED)


def plant(model: GPT2, fault: str) -> GPT2:
    """Plant ``fault`` into a loaded minigpt2 model, in place; returns it."""
    if fault == "unscaled attention":  # a port that forgets the 1/sqrt(head_dim)
        for block in model.transformer.h:
            block.attn.scale = 1.0
        return model
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    WEIGHT_FAULTS[fault](sd, model.config.n_embd)
    with torch.no_grad():
        head = sd.pop("lm_head.weight")
        model.load_state_dict({**sd, "lm_head.weight": sd["transformer.wte.weight"]})
        if not torch.equal(head, sd["transformer.wte.weight"]):  # untie: the head keeps its own copy
            model.lm_head.weight = torch.nn.Parameter(head)
    return model


def write_faulty_checkpoint(src: Path, dst: Path, fault: str) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with ``fault`` written into its files."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    if fault == "unscaled attention":  # the converter's config lost scale_attn_weights
        config["scale_attn_weights"] = False
        (dst / "config.json").write_text(json.dumps(config))
        return dst
    sd = load_file(src / "model.safetensors")
    WEIGHT_FAULTS[fault](sd, config["n_embd"])
    save_file({k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
