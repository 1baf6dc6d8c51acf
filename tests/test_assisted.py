"""Assisted decoding: the same greedy tokens as plain decoding (and as transformers' assisted
generate), the target's own distribution when sampling (a chi-square test over many seeds on
a tiny vocabulary), caches rolled back by length, and the errors."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from minigpt2 import GPT2, Tokenizer, assisted, fast
from minigpt2.cache import KVCache

LIVELY = dict(initializer_range=0.2)


@pytest.fixture(scope="module")
def pair(make_checkpoint: Any) -> tuple[GPT2, Any, GPT2, Any]:
    """A 2-layer target and a different 1-layer assistant with the same vocabulary."""
    d, hf = make_checkpoint(seed=3, **LIVELY)
    da, hfa = make_checkpoint(seed=5, n_layer=1, **LIVELY)
    return GPT2.from_pretrained(d), hf, GPT2.from_pretrained(da), hfa


def prompt(n: int = 6, seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab - 1, (1, n), generator=torch.Generator().manual_seed(seed))


DRAFTS = {
    "assistant": lambda a: dict(assistant_model=a),
    "assistant-long-drafts": lambda a: dict(assistant_model=a, assistant_confidence_threshold=0.0, num_assistant_tokens=4),
    "heuristic": lambda a: dict(assistant_model=a, assistant_confidence_threshold=0.0,
                                num_assistant_tokens_schedule="heuristic_transient"),
    "prompt-lookup": lambda a: dict(prompt_lookup_num_tokens=3),
    "prompt-lookup-ngram1": lambda a: dict(prompt_lookup_num_tokens=5, max_matching_ngram_size=1),
    "early-exit-1": lambda a: dict(assistant_early_exit=1, assistant_confidence_threshold=0.0),
    "self": lambda a: dict(assistant_early_exit=2, assistant_confidence_threshold=0.0, num_assistant_tokens=5),
}


# --------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("draft", list(DRAFTS))
def test_greedy_equals_plain_greedy(pair: Any, draft: str) -> None:
    model, _, assistant, _ = pair
    kw = DRAFTS[draft](assistant)
    for seed in range(3):
        ids = prompt(seed=seed)
        ref = model.generate(ids, max_new_tokens=24, eos_token_id=None)
        out, stats = assisted.generate_with_stats(model, ids, max_new_tokens=24, eos_token_id=None, **kw)
        assert torch.equal(out, ref), f"{draft}, seed {seed}"
        assert stats.tokens == 24 and stats.drafted > 0
    if draft == "self":  # the model as its own draft: every draft accepted
        assert stats.acceptance_rate == 1.0 and stats.rounds < 24


def test_the_target_checks_on_kernels_chosen_for_the_check(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target only checks 1 + k drafts at a time, so its fast path is prepared for that many
    rows; a model drafting for itself keeps one set (one-row kernels) instead of two in turn."""
    model, _, assistant, _ = pair
    asked: list[tuple[GPT2, int]] = []
    real = fast.decoder
    monkeypatch.setattr(fast, "decoder", lambda m, b: asked.append((m, b)) or real(m, b))
    kw = dict(max_new_tokens=8, eos_token_id=None, assistant_confidence_threshold=0.0, num_assistant_tokens=4)
    model.generate(prompt(), assistant_model=assistant, **kw)
    assert [b for m, b in asked if m is model] == [5] and {b for m, b in asked if m is assistant} == {1}
    asked.clear()
    model.generate(prompt(), assistant_model=model, **kw)
    assert {b for _, b in asked} == {1}


@pytest.mark.parametrize("draft", ["assistant-long-drafts", "prompt-lookup", "early-exit-1"])
def test_greedy_with_processors_eos_and_padding(pair: Any, draft: str) -> None:
    model, _, assistant, _ = pair
    kw = DRAFTS[draft](assistant)
    ids = prompt(seed=7)
    settings = [
        dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
        dict(bad_words_ids=[[5, 6], [11]], sequence_bias={(12,): 2.0}, min_new_tokens=5),
        dict(eos_token_id=int(model.generate(ids, max_new_tokens=9, eos_token_id=None)[0, -1])),  # ends at step 8
        dict(max_new_tokens=2),
        dict(max_new_tokens=1),
    ]
    for extra in settings:
        extra = {"max_new_tokens": 16, **extra}
        assert torch.equal(model.generate(ids, **extra, **kw), model.generate(ids, **extra)), extra
    # one left-padded row with its mask: the same as the row alone
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    out = model.generate(padded, mask, max_new_tokens=12, eos_token_id=None, **kw)
    assert torch.equal(out[:, 3:], model.generate(ids, max_new_tokens=12, eos_token_id=None))


def test_greedy_equals_transformers_assisted_generate(pair: Any) -> None:
    model, hf, assistant, hf_assistant = pair
    for seed in range(1):
        ids = prompt(seed=seed)
        mask = torch.ones_like(ids)
        ours = model.generate(ids, max_new_tokens=15, assistant_model=assistant)
        assert torch.equal(ours, hf.generate(ids, attention_mask=mask, max_new_tokens=15, assistant_model=hf_assistant))
        ours = model.generate(ids, max_new_tokens=15, prompt_lookup_num_tokens=3)
        assert torch.equal(ours, hf.generate(ids, attention_mask=mask, max_new_tokens=15, prompt_lookup_num_tokens=3))


def test_stop_strings_and_stream(make_checkpoint: Any) -> None:
    d, _ = make_checkpoint(seed=2, vocab_size=50257, n_positions=256, n_embd=64, n_layer=2, n_head=4)
    model, tok = GPT2.from_pretrained(d), Tokenizer()
    ids = torch.tensor([tok.encode("The weather today is")])
    free = model.generate(ids, max_new_tokens=14)[0, 4:].tolist()
    stop = tok.decode(free[:6])[-2:] + tok.decode(free[6:])[:1]
    kw = dict(max_new_tokens=14, stop=[stop], tokenizer=tok, assistant_early_exit=1, assistant_confidence_threshold=0.0)
    ref = model.generate(ids, max_new_tokens=14, stop=[stop], tokenizer=tok)
    assert torch.equal(model.generate(ids, **kw), ref) and ref.shape[1] < 4 + 14
    del kw["tokenizer"]
    steps = list(model.stream(tok, ids, logprobs=3, **kw))
    assert [s.token for s in steps] == ref[0, 4:].tolist()
    plain = list(model.stream(tok, ids, max_new_tokens=14, stop=[stop], logprobs=3))
    for a, b in zip(steps, plain):  # the same log-probabilities as plain streaming
        assert torch.allclose(a.top_logprobs, b.top_logprobs, atol=1e-4) and torch.equal(a.top_ids, b.top_ids)


def test_scores_equal_plain_decoding(pair: Any) -> None:
    model, _, assistant, _ = pair
    ids = prompt(seed=3)
    kw = dict(max_new_tokens=10, return_dict_in_generate=True, output_scores=True, output_logits=True,
              repetition_penalty=1.2)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, assistant_model=assistant, assistant_confidence_threshold=0.0, **kw)
    assert torch.equal(out.sequences, ref.sequences) and len(out.scores) == len(ref.scores) == 10
    for a, b in zip(out.scores + out.logits, ref.scores + ref.logits):
        assert torch.allclose(a, b, atol=1e-4)


def test_heuristic_schedule_is_kept_on_the_assistant(pair: Any, make_checkpoint: Any) -> None:
    model, _, _, _ = pair
    d, _ = make_checkpoint(seed=3, **LIVELY)
    own = GPT2.from_pretrained(d)  # the same weights: every draft accepted, so the draft grows
    own.generation_config.num_assistant_tokens = 3
    model.generate(prompt(seed=4), max_new_tokens=20, assistant_model=own, assistant_confidence_threshold=0.0,
                   num_assistant_tokens_schedule="heuristic", eos_token_id=None)
    assert own.generation_config.num_assistant_tokens > 3  # read from the assistant, kept there, as transformers


# --------------------------------------------------------------------------- caches
def test_caches_roll_back_by_length(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rejected drafts are forgotten by moving KVCache.length back: nothing is copied or reordered."""
    model, _, assistant, _ = pair
    crops: list[tuple[int, int]] = []
    real_crop = KVCache.crop

    def crop(self: KVCache, length: int) -> None:
        crops.append((self.length, length))
        real_crop(self, length)

    monkeypatch.setattr(KVCache, "crop", crop)
    monkeypatch.setattr(KVCache, "reorder", lambda *a: pytest.fail("a cache was reordered"))
    model.generate(prompt(seed=5), max_new_tokens=20, assistant_model=assistant, assistant_confidence_threshold=0.0,
                   num_assistant_tokens=4, eos_token_id=None)
    assert any(new < old for old, new in crops)  # something was rolled back


# --------------------------------------------------------------------------- sampling
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Thousands of tiny forwards: intra-op threads only add overhead (and the test restores them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def chi_square_bound(dof: int, z: float = 3.09) -> float:
    """The 99.9th percentile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.fixture(scope="module")
def small_vocab(make_checkpoint: Any) -> tuple[GPT2, GPT2]:
    config = dict(vocab_size=8, n_positions=32, n_embd=16, n_layer=2, n_head=2, initializer_range=0.3)
    target, _ = make_checkpoint(seed=11, **config)
    draft, _ = make_checkpoint(seed=12, **config)
    return GPT2.from_pretrained(target), GPT2.from_pretrained(draft)


@pytest.mark.parametrize("draft", ["assistant", "prompt-lookup", "early-exit"])
def test_sampling_keeps_the_model_distribution(small_vocab: Any, draft: str) -> None:
    """Speculative sampling: the first two tokens, over many seeds, follow the target model's
    own distribution p(t1) p(t2 | t1) (chi-square at the 0.1 % level), while drafts are both
    accepted and rejected (so the residual draw norm(max(0, p - q)) is exercised)."""
    model, assistant = small_vocab
    V, N = 8, 1200
    ids = torch.tensor([[1, 2, 3, 1, 2]])  # a repeated bigram gives prompt lookup drafts to offer
    kw = dict(max_new_tokens=3, do_sample=True, top_k=0, temperature=1.3, eos_token_id=None)
    kw.update({
        "assistant": dict(assistant_model=assistant, assistant_confidence_threshold=0.0, num_assistant_tokens=2),
        "prompt-lookup": dict(prompt_lookup_num_tokens=2),
        "early-exit": dict(assistant_early_exit=1, assistant_confidence_threshold=0.0, num_assistant_tokens=2),
    }[draft])  # fmt: skip
    with torch.no_grad():
        p1 = (model(ids)[0, -1] / 1.3).softmax(-1)
        nxt = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], dim=1)
        expected = (p1[:, None] * (model(nxt)[:, -1] / 1.3).softmax(-1)).flatten() * N  # (V * V,)
    counts = torch.zeros(V * V)
    total = assisted.AssistedStats()
    with one_thread():
        for seed in range(N):
            torch.manual_seed(seed)
            out, stats = assisted.generate_with_stats(model, ids, **kw)
            counts[int(out[0, 5]) * V + int(out[0, 6])] += 1
            total.drafted += stats.drafted
            total.accepted += stats.accepted
    assert 0 < total.accepted < total.drafted  # both paths taken
    big = expected >= 5  # small cells pooled into one
    chi2 = float((((counts - expected) ** 2) / expected)[big].sum())
    rest_obs, rest_exp = float(counts[~big].sum()), float(expected[~big].sum())
    dof = int(big.sum()) - 1
    if rest_exp > 0:
        chi2 += (rest_obs - rest_exp) ** 2 / rest_exp
        dof += 1
    assert chi2 < chi_square_bound(dof), f"chi2={chi2:.1f} with {dof} degrees of freedom"


def test_speculative_sampling_matches_the_residual_rule() -> None:
    """One rejection step in isolation: a draft q that overweights token 0 gets token 0
    accepted with p0/q0 and otherwise draws from norm(max(0, p - q)); the result is p."""
    p = torch.tensor([0.1, 0.6, 0.3])
    q = torch.tensor([0.7, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    N = 5000
    counts = torch.zeros(3)
    with one_thread():
        for _ in range(N):
            drafted = torch.multinomial(q, 1, generator=g)
            valid, n = assisted._speculative_sampling(drafted, q.log()[None], torch.stack([p.log(), p.log()]), g)
            counts[int(valid[0])] += 1
    assert torch.allclose(counts / N, p, atol=0.03)  # 4 standard deviations


# --------------------------------------------------------------------------- errors
def test_bad_assisted_settings(pair: Any, make_checkpoint: Any) -> None:
    model, _, assistant, _ = pair
    d, _ = make_checkpoint(seed=5, n_layer=1, vocab_size=500)
    other_vocab = GPT2.from_pretrained(d)
    ids = prompt()
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(ids.repeat(2, 1), max_new_tokens=3, assistant_model=assistant)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(ids, max_new_tokens=3, assistant_model=other_vocab)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, max_new_tokens=3, assistant_model=assistant, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="one source"):
        model.generate(ids, max_new_tokens=3, assistant_model=assistant, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="n_layer"):
        model.generate(ids, max_new_tokens=3, assistant_early_exit=5)
    with pytest.raises(ValueError, match="GPT2"):
        model.generate(ids, max_new_tokens=3, assistant_model="distilgpt2")
    with pytest.warns(UserWarning, match="num_beams"):  # transformers ignores the assistant with beams, and warns
        out = model.generate(ids, max_new_tokens=3, num_beams=2, assistant_model=assistant)
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, num_beams=2))
