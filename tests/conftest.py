"""Shared fixtures: random-weight checkpoints saved by transformers itself.

The Hub is out of reach in CI, so every parity test builds its checkpoint here with
transformers' ``GPT2LMHeadModel(GPT2Config(...)).save_pretrained(dir)``, through the public
helpers of ``minigpt2.testing``: transformers initialises biases to 0 and LayerNorms to
1 / 0, which would hide a missing bias or a swapped LayerNorm, so ``perturb`` moves every
one of them away from its default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network in tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers")

from minigpt2.testing import TINY_CONFIG, perturb, random_checkpoint, random_transformers_model  # noqa: E402

# A small config that still has several heads and layers; vocab small enough to be fast
# but above 256 so byte-level ids are meaningful.
TINY: dict[str, Any] = TINY_CONFIG

__all__ = ["TINY", "assert_close_or_none", "build_hf_model", "perturb", "save_hf_checkpoint"]


def build_hf_model(seed: int = 0, **config: Any) -> Any:
    """A transformers GPT2LMHeadModel with random weights and perturbed biases / norms, in eval mode."""
    return random_transformers_model(seed, **config)


def save_hf_checkpoint(directory: Path, seed: int = 0, **config: Any) -> tuple[Path, Any]:
    """Save a random checkpoint with transformers' own save_pretrained; return (dir, hf model),
    the model as transformers loads it back from those files (what minigpt2 reads too)."""
    path = random_checkpoint(directory, seed=seed, **config)
    return path, transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def assert_close_or_none(actual: Any, expected: Any, rel: float = 1e-6, what: str = "value") -> None:
    """Presence first, then the number: a None (or absent) value must meet a None, and only
    two numbers are compared, within ``rel``. (``None == pytest.approx(None)`` held in older
    pytest and raises TypeError since pytest 9: never let a None reach approx.)"""
    assert (actual is None) == (expected is None), f"{what}: {actual!r} vs {expected!r}"
    if expected is not None:
        assert isinstance(actual, (int, float)) and isinstance(expected, (int, float)), f"{what}: {actual!r} vs {expected!r}"
        assert actual == pytest.approx(expected, rel=rel), what


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Any]]:
    """Factory: make_checkpoint(seed=0, **config) -> (directory, transformers model)."""
    made: dict[tuple, tuple[Path, Any]] = {}

    def make(seed: int = 0, **config: Any) -> tuple[Path, Any]:
        key = (seed, tuple(sorted(config.items())))
        if key not in made:
            made[key] = save_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed, **config)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: Callable[..., tuple[Path, Any]]) -> tuple[Path, Any]:
    """(directory, transformers model) of the TINY config."""
    return make_checkpoint()


@pytest.fixture(scope="session")
def gpt2_checkpoint(make_checkpoint: Callable[..., tuple[Path, Any]]) -> tuple[Path, Any]:
    """(directory, transformers model) of the full 124M gpt2 shape, random weights."""
    return make_checkpoint(seed=1, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


@pytest.fixture(scope="session")
def gpt2_tiny_vocab_checkpoint(make_checkpoint: Callable[..., tuple[Path, Any]]) -> tuple[Path, Any]:
    """A small model with the full GPT-2 vocabulary, for anything that tokenizes real text."""
    return make_checkpoint(seed=2, vocab_size=50257, n_positions=256, n_embd=64, n_layer=2, n_head=4)
