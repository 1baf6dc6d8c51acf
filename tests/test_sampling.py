"""The logits processors one by one against transformers' own classes, and per row.

Scores are random with deliberate ties and -inf entries (what a previous processor leaves),
so the cut-offs, tie rules and ``min_tokens_to_keep`` are all exercised. Masks must agree
exactly; arithmetic (biases, penalties) within float rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as lp

from minigpt2 import GenerationConfig, sampling
from minigpt2.sampling import Processors


def scores_with_ties(B: int = 4, V: int = 60, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, V, generator=g) * 2
    s[:, :6] = s[:, 6:12]  # ties
    s[0, 20:30] = float("-inf")  # already filtered
    s[1] = s[1] * 0.05  # a flat row
    s[2, 7] = 15.0  # a peaked row
    return s


def ids_for(B: int = 4, L: int = 9, V: int = 60, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def same_mask(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different tokens filtered"
    finite = torch.isfinite(theirs)
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- warpers
@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p(p: float, keep: int) -> None:
    s = scores_with_ties()
    same_mask(sampling.min_p(s, p, keep), lp.MinPLogitsWarper(p, min_tokens_to_keep=keep)(None, s))


@pytest.mark.parametrize("keep", [1, 4])
@pytest.mark.parametrize("mass", [0.05, 0.5, 0.9, 0.999])
def test_typical_p(mass: float, keep: int) -> None:
    s = scores_with_ties()
    same_mask(sampling.typical_p(s, mass, keep), lp.TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(None, s))


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("eps", [1e-4, 3e-3, 0.05, 0.5])
def test_epsilon_and_eta_cutoff(eps: float, keep: int) -> None:
    s = scores_with_ties()
    same_mask(sampling.epsilon_cutoff(s, eps, keep), lp.EpsilonLogitsWarper(eps, min_tokens_to_keep=keep)(None, s))
    same_mask(sampling.eta_cutoff(s, eps, keep), lp.EtaLogitsWarper(eps, min_tokens_to_keep=keep)(None, s))


@pytest.mark.parametrize("h", [0.05, 0.4, 0.8, 1.0])
@pytest.mark.parametrize("V", [60, 300])  # below and above TopH's cap of 100 candidates
def test_top_h(h: float, V: int) -> None:
    s = scores_with_ties(V=V)
    same_mask(sampling.top_h(s, h), lp.TopHLogitsWarper(top_h=h)(None, s))


# --------------------------------------------------------------------------- processors
def test_sequence_bias_and_bad_words() -> None:
    s, ids = scores_with_ties(), ids_for()
    last2 = tuple(ids[0, -2:].tolist())  # a prefix row 0 ends with: its bias applies to row 0 only
    bias = {(5,): 2.5, (7,): -1.0, (*last2, 11): 4.0, (int(ids[1, -1]), 13): -3.0, (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14): 9.0}
    ours = sampling.sequence_bias(ids, s, list(bias.items()))
    theirs = lp.SequenceBiasLogitsProcessor(sequence_bias=[[list(k), v] for k, v in bias.items()])(ids, s)
    same_mask(ours, theirs)
    assert ours[0, 11] == s[0, 11] + 4.0 and ours[2, 11] == s[2, 11]  # the multi-token bias only where it matches

    bad = [[5], [*last2, 11], [int(ids[3, -1]), 17], [59]]
    ours = sampling.bad_words(ids, s, bad)
    same_mask(ours, lp.NoBadWordsLogitsProcessor(bad)(ids, s))
    assert ours[0, 11] == float("-inf") and ours[1, 11] != float("-inf")


def test_encoder_processors() -> None:
    s, ids = scores_with_ties(), ids_for(L=12)
    prompt = ids[:, :8]
    for penalty in (0.6, 1.7):
        theirs = lp.EncoderRepetitionPenaltyLogitsProcessor(penalty, prompt)(ids, s)
        same_mask(sampling.encoder_repetition_penalty(s, prompt, penalty), theirs)
    for n in (1, 2, 3):
        theirs = lp.EncoderNoRepeatNGramLogitsProcessor(n, prompt)(ids, s)
        same_mask(sampling.encoder_no_repeat_ngram(ids, s, prompt, n), theirs)
    # rows beyond the prompt's (beams) repeat each prompt row in turn
    beams = ids.repeat_interleave(2, dim=0)
    s2 = scores_with_ties(B=8)
    same_mask(sampling.encoder_no_repeat_ngram(beams, s2, prompt, 2), lp.EncoderNoRepeatNGramLogitsProcessor(2, prompt)(beams, s2))


def test_forcing_suppressing_and_invalid_values() -> None:
    s = scores_with_ties()
    same_mask(sampling.force_tokens(s, [3]), lp.ForcedBOSTokenLogitsProcessor(3)(ids_for(L=1), s))
    same_mask(sampling.force_tokens(s, [3, 9]), lp.ForcedEOSTokenLogitsProcessor(10, [3, 9])(ids_for(L=9), s))
    same_mask(sampling.suppress(s, [0, 5, 59]), lp.SuppressTokensLogitsProcessor([0, 5, 59])(None, s))
    bad = s.clone()
    bad[0, 1], bad[1, 2], bad[2, 3] = float("nan"), float("inf"), float("-inf")
    assert torch.equal(sampling.remove_invalid_values(bad), lp.InfNanRemoveLogitsProcessor()(None, bad))
    same_mask(sampling.renormalize(s), lp.LogitNormalization()(None, s))


@pytest.mark.parametrize("n_new", [0, 2, 3, 7])
def test_exponential_decay_length_penalty(n_new: int) -> None:
    s = scores_with_ties()
    s[:, 4] = -2.0  # a negative EOS score grows too (its absolute value is used)
    eos = torch.tensor([4, 9])
    theirs = lp.ExponentialDecayLengthPenalty((2, 1.7), eos, input_ids_seq_length=5)(ids_for(L=5 + n_new), s)
    same_mask(sampling.exponential_decay_length_penalty(s, eos, n_new, 2, 1.7), theirs)


# --------------------------------------------------------------------------- together, per row
EVERYTHING = GenerationConfig(
    sequence_bias={(5,): 1.5, (7, 8): -2.0}, encoder_repetition_penalty=1.2, repetition_penalty=1.3,
    no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=3, bad_words_ids=[[11], [12, 13], [4]], min_length=12,
    min_new_tokens=2, suppress_tokens=[20, 21], begin_suppress_tokens=[22], exponential_decay_length_penalty=(1, 1.3),
    remove_invalid_values=True, do_sample=True, temperature=0.8, top_h=0.9, top_k=40, top_p=0.95, min_p=0.01,
    typical_p=0.99, epsilon_cutoff=1e-4, eta_cutoff=1e-4, renormalize_logits=True,
)  # fmt: skip


def test_processors_per_row_equal_the_batch() -> None:
    """A server applies one request's settings to its own row [1, V]: the same as the batch."""
    p = Processors.from_generation_config(EVERYTHING, eos_ids=[4], max_length=20)
    assert p.bad_words_ids == ((11,), (12, 13))  # a lone EOS cannot be banned, as in transformers
    s, ids = scores_with_ties(), ids_for(L=10)
    eos, start = torch.tensor([4]), torch.tensor([0, 2, 0, 1])
    for n_new in (0, 1, 3):
        batch = sampling.process(p, ids, s, n_new=n_new, eos_ids=eos, prompt_start=start, prompt_ids=ids[:, :7])
        for b in range(4):
            row = sampling.process(p, ids[b : b + 1], s[b : b + 1], n_new=n_new, eos_ids=eos, prompt_start=start[b : b + 1],
                                   prompt_ids=ids[b : b + 1, :7])
            same_mask(row[0], batch[b])


def test_process_follows_transformers_order() -> None:
    """The whole chain against transformers' own list, built by its _get_logits_processor."""
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=60, n_positions=32, n_embd=8, n_layer=1, n_head=2))
    gc = transformers.GenerationConfig(**{k: v for k, v in EVERYTHING.to_dict().items() if v is not None},
                                       eos_token_id=4, max_length=20)
    gc.min_length = 12
    gc._eos_token_tensor = torch.tensor([4])
    ids = ids_for(L=10)
    chain = hf._get_logits_processor(gc, input_ids_seq_length=8, encoder_input_ids=ids[:, :8], device="cpu",
                                     model_kwargs={"attention_mask": torch.ones(4, 8, dtype=torch.long)})
    s = scores_with_ties()
    ours_gc = EVERYTHING.copy()
    ours_gc.min_length = 12
    p = Processors.from_generation_config(ours_gc, eos_ids=[4], max_length=20)
    ours = sampling.process(p, ids, s, n_new=2, eos_ids=torch.tensor([4]), prompt_ids=ids[:, :8])
    same_mask(ours, chain(ids, s.clone()))
