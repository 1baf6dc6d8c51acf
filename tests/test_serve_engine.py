"""The serve engine in-process: batch invariance against ``model.generate`` alone, the
processors, log-probs, stop strings, the detokenizer, the scheduler, faults, aborts, calls
and shutdown. (The HTTP layer: test_serve_api.py; load and signals: test_serve_load.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt2 import GPT2, Tokenizer, sampling
from minigpt2.generation import stream
from minigpt2.serve import (
    Engine, EngineClosed, ErrorOutput, PromptOutput, QueueFull, RequestError, SamplingParams, TokenOutput,
)  # fmt: skip
from minigpt2.serve import detokenizer, processors
from minigpt2.serve.model_runner import ModelRunner
from minigpt2.serve.scheduler import Scheduler
from minigpt2.serve.sequence import Request


@pytest.fixture(scope="module")
def model(gpt2_tiny_vocab_checkpoint: tuple[Path, Any]) -> GPT2:
    return GPT2.from_pretrained(gpt2_tiny_vocab_checkpoint[0], device="cpu")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def engine(model: GPT2, tok: Tokenizer) -> Any:
    with Engine(model, tok, max_batch_size=4, max_queue=64) as e:
        yield e


class Collect:
    """A request's ``emit``: every output, in order (called on the engine thread)."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def __call__(self, outputs: list[Any]) -> None:
        self.outputs.extend(outputs)

    def tokens(self, index: int = 0) -> list[int]:
        return [o.token_id for o in self.outputs if isinstance(o, TokenOutput) and o.index == index and o.token_id is not None]

    def of(self, index: int = 0) -> list[TokenOutput]:
        return [o for o in self.outputs if isinstance(o, TokenOutput) and o.index == index]

    def text(self, index: int = 0) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, (TokenOutput, PromptOutput)) and o.index == index)

    def finish(self, index: int = 0) -> str | None:
        return self.of(index)[-1].finish_reason


def wait(request: Request, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not request.done:
        assert time.monotonic() < deadline, "the request did not finish"
        time.sleep(0.005)


def submit(engine: Engine, prompt: list[int], **params: Any) -> tuple[Request, Collect]:
    best_of = params.pop("best_of", 1)
    c = Collect()
    return engine.submit([prompt], SamplingParams(**params), c, best_of=best_of), c


def reference(model: GPT2, prompt: list[int], p: dict[str, Any], seed_offset: int = 0) -> list[int]:
    """What ``model.generate`` of the prompt alone makes under the same settings."""
    kw: dict[str, Any] = dict(max_new_tokens=p["max_tokens"], repetition_penalty=p.get("repetition_penalty", 1.0),
                              min_new_tokens=p.get("min_tokens", 0))  # fmt: skip
    if p.get("ignore_eos"):
        kw["eos_token_id"] = None
    if p.get("temperature", 1.0) > 0:
        gen = torch.Generator().manual_seed(p["seed"] + seed_offset)
        kw.update(do_sample=True, temperature=p.get("temperature", 1.0), top_k=p.get("top_k", 0),
                  top_p=p.get("top_p", 1.0), min_p=p.get("min_p"), generator=gen)  # fmt: skip
    out = model.generate(torch.tensor([prompt]), **kw)
    return out[0, len(prompt) :].tolist()


# --------------------------------------------------------------------------- batch invariance
def test_concurrent_requests_each_equal_generate_alone(model: GPT2, engine: Engine) -> None:
    """More requests than slots, prompts of different lengths, greedy and seeded sampling with
    every processor generate has: each request's tokens are generate's for its prompt alone."""
    g = torch.Generator().manual_seed(0)
    settings = [
        dict(max_tokens=12, temperature=0.0),
        dict(max_tokens=20, temperature=0.8, seed=1, top_p=0.9),
        dict(max_tokens=7, temperature=1.3, seed=2, top_k=40),
        dict(max_tokens=16, temperature=0.0, repetition_penalty=1.3),
        dict(max_tokens=9, temperature=1.0, seed=3, min_tokens=5, repetition_penalty=0.8),
        dict(max_tokens=25, temperature=0.0, ignore_eos=True),
        dict(max_tokens=10, temperature=1.5, seed=4, min_p=0.05, top_k=100),
    ] * 2
    jobs = []
    for i, p in enumerate(settings):
        prompt = torch.randint(0, model.config.vocab_size, (3 + 5 * i,), generator=g).tolist()
        jobs.append((prompt, p, *submit(engine, prompt, **p)))
    for prompt, p, request, got in jobs:
        wait(request)
        assert got.tokens() == reference(model, prompt, p), p
        n = len(got.tokens())
        assert got.finish() == ("length" if n == p["max_tokens"] and got.tokens()[-1] not in engine.eos_ids else "stop")


def test_best_of_sequences_use_seed_plus_index(model: GPT2, engine: Engine) -> None:
    prompt = [464, 3290, 318]
    p = dict(max_tokens=10, temperature=0.9, seed=11)
    request, got = submit(engine, prompt, best_of=3, **p)
    wait(request)
    for j in range(3):
        assert got.tokens(j) == reference(model, prompt, p, seed_offset=j)
    again, got2 = submit(engine, prompt, best_of=3, **p)
    wait(again)
    assert [got2.tokens(j) for j in range(3)] == [got.tokens(j) for j in range(3)]


def test_batched_decode_rows_match_each_row_alone(model: GPT2) -> None:
    """The slot cache: rows at different positions in one decode step give each row's own
    logits (to fp32 rounding; bit for bit when one row runs alone, as generate does)."""
    runner = ModelRunner(model, 4)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
    for slot, p in enumerate(prompts):
        runner.prefill(slot, p)
    tokens = [100, 200, 300, 400]
    batched = runner.decode(tokens, [len(p) for p in prompts])
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + [tokens[b]]]))[0, -1]
            assert torch.allclose(batched[b], alone, rtol=0, atol=1e-4 * float(alone.abs().max()))
    one = ModelRunner(model, 1)
    logits, _ = one.prefill(0, prompts[1])
    step = one.decode([int(logits.argmax())], [len(prompts[1])])
    ref = model.generate(torch.tensor([prompts[1]]), max_new_tokens=2, eos_token_id=None)[0, -1]
    assert int(step.argmax()) == int(ref)


def test_batch_invariant_decode_is_bit_identical_to_alone(model: GPT2) -> None:
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    runner = ModelRunner(model, 3, batch_invariant=True)
    for slot, p in enumerate(prompts):
        runner.prefill(slot, p)
    batched = runner.decode([100, 200, 300], [len(p) for p in prompts])
    for b, p in enumerate(prompts):
        alone = ModelRunner(model, 1)
        alone.prefill(0, p)
        assert torch.equal(batched[b], alone.decode([[100, 200, 300][b]], [len(p)])[0])


def test_the_plain_path_serves_too(model: GPT2, tok: Tokenizer) -> None:
    """With a hook on the model the fast path steps aside (as on a GPU): the model's own
    forward runs on the slot cache, and requests still equal generate alone."""
    handle = model.transformer.h[0].register_forward_hook(lambda module, args, out: None)
    try:
        with Engine(model, tok, max_batch_size=3) as e:
            assert e.runner._decoder(1) is None
            prompts = [[464, 318, 257], [50, 60, 70, 80, 90], [7]]
            jobs = [submit(e, p, max_tokens=6, temperature=0.0, ignore_eos=True, echo=True, logprobs=1) for p in prompts]
            for p, (request, got) in zip(prompts, jobs):
                wait(request)
                assert got.tokens() == reference(model, p, dict(max_tokens=6, temperature=0.0, ignore_eos=True))
    finally:
        handle.remove()


# --------------------------------------------------------------------------- log-probs, echo
def test_logprobs_are_the_raw_distribution(model: GPT2, engine: Engine) -> None:
    """Whatever the processors, a token's log-prob is log_softmax of the model's logits."""
    prompt = [464, 2068, 7586, 21831]
    request, got = submit(engine, prompt, max_tokens=6, temperature=0.7, top_k=5, seed=0, logprobs=3, ignore_eos=True)
    wait(request)
    new = got.tokens()
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt + new]))[0], dim=-1)  # (T, V)
    for i, o in enumerate(got.of()):
        row = lp[len(prompt) - 1 + i]
        assert o.logprob == pytest.approx(float(row[o.token_id]), abs=1e-4)
        best = torch.topk(row, 3)
        want = {engine.strings.string(t): float(v) for t, v in zip(best.indices.tolist(), best.values.tolist())}
        assert set(want) <= set(o.top_logprobs) and len(o.top_logprobs) <= 4
        assert o.token in o.top_logprobs
        for k, v in want.items():
            assert o.top_logprobs[k] == pytest.approx(v, abs=1e-4)
    # the library's stream(..., logprobs=k) in its default "raw" mode: the same tokens and numbers
    steps = list(stream(model, None, [prompt], max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5,
                        eos_token_id=None, generator=torch.Generator().manual_seed(0), logprobs=3))  # fmt: skip
    assert [st.token for st in steps] == new
    for st, o in zip(steps, got.of()):
        assert o.logprob == pytest.approx(float(st.logprobs[0]), abs=1e-5)
        for t, v in zip(st.top_ids[0].tolist(), st.top_logprobs[0].tolist()):
            assert o.top_logprobs[engine.strings.string(t)] == pytest.approx(v, abs=1e-5)


def test_echo_scores_the_prompt(model: GPT2, tok: Tokenizer, engine: Engine) -> None:
    prompt = tok.encode("The quick brown fox jumps")
    request, got = submit(engine, prompt, max_tokens=0, logprobs=1, echo=True)
    wait(request)
    echo = next(o for o in got.outputs if isinstance(o, PromptOutput))
    assert echo.text == "The quick brown fox jumps"
    assert echo.tokens == [tok.decode([t]) for t in prompt]
    assert echo.text_offset == [0, 3, 9, 15, 19]
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt]))[0], dim=-1)
    assert echo.token_logprobs[0] is None and echo.top_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert echo.token_logprobs[i] == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
        assert len(echo.top_logprobs[i]) in (1, 2)
    assert got.tokens() == [] and got.finish() == "length" and got.text() == echo.text


# --------------------------------------------------------------------------- stop, EOS, bias
def test_stop_string_ends_the_text_before_it(engine: Engine, tok: Tokenizer) -> None:
    prompt = tok.encode("Once upon a time")
    request, free = submit(engine, prompt, max_tokens=30, temperature=0.0, ignore_eos=True)
    wait(request)
    text = free.text()
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    request, got = submit(engine, prompt, max_tokens=30, temperature=0.0, ignore_eos=True, stop=("zzzz", stop))
    wait(request)
    assert got.text() == text[: text.index(stop)]
    assert got.finish() == "stop"
    assert all(stop not in o.text for o in got.of())


def test_logit_bias_min_tokens_and_ignore_eos(engine: Engine) -> None:
    eos = engine.eos_ids[0]
    request, got = submit(engine, [464, 318], max_tokens=10, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=3)
    wait(request)
    assert got.tokens()[:3] != [eos] * 3 and eos not in got.tokens()[:3]
    assert got.tokens()[3:] == [eos] and got.finish() == "stop"
    request, got = submit(engine, [464, 318], max_tokens=5, temperature=0.0, logit_bias=((eos, 100.0),), ignore_eos=True)
    wait(request)
    assert got.tokens() == [eos] * 5 and got.finish() == "length" and got.text() == ""
    request, got = submit(engine, [464, 318], max_tokens=4, temperature=0.5, seed=0, logit_bias=((777, 100.0),))
    wait(request)
    assert got.tokens() == [777] * 4


def test_openai_penalties() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 50, generator=g)
    counts = torch.zeros(50)
    counts[3], counts[7] = 2, 1
    got = processors.presence_frequency_penalty(scores, counts, presence=0.5, frequency=0.25)
    want = scores.clone()
    want[0, 3] -= 2 * 0.25 + 0.5
    want[0, 7] -= 1 * 0.25 + 0.5
    assert torch.equal(got, want)
    biased = processors.logit_bias(scores, torch.tensor([1, 4]), torch.tensor([10.0, -3.0]))
    assert biased[0, 1] == scores[0, 1] + 10 and biased[0, 4] == scores[0, 4] - 3 and biased[0, 0] == scores[0, 0]
    # the library's one-token sequence bias is the same sum
    assert torch.equal(biased, sampling.sequence_bias(torch.zeros(1, 0, dtype=torch.long), scores, [((1,), 10.0), ((4,), -3.0)]))


def test_the_processors_are_the_library_s() -> None:
    """Every field generate also has goes to sampling.Processors under generate's name."""
    before, warpers = processors.library_processors(
        SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.2, min_tokens=3)
    )
    assert before == sampling.Processors(repetition_penalty=1.2, min_new_tokens=3)
    assert warpers == sampling.Processors(do_sample=True, temperature=0.7, top_k=5, top_p=0.8, min_p=0.1)
    assert processors.library_processors(SamplingParams(temperature=0.0))[1] is None
    assert processors.library_processors(SamplingParams(min_p=0.0))[1].min_p is None  # 0 is off


def test_sampling_params_name_the_bad_field() -> None:
    for kw, word in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(max_tokens=-2), "max_tokens"),
                     (dict(min_p=1.5), "min_p"), (dict(stop=("",)), "stop"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                     (dict(logprobs=-1), "logprobs"), (dict(presence_penalty=float("nan")), "presence_penalty")]:  # fmt: skip
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kw)


# --------------------------------------------------------------------------- detokenizer
def test_text_offsets_are_the_tokenizer_s(tok: Tokenizer) -> None:
    text = "naïve café — 😀 über 日本語 end"
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([t]) for t in ids]
    _, want = tok.decode_with_offsets(ids)
    strings = detokenizer.TokenStrings(tok)
    assert strings.prompt(ids) == (text, [strings.string(t) for t in ids], want)
    d = detokenizer.Detokenizer(strings)
    released, offsets = [], []
    for t in ids:
        offsets.append(d.add(t))
        released.append(d.release())
        assert "\ufffd" not in released[-1]  # a split character waits for its last byte
    released.append(d.release(final=True))
    assert "".join(released) == text and offsets == want
    partial = [t for t, p in zip(ids, pieces) if not _valid_utf8(p)]
    assert partial and all(strings.string(t).startswith("bytes:\\x") for t in partial)


def test_streamed_offsets_equal_the_whole_text_s_on_broken_utf8(tok: Tokenizer) -> None:
    """Random ids, many of them single bytes that do not make whole characters: each token's
    offset, given as it arrives, is decode_with_offsets' of the whole completion, after a prompt."""
    g = torch.Generator().manual_seed(0)
    strings = detokenizer.TokenStrings(tok)
    for _ in range(20):
        ids = torch.randint(0, 256, (40,), generator=g).tolist() + torch.randint(0, 50000, (10,), generator=g).tolist()
        ids = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
        text, want = tok.decode_with_offsets(ids)
        d = detokenizer.Detokenizer(strings, offset_start=7)
        got = [d.add(t) for t in ids]
        assert got == [7 + o for o in want]
        assert d.release(final=True) == text and d.chars == 7 + len(text)
    d = detokenizer.Detokenizer(strings, eos_ids=[tok.eos_token_id])  # EOS: no text, the offset of what follows
    a, b = tok.encode("é")[0], tok.encode("x")[0]
    assert [d.add(t) for t in (a, tok.eos_token_id, b)] == [0, 1, 1]


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_detokenizer_holds_back_a_possible_stop(tok: Tokenizer) -> None:
    d = detokenizer.Detokenizer(detokenizer.TokenStrings(tok), stop=("lo w",))
    hello, world = tok.encode("Hello world")
    d.add(hello)
    assert d.release() == "Hel"  # "lo" may be the start of "lo w"
    d.add(world)
    assert d.stopped and d.release(final=True) == ""
    assert d.text == "Hel"


# --------------------------------------------------------------------------- scheduler
def test_scheduler_admits_within_budget_and_keeps_slots_compact() -> None:
    s = Scheduler(max_batch_size=3, max_queue=5, max_prefill_tokens=10)
    req = Request([[1] * 6, [2] * 6, [3] * 2, [4] * 2], SamplingParams(), lambda o: None)
    s.add(req.sequences)
    with pytest.raises(QueueFull):
        s.add(Request([[1], [1]], SamplingParams(), lambda o: None).sequences)
    first = s.schedule()
    assert [q.prompt_ids[0] for q in first] == [1]  # 6 + 6 > 10: one prefill this step
    second = s.schedule()
    assert [q.prompt_ids[0] for q in second] == [2, 3] and [q.slot for q in s.running] == [0, 1, 2]
    assert s.free(s.running[0]) == (2, 0)  # the last moves into the hole
    assert [q.prompt_ids[0] for q in s.running] == [3, 2] and [q.slot for q in s.running] == [0, 1]
    assert s.free(s.running[1]) is None
    assert [q.prompt_ids[0] for q in s.schedule()] == [4]


# --------------------------------------------------------------------------- faults
def test_a_failing_step_fails_only_its_requests(model: GPT2, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine(model, tok, max_batch_size=4) as e:
        real_decode, real_prefill = e.runner.decode, e.runner.prefill
        calls = {"decode": 0}

        def bad_decode(*a: Any) -> Any:
            calls["decode"] += 1
            if calls["decode"] == 2:
                raise RuntimeError("injected decode fault")
            return real_decode(*a)

        monkeypatch.setattr(e.runner, "decode", bad_decode)
        jobs = [submit(e, [464 + i, 318], max_tokens=8, temperature=0.0, ignore_eos=True) for i in range(2)]
        for request, got in jobs:
            wait(request)
            assert isinstance(got.outputs[-1], ErrorOutput) and "injected decode fault" in got.outputs[-1].message
        assert e.num_running == 0 and e.alive

        def bad_prefill(slot: int, prompt: list[int], all_positions: bool = False) -> Any:
            if prompt[0] == 999:
                raise ValueError("injected prefill fault")
            return real_prefill(slot, prompt, all_positions)

        monkeypatch.setattr(e.runner, "prefill", bad_prefill)
        ok, ok_out = submit(e, [464, 318], max_tokens=8, temperature=0.0, ignore_eos=True)
        bad, bad_out = submit(e, [999, 318], max_tokens=8, temperature=0.0, ignore_eos=True)
        wait(ok), wait(bad)
        assert isinstance(bad_out.outputs[-1], ErrorOutput)
        assert len(ok_out.tokens()) == 8 and ok_out.finish() == "length"


def test_abort_frees_the_slot_at_the_next_step(model: GPT2, tok: Tokenizer) -> None:
    with Engine(model, tok, max_batch_size=2) as e:
        request, got = submit(e, [464, 318], max_tokens=200, temperature=0.0, ignore_eos=True)
        deadline = time.monotonic() + 60
        while not got.outputs:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        e.abort(request)
        deadline = time.monotonic() + 10
        while e.num_running:
            assert time.monotonic() < deadline, "the aborted sequence kept its slot"
            time.sleep(0.005)
        assert request.done and len(got.tokens()) < 200


def test_call_runs_on_the_engine_thread(model: GPT2, tok: Tokenizer, engine: Engine) -> None:
    name, same = engine.call(lambda m, t: (threading.current_thread().name, m is model and t is tok)).result(30)
    assert name == "minigpt2-engine" and same
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda m, t: 1 / 0).result(30)
    assert asyncio.run(engine.run(lambda m, t: m.config.n_embd)) == model.config.n_embd


def test_shutdown_ends_running_sequences_with_abort(model: GPT2, tok: Tokenizer) -> None:
    e = Engine(model, tok, max_batch_size=2).start()
    request, got = submit(e, [464, 318], max_tokens=200, temperature=0.0, ignore_eos=True)
    deadline = time.monotonic() + 60
    while not got.outputs:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    e.shutdown()
    assert got.finish() == "abort" and len(got.tokens()) < 200
    with pytest.raises(EngineClosed):
        submit(e, [1], max_tokens=1)
    with pytest.raises(EngineClosed):
        e.call(lambda m, t: None).result(5)


def test_submit_names_what_is_wrong(model: GPT2, tok: Tokenizer) -> None:
    e = Engine(model, tok, max_batch_size=1, max_queue=3)  # not started: sequences stay queued
    n_pos, V = model.config.n_positions, model.config.vocab_size
    with pytest.raises(RequestError, match=rf"of 10 tokens \+ max_tokens={n_pos} exceeds .*n_positions={n_pos}"):
        e.submit([[1] * 10], SamplingParams(max_tokens=n_pos), Collect())
    with pytest.raises(RequestError, match=rf"token id {V}, outside the vocabulary \[0, {V}\)"):
        e.submit([[1, V]], SamplingParams(), Collect())
    with pytest.raises(RequestError, match="logit_bias"):
        e.submit([[1]], SamplingParams(logit_bias=((V + 5, 1.0),)), Collect())
    with pytest.raises(RequestError, match="empty"):
        e.submit([[]], SamplingParams(), Collect())
    e.submit([[1]], SamplingParams(), Collect(), best_of=3)
    with pytest.raises(QueueFull):
        e.submit([[1]], SamplingParams(), Collect())
