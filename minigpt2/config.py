"""GPT-2 hyper-parameters, read from (and written to) a Hub-style ``config.json``.

The field names are those of the official checkpoints' ``config.json`` (and of
transformers' ``GPT2Config``), so a Hub config loads with no renaming. Keys that a
config does not carry take transformers' defaults; keys GPT-2 does not use (Hub
configs carry many: ``summary_*``, ``task_specific_params``, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hub import read_json

#: Activation functions GPT-2-architecture checkpoints use, by their config name.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")


@dataclass
class GPT2Config:
    """The shape and numerics of a GPT-2 model (defaults: the 124M ``gpt2``)."""

    vocab_size: int = 50257  # 256 bytes + 50000 BPE merges + <|endoftext|>
    n_positions: int = 1024  # longest sequence: rows of the learned position table (wpe)
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block; head_dim = n_embd // n_head
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd, as in GPT-2
    activation_function: str = "gelu_new"  # GPT-2's tanh approximation of GELU
    resid_pdrop: float = 0.1  # dropout on each residual branch output (attn and MLP)
    embd_pdrop: float = 0.1  # dropout on token + position embeddings
    attn_pdrop: float = 0.1  # dropout on the attention probabilities
    layer_norm_epsilon: float = 1e-5  # LayerNorm's epsilon
    initializer_range: float = 0.02  # std of the N(0, std) weight initialisation
    scale_attn_weights: bool = True  # divide q.k by sqrt(head_dim) (always, in OpenAI's models)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide by (layer index + 1) (Mistral's GPT-2s)
    reorder_and_upcast_attn: bool = False  # compute q.k and softmax in fp32 (for fp16/bf16 stability)
    bos_token_id: int | None = 50256  # <|endoftext|> doubles as beginning of text
    eos_token_id: int | None = 50256  # generation stops here
    pad_token_id: int | None = None  # GPT-2 has no pad token; generation pads with eos
    tie_word_embeddings: bool = True  # lm_head shares wte's weight, as in every GPT-2
    model_type: str = "gpt2"  # checked on load: other architectures are refused
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Keys of the source config.json that GPT-2 does not use, kept so a save round-trips."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value GPT-2 cannot run with."""
        if self.model_type != "gpt2":
            raise ValueError(f"model_type {self.model_type!r} is not GPT-2 (expected 'gpt2')")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.n_inner is not None and (
            isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int) or self.n_inner <= 0
        ):
            raise ValueError(f"n_inner={self.n_inner!r} must be a positive integer or null")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1)")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon!r} must be > 0")
        if not self.tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=False is not supported: GPT-2's lm_head is tied to wte"
            )

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Config:
        """Build a config from a config.json mapping; absent keys take GPT-2's defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"model_type {model_type!r} is not GPT-2 (expected 'gpt2')")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        # Old configs name the context size n_ctx; n_positions wins where both exist.
        if "n_positions" not in kwargs and isinstance(data.get("n_ctx"), int):
            kwargs["n_positions"] = data["n_ctx"]
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> GPT2Config:
        """Read a config.json; FileNotFoundError / ValueError name the file."""
        data = read_json(path, what="config file")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> GPT2Config:
        """The config of an official checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2."""
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**PRESETS[key])

    # ---------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """The config.json mapping transformers' GPT2Config reads (extra keys kept)."""
        out = dict(self.extra)
        out.pop("transformers_version", None)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["n_ctx"] = self.n_positions
        out["architectures"] = ["GPT2LMHeadModel"]
        return out

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        """Write config.json (sorted keys, as the Hub's)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


#: The official checkpoints' shapes (everything else at GPT-2's defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),  # 124M
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),  # 1558M
    "distilgpt2": dict(n_embd=768, n_layer=6, n_head=12),  # 82M, distilled from gpt2
}

#: The Hub ids of the official checkpoints the presets describe (besides their short names).
OFFICIAL_REPOS = frozenset({"openai-community/gpt2", "openai-community/gpt2-medium", "openai-community/gpt2-large",
                            "openai-community/gpt2-xl", "distilbert/distilgpt2"})  # fmt: skip


def is_official(name: str) -> bool:
    """Whether ``name`` is an official GPT-2 checkpoint with a packaged preset (gpt2, ...,
    distilgpt2, with or without its Hub organisation)."""
    return name in PRESETS or name in OFFICIAL_REPOS
