"""Each sequence's next token: its own processors, penalties, RNG and log-probs, on its own row.

The model gives fp32 logits [n, V] for the n running sequences; every row is then processed
alone ([1, V]), so a sequence's token never depends on the settings of its neighbours. The
processors are ``minigpt2.sampling``'s functions, called in ``generate``'s order with
``generate``'s arguments, so the same logits give the same token (and the same RNG draw) as
``model.generate`` of that prompt alone. The OpenAI / vLLM extras that ``generate`` lacks
slot in between:

    repetition_penalty                      sampling.repetition_penalty (prompt + output)
    presence_penalty, frequency_penalty     here (output tokens only, OpenAI's definition)
    logit_bias                              here
    min_tokens (EOS banned)                 sampling.ban_eos
    -- temperature 0: argmax (sampling.greedy); otherwise:
    temperature -> top_k -> top_p           sampling.temperature / top_k / top_p
    min_p                                   here, after top_p as transformers orders it
    draw                                    sampling.sample with the sequence's generator

Log-probs are those of the model's raw distribution, log_softmax of the fp32 logits before
any processor (what OpenAI's API and vLLM report by default), whatever the settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sampling
from .sequence import Sequence

NEG_INF = float("-inf")


def presence_frequency_penalty(
    scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: s[j] - counts[j] * frequency - (counts[j] > 0) * presence.

    scores: [1, V] fp32; counts: [V], how often each token occurs in the output so far
    (https://platform.openai.com/docs/advanced-usage, "Frequency and presence penalties").
    """
    return scores - (counts * frequency + (counts > 0).to(scores.dtype) * presence)


def logit_bias(scores: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add ``bias`` [k] to the scores [1, V] of ``token_ids`` [k] (OpenAI's ``logit_bias``)."""
    return scores.index_add(-1, token_ids, bias[None])


def min_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al., 2024; transformers' MinPLogitsWarper): drop the tokens
    whose probability is below ``p`` times the most likely token's. The top token always stays.

    (Issue 14 adds ``sampling.min_p``; this one gives way to it once it lands.)
    """
    probs = torch.softmax(scores, dim=-1)
    threshold = p * probs.max(dim=-1, keepdim=True).values
    return scores.masked_fill(probs < threshold, NEG_INF)


@dataclass
class Pick:
    """A sequence's next token and, when asked for, its raw log-prob and the top alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def process(seq: Sequence, scores: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """Every processor ``seq.params`` turns on, in the order above, on its fp32 row [1, V]."""
    p = seq.params
    n_new = len(seq.output_ids)
    if p.repetition_penalty != 1.0:
        scores = sampling.repetition_penalty(seq.ids[:, : seq.num_tokens], scores, p.repetition_penalty)
    if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        scores = presence_frequency_penalty(scores, seq.counts, p.presence_penalty, p.frequency_penalty)
    if seq.bias is not None:
        scores = logit_bias(scores, *seq.bias)
    if p.min_tokens > n_new and eos_ids is not None:
        scores = sampling.ban_eos(scores, eos_ids)
    if p.greedy:
        return scores
    if p.temperature != 1.0:
        scores = sampling.temperature(scores, p.temperature)
    if p.top_k != 0:
        scores = sampling.top_k(scores, p.top_k)
    if p.top_p < 1.0:
        scores = sampling.top_p(scores, p.top_p)
    if p.min_p > 0.0:
        scores = min_p(scores, p.min_p)
    return scores


def pick(seq: Sequence, logits: torch.Tensor, eos_ids: torch.Tensor | None) -> Pick:
    """The next token of ``seq`` from its raw fp32 logits [1, V]."""
    p = seq.params
    scores = process(seq, logits, eos_ids)
    token = sampling.greedy(scores) if p.greedy else sampling.sample(scores, seq.generator)
    token = int(token)
    if not p.needs_logprobs and seq.request.best_of == 1:
        return Pick(token)
    raw = torch.log_softmax(logits[0], dim=-1)  # (V,)
    top = None
    if p.logprobs:
        values, ids = torch.topk(raw, min(p.logprobs, raw.shape[0]))
        top = list(zip(ids.tolist(), values.tolist()))
    return Pick(token, float(raw[token]), top)


def record(seq: Sequence, token: int) -> None:
    """Append ``token`` to the state the penalties read (the ids row, the output counts)."""
    if seq.ids is not None:
        seq.ids[0, seq.num_tokens] = token  # num_tokens still excludes it
    if seq.counts is not None:
        seq.counts[token] += 1
