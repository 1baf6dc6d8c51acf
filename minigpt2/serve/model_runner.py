"""Turns a scheduled step into tensors and runs the model: prefill one prompt, decode n rows.

The engine's KV memory is one ``KVCache`` made for ``max_batch_size`` rows of n_positions
positions (the slots of scheduler.py). Each forward sees it through a :class:`SlotCache`: the
same interface the model and the fast path write to (``update`` / ``update_fused`` /
``advance``), over rows [start, start + n), where every row writes its new token at its own
position. Row b attends to positions 0..pos[b] through an attention mask, and its position id
is pos[b], so each row computes what it would compute alone.

Exactness (``model.generate`` of one prompt alone is the reference):

- a prompt is prefilled alone, at batch 1, through the batch-1 fast path, the same call
  ``generate`` makes: the first token's logits are bit-identical;
- a decode step with one running sequence is ``generate``'s decode step (batch 1, no mask);
- a decode step with n > 1 rows runs one [n, C] x [C, C'] product per weight matrix. BLAS
  computes row b of it with another summation order than the [1, C] product ``generate``
  runs, so logits differ in the last bits (measured: README, "Batch invariance"); processing
  and sampling stay per row, on each sequence's own RNG. ``batch_invariant=True`` decodes
  each row alone instead: exact, at the price of reading the weights once per row.

The fast path (fast.py) serves every forward it can (CPU, no hooks); otherwise the plain model
runs, through the same two ``generation`` functions ``generate`` uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import fast, generation
from ..cache import KVCache

if TYPE_CHECKING:
    from ..model import GPT2


class SlotCache(KVCache):
    """A view of rows [start, start + n) of the engine's KV memory for one forward.

    ``positions`` [n]: where each row writes its T new tokens (rows with different positions
    take one token each, a decode step). ``length`` is what attention calls the past: the
    largest position, so that keys 0..length + T - 1 are returned and the attention mask hides
    each row's positions beyond its own. Allocates nothing (hence no ``super().__init__``):
    the memory is the engine's ``KVCache``, and this class is one only so that the model's
    own forward accepts it.
    """

    def __init__(self, memory: KVCache, start: int, n: int, positions: list[int]) -> None:
        self.kv = memory.kv.narrow(2, start, n)  # (n_layer, 2, n, nh, max_len, hs)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]
        self.length = max(positions)
        self.equal = min(positions) == self.length  # one write position for every row
        #: Where each row writes ([n] int64: update / update_fused, and the fast path's whole
        #: native step, read it); None when every row writes at ``length``.
        self.write_positions: torch.Tensor | None = None
        if not self.equal:
            device = memory.kv.device
            self._row_ids = torch.arange(n, device=device)
            self.write_positions = torch.tensor(positions, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (n, nh, T, hs) at each row's position; return keys/values 0..length + T."""
        T = k.shape[2]
        if self.equal:
            self.k[layer].narrow(2, self.length, T).copy_(k)
            self.v[layer].narrow(2, self.length, T).copy_(v)
        else:
            self.k[layer][self._row_ids, :, self.write_positions] = k[:, :, 0]  # (n, nh, hs) at (row, pos[row])
            self.v[layer][self._row_ids, :, self.write_positions] = v[:, :, 0]
        S = self.length + T
        return self.k[layer].narrow(2, 0, S), self.v[layer].narrow(2, 0, S)

    def update_fused(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for kv (n, T, 2, nh, hs), the k|v part of the fused q|k|v projection."""
        T = kv.shape[1]
        if self.equal:
            self.kv[layer].narrow(3, self.length, T).copy_(kv.permute(2, 0, 3, 1, 4))  # (2, n, nh, T, hs)
        else:
            self.kv[layer][:, self._row_ids, :, self.write_positions] = kv[:, 0]  # (n, 2, nh, hs) at (row, pos[row])
        S = self.length + T
        return self.k[layer].narrow(2, 0, S), self.v[layer].narrow(2, 0, S)

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError("the engine moves whole slots (ModelRunner.move), not beams")


class ModelRunner:
    """The model, its KV memory of ``max_batch_size`` slots, and the forwards the engine needs."""

    #: Rows of [rows, V] logits built at once when scoring a prompt (echo + logprobs).
    SCORE_CHUNK = 256

    def __init__(self, model: GPT2, max_batch_size: int, batch_invariant: bool = False) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_invariant = batch_invariant  # decode every row alone (see ``decode``)
        # torch.empty underneath: the OS commits the pages as positions are first written.
        self.memory = model.make_cache(max_batch_size)
        # Positions 0..clean[s] - 1 of slot s hold finite numbers. A decode step reads every
        # row up to the longest row's position, and a masked position still meets its value
        # in softmax(q k) @ v as 0 * v: uninitialised memory there could be NaN (0 * NaN = NaN).
        self.clean = [0] * max_batch_size
        self._decoders: dict[int, fast.Decoder | None] = {}

    @property
    def memory_bytes(self) -> int:
        kv = self.memory.kv
        return kv.numel() * kv.element_size()

    def _decoder(self, n: int) -> fast.Decoder | None:
        """The fast path for n rows: batch 1 (what generate uses alone), or one for every n > 1
        (prepared for the largest batch, so that at most two prepared weight sets are held)."""
        key = 1 if n == 1 else self.max_batch_size
        if key not in self._decoders:
            dec = fast.decoder(self.model, key)
            # The CPU fast path only: a compiled CUDA model's GraphDecoder needs its static cache,
            # which the engine's slot memory is not (its rows run the plain model).
            self._decoders[key] = dec if isinstance(dec, fast.Decoder) else None
        return self._decoders[key]

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int], all_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one prompt alone into ``slot``: fp32 logits of its last position [1, V], and with
        ``all_positions`` the final hidden states of every position [T, C] (for its log-probs)."""
        model, T = self.model, len(prompt)
        ids = torch.tensor([prompt], device=model.device)  # (1, T)
        positions = torch.arange(T, device=model.device)[None]  # (1, T), as generate's prefill
        cache = SlotCache(self.memory, slot, 1, [0])
        dec = self._decoder(1)
        if not all_positions:
            logits, h = generation.prefill(model, ids, positions, None, cache, dec), None
        elif dec is not None and dec.ready():
            h = dec.hidden(ids, positions, None, cache, last_only=False)[0]  # (T, C)
            logits = dec.logits(h[-1:])  # the last row unembedded alone: generate's bits
        else:
            h = model.transformer(ids, None, positions, cache)[0]
            logits = model.lm_head(h[-1:]).float()
        self.clean[slot] = max(self.clean[slot], T)
        return logits, h

    @torch.inference_mode()
    def prompt_logprobs(self, hidden: torch.Tensor, prompt: list[int], k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Log-prob of each prompt token after the ones before it, and the top ``k`` there:
        lists of T - 1 entries (the first token has no context). hidden: [T, C] from prefill."""
        dec = self._decoder(1)
        targets = torch.tensor(prompt[1:], device=hidden.device)
        chosen: list[float] = []
        top: list[list[tuple[int, float]]] = []
        for i in range(0, len(prompt) - 1, self.SCORE_CHUNK):
            h = hidden[i : i + self.SCORE_CHUNK][: len(prompt) - 1 - i]  # predicts tokens i+1 ..
            logits = dec.logits(h) if dec is not None and dec.ready() else self.model.lm_head(h).float()
            lp = torch.log_softmax(logits, dim=-1)  # (rows, V)
            chosen += lp.gather(1, targets[i : i + len(h), None])[:, 0].tolist()
            if k:
                values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
                top += [list(zip(r_ids, r_values)) for r_ids, r_values in zip(ids.tolist(), values.tolist())]
            else:
                top += [[] for _ in range(len(h))]
        return chosen, top

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step for the sequences in slots 0..n-1: token b at position positions[b].
        Returns fp32 logits [n, V].

        With ``batch_invariant``, each row runs alone (generate's own batch-1 step, in its
        slot): bit-identical to generate whatever else runs, at n times the weight reads."""
        model, n = self.model, len(tokens)
        dev = model.device
        ids = torch.tensor(tokens, device=dev)[:, None]  # (n, 1)
        pos = torch.tensor(positions, device=dev)[:, None]  # (n, 1)
        if self.batch_invariant and n > 1:
            dec = self._decoder(1)
            rows = [
                generation.decode_one_token(model, ids[b : b + 1], pos[b : b + 1], None,
                                            SlotCache(self.memory, b, 1, [positions[b]]), dec)
                for b in range(n)
            ]  # fmt: skip
            return torch.cat(rows)
        self._clean(n, max(positions) + 1)
        cache = SlotCache(self.memory, 0, n, positions)
        mask = None
        if not cache.equal:  # row b sees its own positions 0..pos[b] only: (n, S)
            mask = (torch.arange(cache.length + 1, device=dev)[None, :] <= pos).long()
        return generation.decode_one_token(model, ids, pos, mask, cache, self._decoder(n))

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give slot ``dst`` the first ``length`` positions of slot ``src`` (a shared prompt)."""
        kv = self.memory.kv
        kv[:, :, dst, :, :length].copy_(kv[:, :, src, :, :length])
        self.clean[dst] = max(self.clean[dst], length)

    move = copy  # a running sequence moving into a freed slot: the same copy

    #: Positions zeroed at a time when a slot's clean region has to grow.
    CLEAN_CHUNK = 128

    def _clean(self, n: int, upto: int) -> None:
        """Make positions 0..upto - 1 of slots 0..n-1 finite (zeros where never written)."""
        kv = self.memory.kv
        for s in range(n):
            if self.clean[s] < upto:
                end = min(kv.shape[4], upto + self.CLEAN_CHUNK)
                kv[:, :, s, :, self.clean[s] : end].zero_()
                self.clean[s] = end

    def warmup(self) -> None:
        """One prefill and decode at batch 1 and at the largest batch, before serving: the
        fast path measures and prepares its kernels on first use (seconds on a large model)."""
        self.prefill(0, [0, 0])
        self.decode([0], [2])
        n = self.max_batch_size
        if n > 1:
            self.decode([0] * n, [2] + [1] * (n - 1))
