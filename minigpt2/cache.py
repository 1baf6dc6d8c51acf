"""A preallocated key/value cache for incremental decoding.

Attention at step t needs the keys and values of every earlier position. Recomputing
them makes decoding quadratic; keeping them makes each step one token's worth of work.
Following gpt-fast, the cache is allocated once for a batch and a maximum length and
written in place: nothing grows (and nothing is reallocated) while decoding.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, [n_layer, batch, n_head, max_len, head_dim] each.

    ``length`` is how many positions are filled. The model's forward writes the new
    positions of each layer with :meth:`update` and then calls :meth:`advance` once.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if max_len <= 0:
            raise ValueError(f"max_len={max_len} must be positive")
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, nh, T, hs) for ``layer``; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called once per forward, after every layer)."""
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (beam search moves cache rows with their beams)."""
        self.k.copy_(self.k.index_select(1, index))
        self.v.copy_(self.v.index_select(1, index))

    def reset(self) -> None:
        """Forget every position (the memory is kept for the next sequence)."""
        self.length = 0

    def __repr__(self) -> str:
        n_layer, batch, n_head, max_len, head_dim = self.k.shape
        return (
            f"KVCache(n_layer={n_layer}, batch_size={batch}, n_head={n_head}, max_len={max_len}, "
            f"head_dim={head_dim}, length={self.length}, dtype={self.k.dtype}, device={self.k.device})"
        )
