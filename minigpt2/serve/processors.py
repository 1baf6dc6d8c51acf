"""Each sequence's next token: its own processors, penalties, RNG and log-probs, on its own row.

The model gives fp32 logits [n, V] for the n running sequences; every row is then processed
alone ([1, V]), so a sequence's token never depends on the settings of its neighbours. The
processors are ``minigpt2.sampling``'s own: ``sampling.process`` with a ``sampling.Processors``
built from the request, in ``generate``'s order with ``generate``'s arguments, so the same
logits give the same token (and the same RNG draw) as ``model.generate`` of that prompt
alone. The two OpenAI-only ones that ``generate`` lacks run here, where vLLM runs them
(logit bias before the penalties, the additive penalties after the multiplicative one):

    logit_bias                              here (OpenAI's, an add on each named token)
    repetition_penalty                      sampling.repetition_penalty (prompt + output)
    min_tokens (EOS banned)                 sampling's min_new_tokens (ban_eos)
    presence_penalty, frequency_penalty     here (output tokens only, OpenAI's definition)
    -- temperature 0: argmax (sampling.greedy); otherwise:
    temperature -> top_k -> top_p -> min_p  sampling.temperature / top_k / top_p / min_p
    draw                                    sampling.sample with the sequence's generator

Log-probs are those of the model's raw distribution, log_softmax of the fp32 logits before
any processor (what OpenAI's API and vLLM report by default), whatever the settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sampling
from .sequence import SamplingParams, Sequence


def presence_frequency_penalty(
    scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: s[j] - counts[j] * frequency - (counts[j] > 0) * presence.

    scores: [1, V] fp32; counts: [V], how often each token occurs in the output so far
    (https://platform.openai.com/docs/advanced-usage, "Frequency and presence penalties").
    """
    return scores - (counts * frequency + (counts > 0).to(scores.dtype) * presence)


def logit_bias(scores: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add ``bias`` [k] to the scores [1, V] of ``token_ids`` [k] (OpenAI's ``logit_bias``).

    ``sampling.sequence_bias`` with one-token sequences computes the same sum, one tensor
    operation per entry; a request may bias hundreds of tokens, so here it is one index_add.
    """
    return scores.index_add(-1, token_ids, bias[None])


def library_processors(p: SamplingParams) -> tuple[sampling.Processors, sampling.Processors | None]:
    """The request's ``sampling.Processors``: (logits processors, warpers or None when greedy).

    Two sets because OpenAI's additive penalties run between them (see the module doc).
    """
    before = sampling.Processors(repetition_penalty=p.repetition_penalty, min_new_tokens=p.min_tokens)
    if p.greedy:
        return before, None
    warpers = sampling.Processors(
        do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p or None
    )
    return before, warpers


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
    ids = seq.ids[:, : seq.num_tokens]  # [1, L] prompt + output so far
    if seq.bias is not None:
        scores = logit_bias(scores, *seq.bias)
    scores = sampling.process(seq.processors, ids, scores, n_new=n_new, eos_ids=eos_ids)
    if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        scores = presence_frequency_penalty(scores, seq.counts, p.presence_penalty, p.frequency_penalty)
    if seq.warpers is not None:
        scores = sampling.process(seq.warpers, ids, scores, n_new=n_new, eos_ids=eos_ids)
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
    seq.ids[0, seq.num_tokens] = token  # num_tokens still excludes it
    if seq.counts is not None:
        seq.counts[token] += 1
