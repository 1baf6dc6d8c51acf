"""Helpers for testing a GPT-2 against transformers: what minigpt2's own test suite uses.

    from minigpt2 import GPT2
    from minigpt2.testing import random_checkpoint, compare_to_transformers, assert_logits_close

    path = random_checkpoint("/tmp/ckpt", seed=0, n_layer=2)   # saved by transformers itself
    model = GPT2.from_pretrained(path)
    report = compare_to_transformers(model, torch.tensor([[1, 2, 3]]), reference=path)
    assert report.passed, report.table()

- :func:`random_checkpoint` / :func:`random_transformers_model`: random-weight GPT-2s built and
  saved by transformers, with every bias and LayerNorm parameter moved off its 0 / 1
  initialisation (:func:`perturb`), so a dropped bias or a swapped LayerNorm cannot hide.
  No network is needed.
- :func:`compare_to_transformers`: the ``minigpt2 parity`` check as a function; returns a
  :class:`~minigpt2.parity.ParityReport`.
- :func:`assert_logits_close` / :func:`max_relative_error`: the project's tolerance,
  ``max |actual - expected| <= rtol x max |expected|``.

transformers is imported only by the functions that need it (``pip install
"minigpt2[parity]"``); importing this module does not import it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .parity import ParityReport, compare_to_reference, compare_to_transformers
from .parity.capture import require_transformers
from .parity.report import FP32_RTOL

#: A small GPT-2 that still has several heads and layers: fast, and its vocabulary is above
#: 256 so byte-level ids mean something. Every keyword of :func:`random_checkpoint` overrides it.
TINY_CONFIG: dict[str, Any] = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)

__all__ = [
    "TINY_CONFIG", "ParityReport", "assert_logits_close", "compare_to_reference", "compare_to_transformers",
    "max_relative_error", "perturb", "random_checkpoint", "random_transformers_model",
]


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Add N(0, scale^2) noise, in place, to every bias and LayerNorm parameter of ``model``.

    transformers initialises biases to 0 and LayerNorms to weight 1 / bias 0; a port that
    drops a bias or swaps two LayerNorms computes the same thing on such weights. The noise
    comes from its own generator seeded by ``seed``; the global RNG is untouched.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def random_transformers_model(seed: int = 0, **config: Any) -> Any:
    """A transformers ``GPT2LMHeadModel`` with random weights and perturbed biases / LayerNorms,
    float32, eval mode.

    seed: seeds the weights (transformers' own initialisation) and the perturbation.
    config: ``GPT2Config`` fields over :data:`TINY_CONFIG` (e.g. ``n_layer=3``,
        ``activation_function="relu"``; ``**minigpt2.PRESETS["gpt2"]`` plus
        ``vocab_size=50257, n_positions=1024`` for the 124M shape). ``bos_token_id`` and
        ``eos_token_id`` default to 50256, or to the last id of a smaller vocabulary.
    The global RNG is restored afterwards. Raises ImportError without transformers.
    """
    transformers = require_transformers("random_transformers_model")
    kw = {**TINY_CONFIG, **config}
    last = min(50256, int(kw["vocab_size"]) - 1)
    kw.setdefault("bos_token_id", last)
    kw.setdefault("eos_token_id", last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    perturb(hf, seed)
    return hf.eval()


def random_checkpoint(directory: str | os.PathLike[str], *, seed: int = 0, **config: Any) -> Path:
    """Save a random-weight GPT-2 checkpoint with transformers' own ``save_pretrained``.

    directory: created if needed; gets config.json, model.safetensors and
        generation_config.json, as transformers writes them. A checkpoint with GPT-2's
        vocabulary (vocab_size 50257) also gets GPT-2's tokenizer, saved by transformers
        (tokenizer.json + tokenizer_config.json), as checkpoints on the Hub carry theirs; a
        smaller vocabulary gets no tokenizer files (loading its tokenizer warns and falls
        back to GPT-2's packaged BPE).
    seed, config: as :func:`random_transformers_model` (default :data:`TINY_CONFIG`).
    Returns the directory as a Path. Raises ImportError without transformers.
    """
    transformers = require_transformers("random_checkpoint")
    hf = random_transformers_model(seed, **config)
    path = Path(directory).expanduser()
    hf.save_pretrained(path)
    if hf.config.vocab_size == 50257:
        gpt2_files = Path(__file__).resolve().parent / "data"
        transformers.AutoTokenizer.from_pretrained(str(gpt2_files)).save_pretrained(str(path))
    return path


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 (the parity measure).

    Raises ValueError when the shapes differ. Two all-zero tensors give 0; a nonzero
    ``actual`` against an all-zero ``expected`` gives inf.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise ValueError(f"expected two tensors, got {type(actual).__name__} and {type(expected).__name__}")
    if actual.shape != expected.shape:
        raise ValueError(f"shape {list(actual.shape)} != expected shape {list(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return 0.0
    diff = (a - b).abs().max().item()
    if diff != diff:  # NaN somewhere
        return float("inf")
    scale = b.abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def assert_logits_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = FP32_RTOL, what: str = "logits"
) -> float:
    """Assert ``max |actual - expected| <= rtol x max |expected|`` (CONVENTIONS.md: 1e-4 for
    float32 logits); return the measured ratio.

    actual, expected: tensors of one shape, any float dtype (compared in float64).
    Raises AssertionError naming ``what``, the ratio, the limit and where the largest
    difference is (e.g. [batch, position, token]); also for different shapes or NaN.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise AssertionError(f"{what}: expected two tensors, got {type(actual).__name__} and {type(expected).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {list(actual.shape)} != expected {list(expected.shape)}")
    if not torch.isfinite(actual.detach().float()).all():
        raise AssertionError(f"{what}: {int((~torch.isfinite(actual.detach().float())).sum())} non-finite values")
    ratio = max_relative_error(actual, expected)
    if not ratio <= rtol:
        diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
        where = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)]
        raise AssertionError(
            f"{what}: max |actual - expected| is {ratio:.3e} x max |expected| (limit {rtol:.0e}); "
            f"largest difference {diff.max().item():.3e} at index {where}"
        )
    return ratio
