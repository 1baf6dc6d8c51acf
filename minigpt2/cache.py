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

    Both live in one buffer ``kv`` [n_layer, 2, batch, n_head, max_len, head_dim]
    (``k = kv[:, 0]``, ``v = kv[:, 1]``): head-major, as attention reads them (each head's
    keys contiguous; SDPA at batch 8 reads a position-major layout ~10 % slower here). The
    decoding fast path (fast.py) stores a step's keys and values, straight from the fused
    q|k|v projection, with one strided copy (:meth:`update_fused`).
    """

    #: A compiled CUDA step's cache (compiled.static_cache): a zeroed buffer of a bucketed
    #: length, which the graph reads in full under a mask.
    static: bool = False

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
        buffer: torch.Tensor | None = None,
        static: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if max_len <= 0:
            raise ValueError(f"max_len={max_len} must be positive")
        shape = (n_layer, 2, batch_size, n_head, max_len, head_dim)
        if buffer is None:
            # Uninitialised: attention only ever reads the first ``length`` positions (views are
            # narrowed to them), and zeroing a long prompt's cache costs a measurable part of its prefill.
            buffer = torch.empty(shape, device=device, dtype=dtype)
        elif tuple(buffer.shape) != shape:
            raise ValueError(f"buffer has shape {tuple(buffer.shape)}; this cache needs {shape}")
        self.kv = buffer
        self.static = static
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # (n_layer, B, nh, max_len, hs) views
        # Per-layer views, made once (indexing costs more than the copy at batch 1); _rows is
        # a layer's k and v seen as (B, max_len, 2, nh, hs), the layout of the k|v part of a
        # fused projection's output (B, T, 3, nh, hs)[:, :, 1:].
        self._k, self._v = list(self.k.unbind(0)), list(self.v.unbind(0))
        self._rows = [layer.permute(1, 3, 0, 2, 4) for layer in self.kv.unbind(0)]
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, nh, T, hs) for ``layer``; return all keys/values so far."""
        start, T = self.length, k.shape[2]
        self._k[layer].narrow(2, start, T).copy_(k)
        self._v[layer].narrow(2, start, T).copy_(v)
        return self._k[layer].narrow(2, 0, start + T), self._v[layer].narrow(2, 0, start + T)  # (B, nh, S, hs)

    def update_fused(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`update` for kv (B, T, 2, nh, hs), the k and v of a fused q|k|v output
        viewed as (B, T, 3, nh, hs)[:, :, 1:]: one strided copy instead of a copy each."""
        start, T = self.length, kv.shape[1]
        self._rows[layer].narrow(1, start, T).copy_(kv)
        return self._k[layer].narrow(2, 0, start + T), self._v[layer].narrow(2, 0, start + T)

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called once per forward, after every layer)."""
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (beam search moves cache rows with their beams)."""
        self.kv.copy_(self.kv.index_select(2, index))

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions and forget the rest: assisted decoding rolls
        rejected draft tokens back this way, by length (their keys and values are simply
        overwritten by the next forward; nothing is copied)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length {length} must be in [0, {self.length}] (the filled positions)")
        self.length = length

    def reset(self) -> None:
        """Forget every position (the memory is kept for the next sequence)."""
        self.length = 0

    def __repr__(self) -> str:
        n_layer, batch, n_head, max_len, head_dim = self.k.shape
        return (
            f"KVCache(n_layer={n_layer}, batch_size={batch}, n_head={n_head}, max_len={max_len}, "
            f"head_dim={head_dim}, length={self.length}, dtype={self.k.dtype}, device={self.k.device})"
        )
