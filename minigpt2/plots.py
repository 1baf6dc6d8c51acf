"""Pictures of GPT-2's internals (matplotlib, an optional extra: ``pip install minigpt2[viz]``).

matplotlib is imported only when a picture is drawn, and only its object-oriented API is
used (``Figure``, no pyplot), so drawing changes no global matplotlib state or backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MISSING = "matplotlib is not installed: pip install minigpt2[viz]"


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(MISSING) from None
    return Figure


def token_label(token: str, width: int = 12) -> str:
    """A token as a readable tick label: whitespace made visible, long tokens shortened."""
    s = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if s.startswith(" "):
        s = "\u2423" + s[1:]  # "␣the": GPT-2 tokens carry their leading space
    s = s.replace("$", r"\$")  # matplotlib would read $...$ as math text
    return s if len(s) <= width else s[: width - 1] + "\u2026"


def plot_attention(
    pattern: torch.Tensor,
    tokens: Sequence[str],
    out: str | os.PathLike[str],
    *,
    size: tuple[int, int] = (900, 900),
    title: str | None = None,
    heads: Sequence[int] | None = None,
    dpi: int = 100,
) -> Path:
    """Save a heatmap of attention weights: rows are queries, columns the keys they read.

    pattern: [T, T] for one head, or [nh, T, T] for a grid of every head of a layer.
    tokens: the T tokens, for the tick labels. size: (width, height) of the image in pixels.
    heads: the head number of each [T, T] panel (default 0..nh-1), for the panel titles.
    The colour scale is fixed to [0, 1] so panels and pictures compare directly.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory for {out} not found: {out.parent}")
    p = pattern.detach().float().cpu()
    if p.dim() == 2:
        p = p[None]
    if p.dim() != 3 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"attention pattern must be [T, T] or [heads, T, T], got shape {tuple(pattern.shape)}")
    n, T = p.shape[0], p.shape[-1]
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token labels for an attention pattern over {T} tokens")
    w, h = size
    if not (50 <= w <= 20000 and 50 <= h <= 20000):
        raise ValueError(f"image size {w}x{h} must be between 50 and 20000 pixels per side")
    heads = list(range(n)) if heads is None else list(heads)

    Figure = _figure_class()
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, layout="constrained")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = [token_label(t) for t in tokens]
    # Tick labels only where they stay legible: a single head, or a small grid.
    show_ticks = T <= (60 if n == 1 else max(4, 40 // cols))
    fontsize = max(4, min(10, int(320 / max(T, 1) / max(cols, 1))))
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        image = ax.imshow(p[i].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        if n > 1:
            ax.set_title(f"head {heads[i]}", fontsize=fontsize + 1)
        if show_ticks:
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels if i // cols == rows - 1 or n == 1 else [], rotation=90, fontsize=fontsize)
            ax.set_yticklabels(labels if i % cols == 0 else [], fontsize=fontsize)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if n == 1:
            ax.set_xlabel("key (attended to)")
            ax.set_ylabel("query (attending)")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=dpi)
    return out
