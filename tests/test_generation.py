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
from minigpt2 import GPT2, Tokenizer, assisted, generation

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
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=None, max_length=4), "max_length"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(typical_p=1.2), "typical_p"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (dict(eta_cutoff=-0.5), "eta_cutoff"),
    (dict(top_h=0.0), "top_h"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(bad_words_ids=[[3, 1000]]), "bad_words_ids"),
    (dict(bad_words_ids=[3, 4]), "bad_words_ids"),
    (dict(sequence_bias={(1000,): 1.0}), "sequence_bias"),
    (dict(sequence_bias={(): 1.0}), "sequence_bias"),
    (dict(sequence_bias={(3,): "big"}), "sequence_bias"),
    (dict(suppress_tokens=[5, 1000]), "suppress_tokens"),
    (dict(begin_suppress_tokens=[-1]), "begin_suppress_tokens"),
    (dict(forced_bos_token_id=1000), "forced_bos_token_id"),
    (dict(forced_eos_token_id=[3, 2000]), "forced_eos_token_id"),
    (dict(exponential_decay_length_penalty=(2,)), "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=None), "exponential_decay_length_penalty"),
    (dict(min_length=-1), "min_length"),
    (dict(max_time=-1.0), "max_time"),
    (dict(stop_strings=[""]), "stop_strings"),
    (dict(renormalize_logits="yes"), "renormalize_logits"),
    (dict(num_assistant_tokens=0, prompt_lookup_num_tokens=2), "num_assistant_tokens"),
    (dict(num_assistant_tokens_schedule="fast", prompt_lookup_num_tokens=2), "num_assistant_tokens_schedule"),
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
    (dict(assistant_early_exit=3), "assistant_early_exit"),
    (dict(prompt_lookup_num_tokens=2, num_return_sequences=2, do_sample=True), "num_return_sequences"),
    (dict(prompt_lookup_num_tokens=2, assistant_early_exit=1), "one source"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[n + ":" + str(list(k.values())[0]) for k, n in BAD])
def test_bad_arguments_raise_before_any_work(tiny: Any, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any],
                                             name: str) -> None:
    model, _ = tiny
    # assisted.py holds its own reference to the forward (imported from generation), so both
    # are patched; patching only generation's leaked the stub into assisted when this test was
    # the first to import it.
    for module in (generation, assisted):
        monkeypatch.setattr(module, "_forward_last", lambda *a: pytest.fail("the model ran"))
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
    with pytest.raises(ValueError, match="tokenizer .or None. before the prompt, got a Tensor"):
        model.stream(torch.tensor([[1, 2]]), max_new_tokens=3)  # the prompt where the tokenizer goes
    with pytest.raises(ValueError, match="got a list"):
        model.stream([1, 2], max_new_tokens=3)


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


# --------------------------------------------------------------------------- every processor, in generate
def greedy_path(model: GPT2, ids: torch.Tensor, n: int, **kw: Any) -> list[list[int]]:
    return model.generate(ids, max_new_tokens=n, eos_token_id=None, **kw)[:, ids.shape[1] :].tolist()


WARPER_MIXES = [
    dict(min_p=0.05),
    dict(min_p=0.2, temperature=1.5, top_k=0),
    dict(typical_p=0.4),
    dict(typical_p=0.9, top_k=0, temperature=0.7),
    dict(epsilon_cutoff=0.003, top_k=0),
    dict(eta_cutoff=0.002, top_k=0),
    dict(top_h=0.6, top_k=0),
    dict(top_h=0.3, min_p=0.02, typical_p=0.95, top_p=0.9, temperature=1.2),
    dict(top_p=0.0),  # keeps the most likely token only, as in transformers
    dict(renormalize_logits=True, top_k=30, min_p=0.05),
]


@pytest.mark.parametrize("mix", WARPER_MIXES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_new_warpers_sample_what_transformers_samples(lively: Any, mix: dict[str, Any]) -> None:
    model, hf = lively
    ids = prompts(3, 5, seed=21)
    assert_same(*both(model, hf, ids, seed=7, max_new_tokens=12, do_sample=True, **mix))


def test_warpers_in_beam_sampling(lively: Any) -> None:
    """Beam sampling keeps n_eos + 1 tokens in every warper (min_tokens_to_keep), as there."""
    model, hf = lively
    ids = prompts(2, 5, seed=22)
    for mix in (dict(min_p=0.3), dict(typical_p=0.2), dict(epsilon_cutoff=0.05, top_k=0), dict(top_h=0.2)):
        assert_same(*both(model, hf, ids, seed=8, max_new_tokens=8, num_beams=3, do_sample=True, **mix))


def test_processors_change_greedy_as_in_transformers(lively: Any) -> None:
    """Each processor, given values that change the greedy path, changes it as transformers does."""
    model, hf = lively
    ids = prompts(2, 5, seed=23)
    free = greedy_path(model, ids, 10)
    a, b = free[0][2], free[0][3]  # tokens row 0 makes at steps 2 and 3
    eos = free[1][4]
    cases = [
        dict(bad_words_ids=[[a]]),
        dict(bad_words_ids=[[a, b], [free[1][0]]]),  # a two-token sequence: b is banned only after a
        dict(sequence_bias={(a,): -30.0, (free[1][2],): 5.0}),
        dict(sequence_bias=[[[a, b], -40.0]]),
        dict(suppress_tokens=[a, free[1][1]]),
        dict(begin_suppress_tokens=[free[0][0], free[1][0]]),
        dict(forced_eos_token_id=eos),
        dict(min_length=5 + 8, eos_token_id=eos),
        dict(exponential_decay_length_penalty=(1, 3.0), eos_token_id=eos),
        dict(encoder_repetition_penalty=3.0),
        dict(remove_invalid_values=True, repetition_penalty=1.5),
    ]
    for kw in cases:
        ours, theirs = both(model, hf, ids, max_new_tokens=10, **kw)
        assert_same(ours, theirs)
        if "remove_invalid_values" not in kw:
            changed = model.generate(ids, max_new_tokens=10, **kw)[:, 5:].tolist() != greedy_path(model, ids, 10)
            assert changed, f"{kw} changed nothing: the case tests nothing"
    # The prompt's n-grams banned: a prompt that ends with the model's own continuation, which repeats itself.
    looped = torch.cat([ids, torch.tensor(free)[:, :6]], dim=1)
    for n in (1, 2):
        ours, theirs = both(model, hf, looped, max_new_tokens=10, encoder_no_repeat_ngram_size=n)
        assert_same(ours, theirs)
        assert ours[:, 11:].tolist() != greedy_path(model, looped, 10)


def test_forced_bos_on_a_one_token_prompt(lively: Any) -> None:
    """forced_bos_token_id fires when the sequence is one token long (transformers' rule), and
    begin_suppress_tokens then moves to the second new token."""
    model, hf = lively
    ids = prompts(2, 1, seed=24)
    assert_same(*both(model, hf, ids, max_new_tokens=6, forced_bos_token_id=7))
    first = greedy_path(model, ids, 3, forced_bos_token_id=7)
    assert_same(*both(model, hf, ids, max_new_tokens=6, forced_bos_token_id=7, begin_suppress_tokens=[first[0][1]]))


def test_processors_in_beam_search(lively: Any) -> None:
    model, hf = lively
    ids = prompts(2, 5, seed=25)
    free = greedy_path(model, ids, 8)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, bad_words_ids=[[free[0][1]]],
              sequence_bias={(free[1][2],): -5.0}, suppress_tokens=[free[0][3]], min_p=0.1, renormalize_logits=True,
              eos_token_id=free[1][4], min_length=9)
    assert_same(*both(model, hf, ids, **kw))


def test_max_time_stops_the_call(lively: Any) -> None:
    """max_time=0: the first step already runs past it, so one token is made (as transformers)."""
    model, hf = lively
    ids = prompts(2, 5, seed=26)
    for kw in (dict(), dict(num_beams=2), dict(do_sample=True)):
        ours, theirs = both(model, hf, ids, seed=1, max_new_tokens=20, max_time=0.0, **kw)
        assert_same(ours, theirs)
        assert ours.shape[1] == 6
    assert model.generate(ids, max_new_tokens=20, max_time=60.0, eos_token_id=None).shape[1] == 25


def test_stop_strings_is_transformers_spelling_of_stop(full_vocab: Any) -> None:
    model, _ = full_vocab
    tok = Tokenizer()
    ids = torch.tensor([tok.encode("The weather today is")])
    free = tok.decode(model.generate(ids, max_new_tokens=12)[0, 4:].tolist())
    stop = free[8:11]
    a = model.generate(ids, max_new_tokens=12, stop=[stop], tokenizer=tok)
    b = model.generate(ids, max_new_tokens=12, stop_strings=stop, tokenizer=tok)
    assert torch.equal(a, b) and a.shape[1] < 4 + 12
    with pytest.raises(ValueError, match="once"):
        model.generate(ids, max_new_tokens=3, stop=["a"], stop_strings=["b"], tokenizer=tok)


# --------------------------------------------------------------------------- scores
def dict_both(model: GPT2, hf: Any, ids: torch.Tensor, seed: int = 0, **kw: Any) -> tuple[Any, Any]:
    kw = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    torch.manual_seed(seed)
    ours = model.generate(ids, **kw)
    torch.manual_seed(seed)
    return ours, hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def assert_close_tuple(ours: Any, theirs: Any) -> None:
    assert ours is not None and theirs is not None and len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        assert o.shape == t.shape
        assert torch.equal(torch.isinf(o), torch.isinf(t))
        finite = torch.isfinite(t)
        scale = float(t[finite].abs().max())
        assert float((o[finite] - t[finite]).abs().max()) <= 1e-4 * max(scale, 1.0)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(do_sample=True, top_k=20, temperature=0.8), dict(repetition_penalty=1.3, min_new_tokens=3),
     dict(do_sample=True, num_return_sequences=2, top_p=0.8)],
    ids=["greedy", "sampling", "processors", "samples"],
)
def test_scores_and_logits_equal_transformers(lively: Any, kw: dict[str, Any]) -> None:
    model, hf = lively
    ids = prompts(2, 5, seed=27)
    eos = eos_in_greedy_path(model, ids, at=3)
    ours, theirs = dict_both(model, hf, ids, seed=3, max_new_tokens=8, eos_token_id=eos, **kw)
    assert isinstance(ours, minigpt2.GenerateOutput) and ours.beam_indices is None and ours.sequences_scores is None
    assert_same(ours.sequences, theirs.sequences)
    assert_close_tuple(ours.scores, theirs.scores)
    assert_close_tuple(ours.logits, theirs.logits)
    for norm in (False, True):
        t_ours = model.compute_transition_scores(ours.sequences, ours.scores, normalize_logits=norm)
        t_theirs = hf.compute_transition_scores(theirs.sequences, theirs.scores, normalize_logits=norm)
        assert torch.allclose(t_ours, t_theirs, atol=1e-4)
    assert not ours.scores[0].is_inference()


@pytest.mark.parametrize(
    "kw",
    [dict(num_beams=3, num_return_sequences=3), dict(num_beams=4, length_penalty=0.5, num_return_sequences=2),
     dict(num_beams=3, do_sample=True, top_k=30, num_return_sequences=2)],
    ids=["beams", "length_penalty", "beam_sampling"],
)
def test_beam_scores_indices_and_transition_scores(lively: Any, kw: dict[str, Any]) -> None:
    model, hf = lively
    ids = prompts(2, 5, seed=28)
    eos = eos_in_greedy_path(model, ids, at=2)
    ours, theirs = dict_both(model, hf, ids, seed=5, max_new_tokens=9, eos_token_id=eos, **kw)
    assert_same(ours.sequences, theirs.sequences)
    assert torch.equal(ours.beam_indices, theirs.beam_indices) and ours.beam_indices.dtype == theirs.beam_indices.dtype
    assert torch.allclose(ours.sequences_scores, theirs.sequences_scores, atol=1e-5)
    assert_close_tuple(ours.scores, theirs.scores)
    assert_close_tuple(ours.logits, theirs.logits)
    t_ours = model.compute_transition_scores(ours.sequences, ours.scores, ours.beam_indices)
    t_theirs = hf.compute_transition_scores(theirs.sequences, theirs.scores, theirs.beam_indices)
    assert torch.allclose(t_ours, t_theirs, atol=1e-4)
    # transformers' documented identity: the summed transition scores, length-penalised, are the sequence scores.
    lp = kw.get("length_penalty", 1.0)
    length = (ours.beam_indices >= 0).sum(dim=1)
    assert torch.allclose(t_ours.sum(dim=1) / length**lp, ours.sequences_scores, atol=1e-4)


def test_return_dict_without_scores(lively: Any) -> None:
    model, hf = lively
    ids = prompts(1, 5)
    out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, return_dict_in_generate=True)
    assert out.scores is None and out.logits is None and torch.equal(out.sequences, ref.sequences)
    beam = model.generate(ids, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    assert beam.sequences_scores is None and beam.beam_indices is not None
    with pytest.raises(ValueError, match="output_scores"):
        model.compute_transition_scores(out.sequences, ())


# --------------------------------------------------------------------------- logprobs while streaming
@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_stream_logprobs(lively: Any, mode: str) -> None:
    model, hf = lively
    ids = prompts(2, 5, seed=29)
    kw = dict(max_new_tokens=7, do_sample=True, top_k=10, temperature=0.7, repetition_penalty=1.2)
    torch.manual_seed(4)
    steps = list(model.stream(None, ids, logprobs=5, logprobs_mode=mode, **kw))
    torch.manual_seed(4)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, output_scores=True,
                      output_logits=True, **kw)
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), ref.sequences[:, 5:])
    dists = ref.logits if mode == "raw" else ref.scores
    for s, d in zip(steps, dists):
        logp = torch.log_softmax(d, dim=-1)
        top = torch.topk(logp, 5, dim=-1)
        assert s.top_ids.shape == (2, 5) and torch.equal(s.top_ids, top.indices)
        assert torch.allclose(s.top_logprobs, top.values, atol=1e-5)
        assert torch.allclose(s.logprobs, logp.gather(1, s.tokens[:, None])[:, 0], atol=1e-5)
        assert bool((s.logprobs <= s.top_logprobs[:, 0] + 1e-6).all())  # nothing beats the most likely
    if mode == "processed":  # top-k 10: the 10 best are finite, the rest was cut
        assert bool(torch.isfinite(steps[0].top_logprobs).all())


def test_stream_logprobs_after_a_row_finished(lively: Any) -> None:
    model, _ = lively
    ids = prompts(2, 5, seed=30)
    eos = eos_in_greedy_path(model, ids, at=1)
    steps = list(model.stream(None, ids, max_new_tokens=6, eos_token_id=eos, logprobs=2))
    gone = [s for s in steps if bool(s.finished[0])][1:]  # steps after row 0's EOS
    assert gone and all(torch.isnan(s.logprobs[0]) and bool((s.top_ids[0] == -1).all()) for s in gone)
    assert all(torch.isfinite(s.logprobs[1]) for s in steps)
    with pytest.raises(ValueError, match="logprobs"):
        model.stream(None, ids, max_new_tokens=2, logprobs=-1)
    with pytest.raises(ValueError, match="logprobs_mode"):
        model.stream(None, ids, max_new_tokens=2, logprobs=1, logprobs_mode="softmax")


# --------------------------------------------------------------------------- right padding (transformers 5)
def right_padded(vocab: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [prompts(1, n, seed=40 + n, vocab=vocab)[0] for n in (7, 3, 5)]
    ids = torch.full((3, 7), vocab - 1, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(num_beams=3), dict(do_sample=True, top_k=30), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)],
    ids=["greedy", "beams", "sampling", "penalties"],
)
def test_right_padded_batch_matches_transformers_5(lively: Any, kw: dict[str, Any]) -> None:
    """transformers 5 gives padding position 0 and continues new tokens from the last prompt
    position (so a right-padded row's first new token sits at position 1); so does minigpt2."""
    model, hf = lively
    ids, mask = right_padded()
    assert_same(*both(model, hf, ids, mask, seed=12, max_new_tokens=8, **kw))


# --------------------------------------------------------------------------- edge values, as transformers
def outcome(fn: Any) -> Any:
    """The result of fn(), or the exception type it raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)


@pytest.mark.filterwarnings("ignore:.*(max_length|Unfeasible length constraints).*:UserWarning")  # transformers' own
@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=0),
        dict(max_new_tokens=-2),
        dict(max_new_tokens=None, max_length=9),
        dict(max_length=9),
        dict(max_length=5),  # = prompt length: nothing left
        dict(max_length=3),
        dict(),  # nothing set: 20 new tokens
        dict(num_beams=2, num_return_sequences=3),
        dict(num_return_sequences=2),  # greedy rows would be equal
        dict(max_new_tokens=4, min_new_tokens=8),
        dict(max_new_tokens=4, min_length=30),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "nothing",
)
def test_edge_values_do_what_transformers_does(lively: Any, kw: dict[str, Any]) -> None:
    """Where transformers raises, minigpt2 raises a ValueError; where it returns, the same tokens."""
    model, hf = lively
    ids = prompts(2, 5, seed=31)
    ours = outcome(lambda: model.generate(ids, **kw))
    theirs = outcome(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), **kw))
    if isinstance(theirs, type):
        assert theirs is ValueError and ours is ValueError, (ours, theirs)
    else:
        assert not isinstance(ours, type), ours
        assert_same(ours, theirs)


@pytest.mark.filterwarnings("ignore:.*max_length.*:UserWarning")  # transformers' advice to set max_new_tokens
def test_default_length_stays_within_the_position_table(lively: Any) -> None:
    """No max_new_tokens / max_length: 20 new tokens, cut at n_positions (128 here), as there."""
    model, hf = lively
    ids = prompts(1, 120, seed=32)
    ours = model.generate(ids, eos_token_id=None)
    assert ours.shape == (1, 128)
    hf.generation_config.eos_token_id = None
    try:
        assert_same(ours, hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0))
    finally:
        hf.generation_config.eos_token_id = 999


def test_no_prompt_starts_from_bos(lively: Any) -> None:
    model, hf = lively
    assert_same(model.generate(max_new_tokens=6), hf.generate(max_new_tokens=6))
    for empty in ([], [[]], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="empty"):
            model.generate(empty, max_new_tokens=3)


# --------------------------------------------------------------------------- the checkpoint's generation config
def write_generation_config(d: Path, **fields: Any) -> None:
    import json

    data = json.loads((d / "generation_config.json").read_text())
    data.update(fields)
    (d / "generation_config.json").write_text(json.dumps(data))


def test_generation_config_json_sets_the_defaults(make_checkpoint: Any, tmp_path: Path) -> None:
    """A fine-tune that ships do_sample / top_p / max_new_tokens generates with them, as in transformers."""
    import shutil

    import transformers

    src, _ = make_checkpoint(**LIVELY)
    d = tmp_path / "ft"
    shutil.copytree(src, d)
    write_generation_config(d, do_sample=True, top_p=0.7, top_k=0, temperature=1.3, max_new_tokens=9,
                            repetition_penalty=1.2)
    model = GPT2.from_pretrained(d)
    hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    gc = model.generation_config
    assert isinstance(gc, minigpt2.GenerationConfig) and gc.do_sample is True and gc.top_p == 0.7
    ids = prompts(2, 5, seed=33)
    assert_same(*both(model, hf, ids, seed=2))  # no arguments: the file's settings
    out = model.generate(ids)
    assert out.shape[1] == 5 + 9 or out.shape[1] < 5 + 9  # max_new_tokens from the file
    assert_same(*both(model, hf, ids, seed=2, do_sample=False))  # an argument overrides the file
    assert_same(*both(model, hf, ids, seed=2, top_k=None, top_p=None))  # None turns a warper off
    # generate(generation_config=...): its unset fields still come from the checkpoint
    cfg = minigpt2.GenerationConfig(temperature=0.5, max_new_tokens=4)
    torch.manual_seed(3)
    ours = model.generate(ids, generation_config=cfg)
    torch.manual_seed(3)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids),
                         generation_config=transformers.GenerationConfig(temperature=0.5, max_new_tokens=4))
    assert_same(ours, theirs)


def test_generation_config_from_an_old_style_config_json(make_checkpoint: Any, tmp_path: Path) -> None:
    """No generation_config.json: generation keys of config.json are the defaults (transformers'
    from_model_config), task_specific_params are not."""
    import json
    import shutil

    import transformers

    src, _ = make_checkpoint(**LIVELY)
    d = tmp_path / "old"
    shutil.copytree(src, d)
    (d / "generation_config.json").unlink()
    config = json.loads((d / "config.json").read_text())
    config.update(do_sample=True, top_k=7, max_length=11, task_specific_params={"text-generation": {"max_length": 50}})
    (d / "config.json").write_text(json.dumps(config))
    model = GPT2.from_pretrained(d)
    hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    assert model.generation_config.top_k == 7 and model.generation_config.max_length == 11
    assert model.generation_config.eos_token_id == 999
    assert_same(*both(model, hf, prompts(2, 4, seed=34), seed=5))


def test_edited_generation_config_is_saved_and_read_back(lively: Any, tmp_path: Path) -> None:
    import json

    import transformers

    model, _ = lively
    model = GPT2.from_pretrained(model.name_or_path)
    model.generation_config.do_sample = True
    model.generation_config.min_p = 0.05
    model.generation_config.bad_words_ids = [[3, 4]]
    model.generation_config.sequence_bias = {(5,): -2.0}
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert saved["do_sample"] is True and saved["min_p"] == 0.05 and saved["sequence_bias"] == [[[5], -2.0]]
    back = GPT2.from_pretrained(tmp_path / "out")
    assert back.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert hf.generation_config.do_sample is True and hf.generation_config.min_p == 0.05
    assert_same(*both(back, hf, prompts(2, 4, seed=35), seed=9, max_new_tokens=8))
    # A value generate would refuse is not saved (before any file is written).
    back.generation_config.top_k = -1
    with pytest.raises(ValueError, match="top_k"):
        back.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_generation_config_rejects_unknown_and_unsupported(lively: Any) -> None:
    model, _ = lively
    ids = prompts(1, 4)
    with pytest.raises(ValueError, match="top_kk"):
        model.generate(ids, max_new_tokens=2, top_kk=3)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.generate(ids, max_new_tokens=2, guidance_scale=1.5)
    assert model.generate(ids, max_new_tokens=2, use_cache=False, guidance_scale=1.0).shape == (1, 6)  # no-ops


@pytest.mark.parametrize("strategy", [dict(), dict(do_sample=True), dict(num_beams=3, num_return_sequences=2),
                                      dict(num_beams=2, do_sample=True)], ids=["greedy", "sampling", "beams", "beam-sampling"])
def test_everything_at_once_on_a_left_padded_batch(lively: Any, strategy: dict[str, Any]) -> None:
    """Every processor and warper together, mixed with the existing ones, padding included."""
    model, hf = lively
    ids, mask, _ = left_padded()
    free = greedy_path(model, ids, 6)
    kw = dict(
        max_new_tokens=10, eos_token_id=free[2][3], min_length=9, repetition_penalty=1.2, no_repeat_ngram_size=3,
        bad_words_ids=[[free[0][1]], [free[1][0], free[1][1]]], sequence_bias={(free[2][0],): -3.0, (7, 8): 2.0},
        suppress_tokens=[free[0][4]], begin_suppress_tokens=[free[1][0]], exponential_decay_length_penalty=(4, 1.2),
        encoder_repetition_penalty=1.1, temperature=0.9, top_k=200, top_p=0.95, min_p=0.01, typical_p=0.99,
        epsilon_cutoff=1e-4, eta_cutoff=1e-4, renormalize_logits=True, **strategy,
    )  # fmt: skip
    assert_same(*both(model, hf, ids, mask, seed=13, **kw))


def test_inputs_is_transformers_name_for_the_prompt(lively: Any) -> None:
    model, _ = lively
    ids = prompts(1, 5)
    assert torch.equal(model.generate(inputs=ids, max_new_tokens=3), model.generate(ids, max_new_tokens=3))
    with pytest.raises(ValueError, match="once"):
        model.generate(ids, inputs=ids, max_new_tokens=3)


def test_every_setting_accepts_an_explicit_none(tiny: Any) -> None:
    """None means "not set" for every GenerationConfig field, as in transformers: no crash."""
    model, _ = tiny
    ids = prompts(2, 4)
    for name in minigpt2.GenerationConfig.fields():
        out = model.generate(ids, **{"max_new_tokens": 3, name: None})
        assert out.shape[0] == 2 and out.shape[1] > 4, name
    for name in ("max_new_tokens", "max_length"):
        assert model.generate(ids, max_new_tokens=None, max_length=None).shape[1] <= 4 + 20, name


def test_generation_config_from_pretrained(make_checkpoint: Any, tmp_path: Path) -> None:
    d, hf = make_checkpoint(**LIVELY)
    gc = minigpt2.GenerationConfig.from_pretrained(d)
    assert gc == GPT2.from_pretrained(d).generation_config and gc.eos_token_id == hf.generation_config.eos_token_id
    with pytest.raises(FileNotFoundError, match="generation_config.json"):
        minigpt2.GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json"):
        minigpt2.GenerationConfig.from_pretrained(tmp_path)


def test_generation_config_from_a_hub_repo(make_checkpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the Hub, generation_config.json is fetched beside config.json (a stand-in for
    huggingface_hub serves a local snapshot); a repo without one derives it from config.json."""
    import json
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    src, _ = make_checkpoint(**LIVELY)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(src, snapshot)
    data = json.loads((snapshot / "generation_config.json").read_text())
    (snapshot / "generation_config.json").write_text(json.dumps({**data, "do_sample": True, "top_k": 3}))
    asked: list[str] = []

    def fake_download(repo_id: str, filename: str, **kw: Any) -> str:
        asked.append(filename)
        if not (snapshot / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the decision to go online is not what is tested here
    model = GPT2.from_pretrained("someone/ft")
    assert "generation_config.json" in asked and model.generation_config.top_k == 3
    assert minigpt2.GenerationConfig.from_pretrained("someone/ft").do_sample is True
    (snapshot / "generation_config.json").unlink()
    assert GPT2.from_pretrained("someone/ft").generation_config.eos_token_id == 999  # derived from config.json


# --------------------------------------------------------------------------- no token left
def test_an_infinite_sequence_bias_is_refused_up_front(tiny: Any) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="sequence_bias value"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=True, sequence_bias={(5,): float("inf")})


@pytest.mark.parametrize("mode", [dict(do_sample=True), dict(do_sample=False), dict(do_sample=True, num_beams=2),
                                  dict(do_sample=False, num_beams=2),
                                  dict(do_sample=False, prompt_lookup_num_tokens=2),
                                  dict(do_sample=False, assistant_early_exit=1, assistant_confidence_threshold=0.0),
                                  dict(do_sample=True, prompt_lookup_num_tokens=2)])  # fmt: skip
def test_a_row_with_every_token_removed_is_a_clear_value_error(tiny: Any, mode: dict[str, Any]) -> None:
    # which tokens survive depends on the step, so no up-front check can see this: the draw reports it
    model, _ = tiny
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match="every token was removed from row 0"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, suppress_tokens=list(range(vocab)), **mode)
    # the same set of tokens minus one leaves that one to pick, every step
    out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, suppress_tokens=list(range(1, vocab)), **mode)
    assert out[0, 2:].tolist() == [0, 0]


def test_bad_prompt_and_settings_errors_name_the_element(tiny: Any) -> None:
    model, _ = tiny
    tok = Tokenizer()
    with pytest.raises(ValueError, match=r"input_ids\[0\] is 'Hi' \(type str\)"):
        list(model.stream(tok, ["Hi", "The meaning"], max_new_tokens=2))
    with pytest.raises(ValueError, match=r"input_ids\[1\]\[0\] is 2.5"):
        model.generate([[1, 2], [2.5, 3]], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"temperature must be a finite number in \[0.0, inf\], got nan"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=1, do_sample=True, temperature=float("nan"))


@pytest.mark.parametrize("name, act", [("output_attentions", "attn.pattern"), ("output_hidden_states", "resid_post")])
def test_output_attentions_points_to_run_with_cache(tiny: Any, name: str, act: str) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match=rf"{name}=True is not a generate option in minigpt2.*run_with_cache") as e:
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=1, return_dict_in_generate=True, **{name: True})
    assert act in str(e.value) and "transformers moved" not in str(e.value)
