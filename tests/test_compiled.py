"""The opt-in compiled decode step (compiled.py): token-exact with transformers, logits within
the parity tolerance, compiled once per signature, out of the way of hooks and gradients.

One small model, compiled once for the module (inductor takes ~10-20 s on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from minigpt2 import GPT2, compiled, fast, kernels

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own internals


@pytest.fixture(scope="module")
def compiled_pair(make_checkpoint):
    directory, hf = make_checkpoint(seed=41)
    model = GPT2.from_pretrained(directory, device="cpu", compile=True)
    return model, hf, directory


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(seed))


def test_compiled_generation_is_token_exact(compiled_pair) -> None:
    model, hf, _ = compiled_pair
    ids = _ids(2, 6, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: the step's attention takes the padding mask
    ids = ids.masked_fill(mask == 0, 999)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=999)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, **kw)
    got = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    seconds = compiled.compile_seconds(model)
    assert seconds and all(s > 0 for s in seconds.values())
    assert "batch 2, padded" in seconds
    # A second generation of another length reuses the compiled step (dynamic shapes).
    model.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=999)
    assert compiled.compile_seconds(model) == seconds


def test_compiled_step_logits_within_tolerance(compiled_pair) -> None:
    model, hf, _ = compiled_pair
    ids = _ids(2, 10, seed=2)
    with torch.no_grad():
        want = hf(ids).logits[:, -1]
    cache = model.make_cache(2, 10)
    with torch.inference_mode():
        dec = fast.decoder(model, 2)
        assert isinstance(dec, compiled.CompiledDecoder)
        dec(ids[:, :7], torch.arange(7)[None], None, cache)
        for t in range(7, 10):
            got = dec(ids[:, t : t + 1], torch.tensor([[t]]), None, cache)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_compiled_step_sees_weight_edits_and_steps_aside_for_hooks(make_checkpoint) -> None:
    directory, _ = make_checkpoint(seed=41)
    model = GPT2.from_pretrained(directory, device="cpu").compile_decoding()
    ids = _ids(1, 5, seed=3)
    model.generate(ids, max_new_tokens=3)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
        want = GPT2.from_pretrained(directory, device="cpu")
        want.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    assert torch.equal(model.generate(ids, max_new_tokens=6), want.generate(ids, max_new_tokens=6))
    seen = []
    with model.hooks({"h.1.mlp.act": lambda a, n: seen.append(n)}):
        model.generate(ids, max_new_tokens=3)
    assert len(seen) == 3  # prefill and two steps through the plain model
    model.compile_decoding(False)
    assert compiled.compile_seconds(model) == {}


@pytest.mark.skipif(not kernels.available("mkldnn", torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_compiled_bf16_step_matches_the_eager_decoder(make_checkpoint) -> None:
    """bf16 on oneDNN, where the decoder's c_fc carries the GELU: the compiled step calls the
    decoder's own products, so its logits stay with the eager step's."""
    directory, _ = make_checkpoint(seed=41)
    eager = GPT2.from_pretrained(directory, device="cpu", dtype=torch.bfloat16)
    model = GPT2.from_pretrained(directory, device="cpu", dtype=torch.bfloat16, compile=True)
    ids = _ids(1, 6, seed=12)
    kw = dict(max_new_tokens=6, min_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    with kernels.force("mkldnn"):
        want, got = eager.generate(ids, **kw), model.generate(ids, **kw)
    assert compiled.compile_seconds(model)
    # the step is one graph (the eager decoder's native C attention and GELU cannot be traced: a
    # break inside the layer loop made 13 graphs and sent the step back to eager)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    differ = (got.sequences != want.sequences)[0, 6:].nonzero()
    n = int(differ[0]) if len(differ) else 6
    for a, b in zip(got.logits[: n + 1], want.logits[: n + 1]):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_compile_flag_is_checked(make_checkpoint) -> None:
    directory, _ = make_checkpoint(seed=41)
    with pytest.raises(ValueError, match="compile must be True or False"):
        GPT2.from_pretrained(directory, device="cpu", compile="yes")


# ------------------------------------------------------------------ the CUDA-graph step
# GraphStep (a static cache read in full under a mask, the write position as a tensor) is what
# CUDA graphs replay. Its arithmetic and bookkeeping are device-independent, so the tests below
# run it on the CPU too (inductor without graphs), by routing the model to it; the CUDA tests
# at the end add the graphs themselves.
@pytest.fixture(scope="module")
def graph_pair(make_checkpoint):
    directory, hf = make_checkpoint(seed=43, n_positions=300)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "uses_graphs", lambda model: True)
        model = GPT2.from_pretrained(directory, device="cpu", compile=True)
        yield model, hf


def test_static_length_buckets() -> None:
    assert [compiled.static_length(n, 1024) for n in (1, 128, 129, 300, 513, 1024)] == [128, 128, 256, 512, 1024, 1024]
    assert compiled.static_length(200, 300) == 256 and compiled.static_length(290, 300) == 300


def test_graph_step_is_token_exact_padded_and_not(graph_pair) -> None:
    model, hf = graph_pair
    ids = _ids(2, 7, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 999)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=999, output_logits=True,
              return_dict_in_generate=True)  # fmt: skip
    for m in (mask, None):
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids) if m is None else m, **kw)
        got = model.generate(ids, attention_mask=m, **kw)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    seconds = compiled.compile_seconds(model)
    assert {"batch 2, length 128, padded", "batch 2, length 128, no padding"} <= set(seconds)


def test_graph_step_cache_is_static_pooled_and_zeroed(graph_pair) -> None:
    model, _ = graph_pair
    cache = model.make_cache(2, 40)
    assert cache.static and cache.max_len == 128 and not cache.kv.any()
    buffer = cache.kv.data_ptr()
    cache.kv.fill_(float("nan"))  # whatever a sequence left behind, the next checkout starts from zeros
    other = model.make_cache(2, 40)  # the first is alive: a buffer of its own
    assert other.kv.data_ptr() != buffer
    del cache, other
    again = model.make_cache(2, 100)  # the same bucket: a pooled buffer, zeroed
    assert not again.kv.isnan().any() and not again.kv.any()
    assert model.make_cache(2, 200).max_len == 256
    with pytest.raises(ValueError, match="exceeds n_positions=300"):
        model.make_cache(2, 301)


def test_graph_step_ends_rows_as_transformers(graph_pair) -> None:
    """Rows ending on EOS at different steps, the length limit, seeded sampling and the greedy
    no-token error, through the graph step."""
    model, hf = graph_pair
    ids = _ids(3, 5, seed=11)
    first = model.generate(ids, max_new_tokens=8, min_new_tokens=8)[:, 5:]
    eos = int(first[0, 2])  # row 0 ends by its third token; the others when (if) they meet it
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=50)):
        kw.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
        torch.manual_seed(5)
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        torch.manual_seed(5)
        assert torch.equal(model.generate(ids, **kw), want)
    steps = list(model.stream(None, ids[:1], max_new_tokens=16, eos_token_id=eos))
    assert len(steps) == first[0].tolist().index(eos) + 1 and bool(steps[-1].finished[0])
    with pytest.raises(ValueError, match="no token"):
        model.generate(ids, max_new_tokens=4, suppress_tokens=list(range(1000)))


def test_graph_step_reads_replaced_parameters_and_serves_the_engine(make_checkpoint, monkeypatch) -> None:
    """A parameter replaced after the first generation (not edited in place) is what the next
    steps read; the serve engine's slot memory runs the plain model (no GraphDecoder there);
    make_cache checks its sizes on the graph path too."""
    from minigpt2.serve.model_runner import ModelRunner

    monkeypatch.setattr(compiled, "uses_graphs", lambda model: True)
    directory, _ = make_checkpoint(seed=43, n_positions=300)
    model = GPT2.from_pretrained(directory, device="cpu", compile=True)
    plain = GPT2.from_pretrained(directory, device="cpu")
    ids = _ids(1, 5, seed=13)
    kw = dict(max_new_tokens=6, min_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    model.generate(ids, **kw)
    for m in (model, plain):
        g = torch.Generator().manual_seed(0)
        for b in m.transformer.h:
            b.ln_2.weight = torch.nn.Parameter(torch.randn(b.ln_2.weight.shape, generator=g))
        m.transformer.ln_f.bias = torch.nn.Parameter(torch.randn(m.transformer.ln_f.bias.shape, generator=g))
    got, want = model.generate(ids, **kw), plain.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    runner = ModelRunner(model, 2)
    logits, hidden = runner.prefill(0, [1, 2, 3], all_positions=True)
    assert hidden.shape == (3, model.config.n_embd) and logits.shape == (1, model.config.vocab_size)
    for bad in ((1, 0), (0, 10), (1, -3)):
        with pytest.raises(ValueError, match="must be positive"):
            model.make_cache(*bad)


def test_graph_step_interleaved_streams_keep_their_own_caches(graph_pair) -> None:
    model, _ = graph_pair
    a, b = _ids(1, 5, seed=6), _ids(1, 9, seed=7)
    want_a = model.generate(a, max_new_tokens=10, min_new_tokens=10)[0, 5:].tolist()
    want_b = model.generate(b, max_new_tokens=10, min_new_tokens=10)[0, 9:].tolist()
    sa = model.stream(None, a, max_new_tokens=10, min_new_tokens=10)
    sb = model.stream(None, b, max_new_tokens=10, min_new_tokens=10)
    got_a, got_b = [], []
    for ta, tb in zip(sa, sb):  # both generators alive, steps alternating
        got_a.append(int(ta.tokens[0]))
        got_b.append(int(tb.tokens[0]))
    assert (got_a, got_b) == (want_a, want_b)


def test_graph_step_beams_assistants_and_hooks(graph_pair, make_checkpoint) -> None:
    model, hf = graph_pair
    ids = _ids(1, 6, seed=8)
    ones = torch.ones_like(ids)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=ones, num_beams=3, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(model.generate(ids, num_beams=3, max_new_tokens=8, min_new_tokens=8, pad_token_id=0), want)
    plain = model.generate(ids, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(model.generate(ids, max_new_tokens=12, min_new_tokens=12, prompt_lookup_num_tokens=3), plain)
    seen = []
    with model.hooks({"h.1.mlp.act": lambda a, n: seen.append(n)}):
        assert torch.equal(model.generate(ids, max_new_tokens=12, min_new_tokens=12), plain)
    assert len(seen) == 12  # every step through the plain model, into the same static cache


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graph_step_is_token_exact_and_replays(make_checkpoint) -> None:
    """On CUDA, compile=True records CUDA graphs (none skipped), greedy tokens equal
    transformers' on the GPU, every step's logits (kept across later replays) are within the
    parity tolerance, and a second call of the same shape replays without compiling."""
    import transformers
    from torch._dynamo.utils import counters

    directory, _ = make_checkpoint(seed=41)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).cuda().eval()
    model = GPT2.from_pretrained(directory, device="cuda", compile=True)
    skips = counters["inductor"]["cudagraph_skips"]
    ids = _ids(2, 6, seed=4).cuda()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 999)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=999, output_logits=True,
              return_dict_in_generate=True)  # fmt: skip
    first = None
    for m in (mask, None):
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids) if m is None else m, **kw)
        got = model.generate(ids, attention_mask=m, **kw)
        first = got.sequences if first is None else first
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits):  # a graph's output is overwritten by its next replay
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert counters["inductor"]["cudagraph_skips"] == skips, "CUDA graphs were skipped"
    seconds = compiled.compile_seconds(model)
    assert {"batch 2, length 128, padded", "batch 2, length 128, no padding"} <= set(seconds)
    cache = model.make_cache(2, 22)
    assert cache.static and cache.max_len == 128
    del cache
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        assert torch.equal(model.generate(ids, attention_mask=mask, **kw).sequences, first)
    launches = [e for e in prof.events() if "GraphLaunch" in e.name]  # the CUDA runtime call replaying a graph
    assert len(launches) >= 15  # the 15 one-token steps replayed as graphs
    assert compiled.compile_seconds(model) == seconds


@cuda
def test_cuda_graph_step_with_hooks_beams_and_bf16(make_checkpoint) -> None:
    import transformers

    directory, _ = make_checkpoint(seed=41)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).cuda().eval()
    model = GPT2.from_pretrained(directory, device="cuda", compile=True)
    ids = _ids(1, 6, seed=9).cuda()
    ones = torch.ones_like(ids)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=ones, num_beams=3, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(model.generate(ids, num_beams=3, max_new_tokens=8, min_new_tokens=8, pad_token_id=0), want)
    plain = model.generate(ids, max_new_tokens=12, min_new_tokens=12)
    seen = []
    with model.hooks({"h.1.mlp.act": lambda a, n: seen.append(n)}):
        assert torch.equal(model.generate(ids, max_new_tokens=12, min_new_tokens=12), plain)
    assert len(seen) == 12
    # bf16: inductor keeps a fused kernel's intermediates in fp32 where eager rounds each op to
    # bf16, so tokens may part at a near-tie; every step up to the first such token (same
    # prefix on both sides) agrees within bf16's tolerance.
    half = GPT2.from_pretrained(directory, device="cuda", dtype=torch.bfloat16)
    kw = dict(max_new_tokens=12, min_new_tokens=12, output_logits=True, return_dict_in_generate=True)
    eager = half.generate(ids, **kw)
    half.compile_decoding()
    graph = half.generate(ids, **kw)
    differ = (graph.sequences != eager.sequences)[0, 6:].nonzero()
    n = int(differ[0]) if len(differ) else 12
    for a, b in zip(graph.logits[: n + 1], eager.logits[: n + 1]):
        assert (a - b).abs().max() <= 3e-2 * b.abs().max()
    assert compiled.compile_seconds(half)
