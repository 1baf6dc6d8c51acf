"""Generation parity: minigpt2's generate against transformers' generate, token for token.

Random-weight checkpoints come from conftest. The default TINY checkpoint is nearly
degenerate under greedy decoding (one token forever), so most cases use a "lively" one
(initializer_range=0.2) whose greedy and sampled outputs vary, which makes EOS stops,
n-gram bans and beam reorderings actually happen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import minigpt2
from minigpt2 import GPT2, Tokenizer, generation

LIVELY = dict(seed=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def lively(make_checkpoint: Any) -> tuple[GPT2, Any]:
    d, hf = make_checkpoint(**LIVELY)
    return GPT2.from_pretrained(d), hf


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: tuple[Path, Any]) -> tuple[GPT2, Any]:
    d, hf = tiny_checkpoint
    return GPT2.from_pretrained(d), hf


@pytest.fixture(scope="module")
def full_vocab(gpt2_tiny_vocab_checkpoint: tuple[Path, Any]) -> tuple[GPT2, Any]:
    d, hf = gpt2_tiny_vocab_checkpoint
    return GPT2.from_pretrained(d), hf


def prompts(batch: int, length: int, seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(model: GPT2, hf: Any, ids: torch.Tensor, mask: torch.Tensor | None = None, seed: int | None = None,
         **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Our generate and transformers', each after torch.manual_seed(seed) when given."""
    if seed is not None:
        torch.manual_seed(seed)
    ours = model.generate(ids, mask, **kw)
    if seed is not None:
        torch.manual_seed(seed)
    # No pad_token_id given: both sides pad with the (first) EOS id.
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **kw)
    return ours, theirs


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"{tuple(ours.shape)} != {tuple(theirs.shape)}\n{ours}\n{theirs}"
    assert torch.equal(ours, theirs), f"\n{ours}\n{theirs}"


def eos_in_greedy_path(model: GPT2, ids: torch.Tensor, at: int = 4) -> int:
    """A token that row 0 makes at step ``at`` under greedy: as EOS, it ends that row there."""
    out = model.generate(ids, max_new_tokens=at + 1, eos_token_id=None)
    return int(out[0, ids.shape[1] + at])


# --------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("length", [1, 7, 40])
def test_greedy_matches_transformers(lively: Any, length: int) -> None:
    model, hf = lively
    ids = prompts(2, length, seed=length)
    assert_same(*both(model, hf, ids, max_new_tokens=12))


def test_greedy_on_the_tiny_checkpoint(tiny: Any) -> None:
    model, hf = tiny
    assert_same(*both(model, hf, prompts(2, 5), max_new_tokens=8))


def test_prompt_as_list_or_1d_tensor(lively: Any) -> None:
    model, _ = lively
    ids = prompts(1, 6)
    ref = model.generate(ids, max_new_tokens=5)
    assert torch.equal(model.generate(ids[0], max_new_tokens=5), ref)
    assert torch.equal(model.generate(ids[0].tolist(), max_new_tokens=5), ref)
    assert torch.equal(model.generate(ids.tolist(), max_new_tokens=5), ref)
    assert ref.dtype == torch.long and not ref.is_inference()  # usable with autograd afterwards




# --------------------------------------------------------------------------- sampling
MIXES = [
    dict(),  # transformers' defaults for do_sample=True: temperature 1, top_k 50
    dict(temperature=0.7, top_k=0),
    dict(temperature=1.6, top_k=0),
    dict(top_k=3),
    dict(top_k=0, top_p=0.6),
    dict(temperature=0.8, top_k=20, top_p=0.9),
    dict(temperature=1.3, top_k=200, top_p=0.95),
]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "defaults")
def test_seeded_sampling_matches_transformers(lively: Any, mix: dict[str, Any]) -> None:
    model, hf = lively
    ids = prompts(3, 5, seed=1)
    assert_same(*both(model, hf, ids, seed=1234, max_new_tokens=12, do_sample=True, **mix))


def test_generator_reproduces_without_touching_the_global_rng(lively: Any) -> None:
    model, hf = lively
    ids = prompts(2, 5)
    state = torch.get_rng_state()
    a = model.generate(ids, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(7))
    b = model.generate(ids, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    # A CPU generator seeded with s draws what the global RNG seeded with s draws.
    torch.manual_seed(7)
    assert torch.equal(a, hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=True,
                                      pad_token_id=hf.generation_config.eos_token_id))


# --------------------------------------------------------------------------- processors
@pytest.mark.parametrize("penalty", [1.4, 0.7])
def test_repetition_penalty_matches_transformers(lively: Any, penalty: float) -> None:
    model, hf = lively
    assert_same(*both(model, hf, prompts(3, 6, seed=2), max_new_tokens=14, repetition_penalty=penalty))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(lively: Any, n: int) -> None:
    model, hf = lively
    ids = prompts(2, 6, seed=3)
    ours, theirs = both(model, hf, ids, max_new_tokens=16, no_repeat_ngram_size=n)
    assert_same(ours, theirs)
    for row in ours.tolist():  # and the property itself: no n-gram twice
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        assert len(grams) == len(set(grams))


def test_processors_together_when_sampling(lively: Any) -> None:
    model, hf = lively
    kw = dict(max_new_tokens=14, do_sample=True, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2,
              no_repeat_ngram_size=2)
    assert_same(*both(model, hf, prompts(3, 5, seed=4), seed=99, **kw))


def test_top_k_keeps_ties_and_top_p_keeps_min_tokens() -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from minigpt2 import sampling

    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    for k in (1, 2, 4, 10):
        assert torch.equal(sampling.top_k(scores, k), TopKLogitsWarper(k)(None, scores))
    for p in (0.01, 0.3, 0.9, 1.0):
        for keep in (1, 3):
            assert torch.equal(sampling.top_p(scores, p, keep), TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, scores))


def test_greedy_picks_what_argmax_picks_on_ties_inf_and_nan() -> None:
    """sampling.greedy uses torch.max's indices (faster); they must be torch.argmax's, which
    transformers' greedy search calls."""
    from minigpt2 import sampling

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        B, V = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 60000, (1,), generator=g))
        x = torch.randint(-3, 3, (B, V), generator=g).float()  # many ties
        if trial % 3 == 0:
            x[x < 0] = float("-inf")
        if trial % 7 == 0:
            x[0] = float("-inf")  # a row with nothing allowed
        if trial % 11 == 0:
            x[-1, V // 2] = float("nan")
        assert torch.equal(sampling.greedy(x), torch.argmax(x, dim=-1))


# --------------------------------------------------------------------------- beam search
@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=2),
        dict(num_beams=4, length_penalty=0.5),
        dict(num_beams=3, early_stopping=True),
        dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
        dict(num_beams=4, num_return_sequences=3),
        dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_beam_search_matches_transformers(lively: Any, kw: dict[str, Any]) -> None:
    model, hf = lively
    ids = prompts(2, 5, seed=5)
    eos = eos_in_greedy_path(model, ids, at=3)  # beams can end early, so the finished pool matters
    assert_same(*both(model, hf, ids, max_new_tokens=12, eos_token_id=eos, **kw))


def test_beam_sampling_matches_transformers(lively: Any) -> None:
    model, hf = lively
    ids = prompts(2, 5, seed=6)
    assert_same(*both(model, hf, ids, seed=5, max_new_tokens=10, num_beams=3, do_sample=True, top_k=20))


def test_beam_search_pad_zero_fill_quirk(lively: Any) -> None:
    """transformers fills unfinished beam slots with `pad or eos`, so pad 0 fills with EOS."""
    model, hf = lively
    ids = prompts(2, 5, seed=5)
    eos = eos_in_greedy_path(model, ids, at=2)
    assert_same(*both(model, hf, ids, max_new_tokens=10, num_beams=3, eos_token_id=eos, pad_token_id=0))


# --------------------------------------------------------------------------- EOS
def test_eos_stopping_from_the_checkpoint_config(make_checkpoint: Any, lively: Any) -> None:
    base, _ = lively
    ids = prompts(3, 5, seed=8)
    eos = eos_in_greedy_path(base, ids, at=4)
    d, hf = make_checkpoint(**LIVELY, eos_token_id=eos, bos_token_id=eos)  # same weights, EOS = that token
    model = GPT2.from_pretrained(d)
    ours, theirs = both(model, hf, ids, max_new_tokens=20)
    assert_same(ours, theirs)
    row0 = ours[0, 5:].tolist()
    assert row0[4] == eos and all(t == eos for t in row0[4:])  # finished rows are padded (pad = eos)
    # min_new_tokens bans EOS for the first tokens; a list of EOS ids; an explicit pad id.
    assert_same(*both(model, hf, ids, max_new_tokens=20, min_new_tokens=8))
    other = eos_in_greedy_path(base, ids, at=2)
    assert_same(*both(model, hf, ids, max_new_tokens=20, eos_token_id=[other, eos], pad_token_id=1))
    assert_same(*both(model, hf, ids, seed=3, max_new_tokens=20, do_sample=True, temperature=0.5, pad_token_id=1))


def test_output_shorter_when_every_row_finished(lively: Any) -> None:
    model, hf = lively
    ids = prompts(1, 5, seed=8)
    eos = eos_in_greedy_path(model, ids, at=2)
    ours, theirs = both(model, hf, ids, max_new_tokens=20, eos_token_id=eos)
    assert_same(ours, theirs)
    assert ours.shape[1] == 5 + 3


def test_eos_none_never_stops_early(make_checkpoint: Any, lively: Any) -> None:
    base, _ = lively
    ids = prompts(2, 5, seed=8)
    eos = eos_in_greedy_path(base, ids, at=1)
    d, hf = make_checkpoint(**LIVELY, eos_token_id=eos, bos_token_id=eos)
    model = GPT2.from_pretrained(d)
    ours = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    assert ours.shape == (2, 15) and ours[0, 6] == eos  # EOS made, generation went on
    hf.generation_config.eos_token_id = None
    try:
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, pad_token_id=0)
    finally:
        hf.generation_config.eos_token_id = eos
    assert_same(ours, theirs)


# --------------------------------------------------------------------------- left padding
def left_padded(vocab: int = 1000) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rows = [prompts(1, n, seed=n, vocab=vocab)[0] for n in (7, 3, 5)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), vocab - 1, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    return ids, mask, rows


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
        dict(num_beams=3),
        dict(do_sample=True, top_k=30, top_p=0.9),
    ],
    ids=["greedy", "penalties", "beams", "sampling"],
)
def test_left_padded_batch_matches_transformers(lively: Any, kw: dict[str, Any]) -> None:
    model, hf = lively
    ids, mask, _ = left_padded()
    assert_same(*both(model, hf, ids, mask, seed=11, max_new_tokens=12, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=2), dict(repetition_penalty=1.3)], ids=["greedy", "beams", "penalty"])
def test_each_padded_row_equals_the_row_alone(lively: Any, kw: dict[str, Any]) -> None:
    model, _ = lively
    ids, mask, rows = left_padded()
    batch = model.generate(ids, mask, max_new_tokens=10, eos_token_id=None, **kw)
    T = ids.shape[1]
    for i, r in enumerate(rows):
        alone = model.generate(r, max_new_tokens=10, eos_token_id=None, **kw)
        assert torch.equal(batch[i, T:], alone[0, len(r) :])


def test_mask_inferred_from_pad_token_as_transformers(lively: Any) -> None:
    """No attention_mask, a pad_token_id that is not EOS and occurs in the prompt: it is padding."""
    model, hf = lively
    ids, _, _ = left_padded()
    ids = ids.masked_fill(ids == 999, 5)
    for kw in (dict(), dict(num_beams=2)):
        ours = model.generate(ids, max_new_tokens=8, pad_token_id=5, **kw)
        assert_same(ours, hf.generate(ids, max_new_tokens=8, pad_token_id=5, **kw))


# --------------------------------------------------------------------------- streaming
def test_stream_equals_generate(full_vocab: Any) -> None:
    model, _ = full_vocab
    tok = Tokenizer()
    ids, mask, _ = left_padded(vocab=50257)
    torch.manual_seed(5)
    ref = model.generate(ids, mask, max_new_tokens=15, do_sample=True, temperature=1.2)
    torch.manual_seed(5)
    steps = list(minigpt2.stream(model, tok, ids, mask, max_new_tokens=15, do_sample=True, temperature=1.2))
    assert torch.equal(torch.stack([s.tokens for s in steps], dim=1), ref[:, ids.shape[1] :])
    for b in range(3):
        assert "".join(s.texts[b] for s in steps) == tok.decode(ref[b, ids.shape[1] :].tolist())
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_stream_text_prompt_and_method_form(full_vocab: Any) -> None:
    model, _ = full_vocab
    tok = Tokenizer()
    ref = model.generate(tok.encode("Hello there"), max_new_tokens=6)
    steps = list(model.stream(tok, "Hello there", max_new_tokens=6))
    assert [s.token for s in steps] == ref[0, -6:].tolist()
    assert "".join(s.text for s in steps) == tok.decode(ref[0, -6:].tolist())


def test_stream_holds_back_incomplete_utf8(full_vocab: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Characters split across byte-level tokens come out whole, never as U+FFFD halves."""
    model, _ = full_vocab
    tok = Tokenizer()
    text = "naïve 😀 日本語 ok"
    forced = tok.encode(text)
    assert any(tok.decode([t]) == "\ufffd" for t in forced)  # some token is part of a character
    eos = tok.eos_token_id

    def fake_decode(model: Any, ids: torch.Tensor, mask: Any, s: Any, *rest: Any):
        logits = torch.zeros(1, model.config.vocab_size)
        for i, t in enumerate(forced + [eos]):
            yield generation.Step(torch.tensor([t]), torch.tensor([i == len(forced)]), logits, logits)

    monkeypatch.setattr(generation, "decode_n_tokens", fake_decode)
    steps = list(minigpt2.stream(model, tok, [eos], max_new_tokens=len(forced) + 1))
    assert "".join(s.text for s in steps) == text  # the EOS that ended the row adds no text
    assert all("\ufffd" not in s.text for s in steps)
    assert any(s.text == "" for s in steps[:-1])  # held back while incomplete


# --------------------------------------------------------------------------- stop strings
def test_stop_strings_match_transformers(full_vocab: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model, hf = full_vocab
    tok = Tokenizer()
    tok.save_pretrained(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok.encode("The weather today is")])
    kw = dict(max_new_tokens=20, do_sample=True, top_k=0)
    torch.manual_seed(3)
    free = model.generate(ids, **kw)[0, ids.shape[1] :].tolist()
    # A stop string that straddles the boundary between new tokens 5 and 6.
    left, right = tok.decode(free[:6]), tok.decode(free[6:])
    stop = left[-2:] + right[:2]
    torch.manual_seed(3)
    ours = model.generate(ids, stop=[stop], tokenizer=tok, **kw)
    torch.manual_seed(3)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), stop_strings=[stop], tokenizer=hf_tok,
                         pad_token_id=tok.eos_token_id, **kw)
    assert_same(ours, theirs)
    new = ours[0, ids.shape[1] :].tolist()
    assert stop in tok.decode(new) and stop not in tok.decode(new[:-1]) and len(new) < 20
    # The same through stream: the text ends with the token that completed the stop string.
    torch.manual_seed(3)
    streamed = "".join(s.text for s in model.stream(tok, ids, stop=[stop], **kw))
    assert streamed == tok.decode(new)

    # Beam search: candidates that complete a stop string finish, as there.
    beam_kw = dict(max_new_tokens=12, num_beams=3, num_return_sequences=3)
    best = model.generate(ids, **beam_kw)[0, ids.shape[1] :].tolist()
    stop = tok.decode(best[:4])[-2:] + tok.decode(best[4:])[:1]
    ours = model.generate(ids, stop=[stop], tokenizer=tok, **beam_kw)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), stop_strings=[stop], tokenizer=hf_tok, **beam_kw)
    assert_same(ours, theirs)
    eos = tok.eos_token_id
    made = [[t for t in row[ids.shape[1] :].tolist() if t != eos] for row in ours]  # padding (= EOS) off
    assert any(stop in tok.decode(r) and stop not in tok.decode(r[:-1]) and len(r) < 12 for r in made)


# --------------------------------------------------------------------------- bad arguments
BAD: list[tuple[dict[str, Any], str]] = [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(eos_token_id=-3), "eos_token_id"),
    (dict(pad_token_id=10**6), "pad_token_id"),
    (dict(stop=["\n"]), "tokenizer"),
    (dict(generator="seed"), "generator"),
    (dict(max_new_tokens=200), "n_positions=128"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[n + ":" + str(list(k.values())[0]) for k, n in BAD])
def test_bad_arguments_raise_before_any_work(tiny: Any, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any],
                                             name: str) -> None:
    model, _ = tiny
    monkeypatch.setattr(generation, "_forward_last", lambda *a: pytest.fail("the model ran"))
    kw = {"max_new_tokens": 5, **kw}
    with pytest.raises(ValueError, match=name):
        model.generate(prompts(1, 4), **kw)


@pytest.mark.parametrize(
    "ids,mask,match",
    [
        ([], None, "empty"),
        (torch.zeros(1, 0, dtype=torch.long), None, "empty"),
        ([[1, 2, 1000]], None, "1000.*vocabulary"),
        ([[-1, 2]], None, "-1"),
        ([[1.5, 2.0]], None, "integer"),
        ([[1, 2], [3]], None, "lengths"),
        ([[1, 2, 3]], [[1, 1]], "attention_mask"),
        ([[1, 2, 3]], [[0, 0, 0]], "empty"),
        ("hello", None, "encode"),
    ],
)
def test_bad_prompts(tiny: Any, ids: Any, mask: Any, match: str) -> None:
    model, _ = tiny
    mask = None if mask is None else torch.tensor(mask)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, mask, max_new_tokens=3)


def test_too_long_names_the_limit(tiny: Any) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match=r"prompt of 100 tokens \+ max_new_tokens=29 exceeds n_positions=128"):
        model.generate(prompts(1, 100), max_new_tokens=29)
    assert model.generate(prompts(1, 100), max_new_tokens=28, eos_token_id=None).shape == (1, 128)


def test_stream_checks_arguments_before_the_first_step(tiny: Any) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="top_p"):
        model.stream(None, [1, 2], max_new_tokens=3, top_p=2.0)  # raised at the call, not at next()
    with pytest.raises(ValueError, match="num_beams"):
        model.stream(None, [1, 2], max_new_tokens=3, num_beams=2)


# --------------------------------------------------------------------------- the loop itself
def test_prefill_once_then_one_token_per_step(lively: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One prompt forward, then one token per step; the head only ever sees the last position."""
    model, _ = lively
    calls: list[tuple[int, ...]] = []
    real = generation._forward_last

    def spy(model: GPT2, ids: torch.Tensor, *rest: Any) -> torch.Tensor:
        calls.append(tuple(ids.shape))
        return real(model, ids, *rest)

    head_inputs: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: head_inputs.append(tuple(inp[0].shape)))
    caches: list[int] = []
    make_cache = model.make_cache
    monkeypatch.setattr(generation, "_forward_last", spy)
    monkeypatch.setattr(model, "make_cache", lambda b, n: caches.append(n) or make_cache(b, n), raising=False)
    try:
        model.generate(prompts(2, 9), max_new_tokens=6, eos_token_id=None)
    finally:
        hook.remove()
    assert calls == [(2, 9)] + [(2, 1)] * 5
    assert head_inputs == [(2, 64)] * 6  # (B, C): one position per row
    assert caches == [9 + 6]
