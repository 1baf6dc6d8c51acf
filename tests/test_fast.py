"""The inference fast path (kernels.py, fast.py) against the plain model and transformers.

The Decoder (fast.py) must give the plain path's fp32 results bit for bit when it uses the
plain kernel, for every config option, with and without cache and padding. Every candidate
kernel is forced in turn, whatever the host would choose, and must keep fp32 logits within
the parity tolerance and generation token-identical to transformers. Then: the fallbacks
(feature check off, gradients on, hooks, training mode, swapped modules), the rebuild when
a weight changes, the per-host choice and its on-disk cache, and a smoke run of
scripts/bench.py. Tiny configs only; no timing assertions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt2 import GPT2, fast, kernels

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_GENERATE = hasattr(GPT2, "generate")
needs_generate = pytest.mark.skipif(not HAS_GENERATE, reason="generation not merged yet")

KERNELS = [k for k in kernels.KERNELS if kernels.available(k, torch.float32)]
#: What choose() measures for fp32: numpy's BLAS only where the native kernel is missing.
MEASURED = [k for k in KERNELS if not (k == "numpy" and "native" in KERNELS)]


def _no_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the native kernel unavailable (a host without a C compiler)."""
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        monkeypatch.setitem(kernels._available, ("native", dt, "cpu"), False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own decision cache file and no forced kernel from the environment."""
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.ENV_KERNEL, raising=False)
    monkeypatch.setattr(kernels, "_decisions", {})


@pytest.fixture(scope="module")
def pair(make_checkpoint):
    directory, hf = make_checkpoint(seed=7)
    return GPT2.from_pretrained(directory, device="cpu"), hf


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    tol = 1e-4 * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol


def _decoder(model: GPT2, B: int) -> fast.Decoder:
    dec = fast.decoder(model, B)
    assert dec is not None and dec.ready()
    return dec


def _fast_logits(model: GPT2, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of every position through the Decoder, no cache."""
    with torch.no_grad():
        dec = _decoder(model, ids.shape[0])
        positions = torch.arange(ids.shape[1])[None]
        return dec.logits(dec.hidden(ids, positions, None, None, last_only=False))


def _ids(B: int, T: int, seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- every kernel
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("B", [1, 3])
def test_logits_parity_each_kernel(pair, kernel: str, B: int) -> None:
    model, hf = pair
    ids = _ids(B, 9, seed=B)
    with torch.no_grad():
        want = hf(ids).logits
    with kernels.force(kernel):
        got = _fast_logits(model, ids)
        assert fast.kernel_names(model) == {"blocks": kernel, "unembed": kernel, "prefill": "plain"}
    _close(got, want)


CONFIGS = {
    "default": {},
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "relu+n_inner": dict(activation_function="relu", n_inner=96),
    "scaling options": dict(scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False, layer_norm_epsilon=1e-2),
    "reorder_and_upcast": dict(reorder_and_upcast_attn=True),
}


def _steps(model: GPT2, ids: torch.Tensor, mask: torch.Tensor | None, forward) -> list[torch.Tensor]:
    """Prefill 5 tokens, then one at a time: the last position's logits after each call."""
    from minigpt2.generation import _prompt_positions

    B, T = ids.shape
    cache = model.make_cache(B, T)
    out = []
    positions = _prompt_positions(None if mask is None else mask[:, :5], 5, ids.device)
    out.append(forward(ids[:, :5], positions, None if mask is None else mask[:, :5], cache))
    for t in range(5, T):
        m = None if mask is None else mask[:, : t + 1]
        pos = torch.full((B, 1), t) if mask is None else (mask[:, : t + 1].sum(1, keepdim=True) - 1)
        out.append(forward(ids[:, t : t + 1], pos, m, cache))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_decoder_is_bit_identical_to_plain_model(
    make_checkpoint, config: str, padded: bool, dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the plain kernel (and torch's thread count: BLAS libraries split a product's sums
    differently on another number of threads) the Decoder does the model's arithmetic
    exactly: same bits, every step. The exceptions are by design, in bf16: GPT-2's GELU is
    PyTorch's fused tanh GELU (computed in fp32, rounded once) rather than 8 bf16-rounded
    steps, and a one-token step's attention runs in fp32 (fast.one_token_attention); there
    the logits must stay within bf16 noise and pick the same tokens (and a prompt without
    GPT-2's GELU keeps the same bits)."""
    monkeypatch.setenv(fast.ENV_THREADS, "0")
    directory, _ = make_checkpoint(seed=21, **CONFIGS[config])
    model = GPT2.from_pretrained(directory, device="cpu", dtype=dtype)
    ids = _ids(3, 9, seed=4)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        mask[2, :1] = 0

    def plain(i, p, m, cache):
        return model.lm_head(model.transformer(i, m, p, cache)[:, -1]).float()

    with kernels.force("plain"), torch.inference_mode():
        dec = _decoder(model, 3)
        want = _steps(model, ids, mask, plain)
        got = _steps(model, ids, mask, dec)
    if dtype == torch.bfloat16:
        if model.config.activation_function != "gelu_new":
            assert torch.equal(got[0], want[0])
        for g, w in zip(got, want):
            assert (g - w).abs().max() <= 0.05 * w.abs().max()
            assert (g.argmax(-1) == w.argmax(-1)).float().mean() >= 0.66
        return
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_prompt_rows_are_bit_identical_to_plain_model(make_checkpoint, kernel: str, activation: str) -> None:
    """A prompt of more than kernels.ROWS rows runs the model's own addmm in fp32 whatever the
    step kernel, and GPT-2's GELU as its 8-step formula: the same hidden states, bit for bit,
    as the plain model (and so transformers)."""
    directory, _ = make_checkpoint(seed=22, activation_function=activation)
    model = GPT2.from_pretrained(directory, device="cpu")
    ids = _ids(2, 70, seed=5)  # 140 rows
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with kernels.force(kernel), torch.inference_mode():
        dec = _decoder(model, 2)
        assert fast.kernel_names(model)["prefill"] == "plain"
        for m in (None, mask):
            positions = torch.arange(70)[None] if m is None else (m.cumsum(1) - 1).masked_fill(m == 0, 1)
            got = dec.hidden(ids, positions, m, None, last_only=False)  # the unembedding is the step kernel's
            want = model.transformer(ids, m, positions)
            assert torch.equal(got, want)


def _bf16_pair(make_checkpoint) -> tuple[GPT2, GPT2]:
    directory, _ = make_checkpoint(seed=23)
    return GPT2.from_pretrained(directory, device="cpu"), GPT2.from_pretrained(directory, device="cpu", dtype=torch.bfloat16)


def _agree(got: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 against fp32: within bf16 noise, and the same top-1 nearly everywhere."""
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("B, T", [(1, 6), (2, 50)])  # a decode-sized product, and > ROWS rows
def test_upcast_kernel_for_half_precision(make_checkpoint, B: int, T: int) -> None:
    """bf16 weights through their fp32 copy: results of bf16 weights computed in fp32."""
    assert kernels.available("upcast", torch.bfloat16) and not kernels.available("upcast", torch.float32)
    ref_model, model = _bf16_pair(make_checkpoint)
    ids = _ids(B, T, seed=6)
    with kernels.force("upcast"):
        got = _fast_logits(model, ids)
        inner = kernels.default_upcast_inner()  # forced: no fp32 decision is taken
        assert fast.kernel_names(model) == {"blocks": f"upcast:{inner}", "unembed": f"upcast:{inner}", "prefill": "upcast"}
        p = fast._prepared[model]
        assert p.blocks[0].fp32.weight is not None and fast.extra_bytes(model) > 0
    with torch.no_grad():
        _agree(got, ref_model(ids))


def test_half_prompt_without_native_half_is_computed_in_fp32(make_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's AMD host (no AVX512-bf16): torch's bf16 GEMM there is ~50x slower than fp32,
    so a bf16 prompt runs in fp32 (weights converted per call) while steps keep their kernel."""
    ref_model, model = _bf16_pair(make_checkpoint)
    monkeypatch.setattr(kernels, "native_half", lambda dtype: False)
    ids = _ids(2, 50, seed=7)
    monkeypatch.setattr(kernels, "choose", lambda *a, **k: "plain")  # the step kernel: plain bf16
    got = _fast_logits(model, ids)
    assert fast.kernel_names(model) == {"blocks": "plain", "unembed": "plain", "prefill": "upcast"}
    assert fast.extra_bytes(model) == 0  # converted per call, no copy kept
    with torch.no_grad():
        _agree(got, ref_model(ids))
        # The same arithmetic as a bf16 GEMM with fp32 accumulation: each product of the
        # prompt is the fp32 product of the bf16 operands, rounded once.
        c = model.transformer.h[0].attn.c_attn
        x = torch.randn(80, c.nx, generator=torch.Generator().manual_seed(0)).bfloat16()
        rows = fast._prepared[model].rows[0]
        assert torch.equal(rows(x), torch.addmm(c.bias.float(), x.float(), c.weight.float()).bfloat16())


def test_half_prompt_choice_is_measured_where_native(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where half arithmetic is native, the prompt kernel is measured (an emulated bf16 GEMM
    may lose to fp32); without it, upcast is taken unmeasured; fp32 is always plain."""
    model, _ = pair
    mats = [(w.bfloat16(), b.bfloat16()) for w, b in fast._sources(model)[0][:4]]
    seen = []
    monkeypatch.setattr(kernels, "time_passes", lambda fns, xs, rounds: seen.append(set(fns)) or kernels.Sample(
        {"plain": 2.0, "upcast": 1.0}, 1.0))
    monkeypatch.setattr(kernels, "native_half", lambda dtype: True)
    assert kernels.choose_rows("rows test", mats, "plain") == "upcast"
    assert seen == [{"plain", "upcast"}]
    monkeypatch.setattr(kernels, "native_half", lambda dtype: False)
    assert kernels.choose_rows("rows test 2", mats, "plain") == "upcast" and len(seen) == 1
    assert kernels.choose_rows("rows test", fast._sources(model)[0][:4], "mkldnn") == "plain"
    assert kernels.choose_rows("rows test", mats, "upcast") == "upcast"


def test_bf16_fused_gelu_is_closer_to_the_exact_function() -> None:
    """The fast path's bf16 GELU (fused, one rounding) against the 8-step bf16 formula, both
    measured against the formula in float64 on the same bf16 inputs."""
    from minigpt2.model import NewGELUActivation

    x = (torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    exact = NewGELUActivation()(x.double())
    fused = (fast._gelu_tanh(x).double() - exact).abs().mean()
    stepwise = (NewGELUActivation()(x).double() - exact).abs().mean()
    assert fused < stepwise


def test_fp32_gelu_is_gpt2s_formula_bit_for_bit() -> None:
    """fp32: the Decoder's in-place GELU gives NewGELUActivation's bits (transformers' formula,
    8 steps), on the range activations take. PyTorch's fused tanh GELU does not (up to ~1
    float32 eps x |x| apart), which is why fp32 does not use it."""
    from minigpt2.model import NewGELUActivation

    x = torch.cat([torch.randn(500_000, generator=torch.Generator().manual_seed(2)) * s for s in (0.01, 1.0, 4.0, 30.0)])
    formula = NewGELUActivation()(x)
    assert torch.equal(fast.gelu_new_(x.clone()), formula)
    assert torch.equal(fast._gelu_new_by_rows(x.clone().view(-1, 4000)).view(-1), formula)
    fused = fast._gelu_tanh(x)
    assert ((fused - formula).abs() <= 2 * torch.finfo(torch.float32).eps * x.abs()).all()
    assert not torch.equal(fused, formula)


@pytest.mark.parametrize("kernel", KERNELS)
def test_incremental_decode_with_cache(pair, kernel: str) -> None:
    """Prefill then one token at a time through the KV cache, as generation does."""
    model, hf = pair
    ids = _ids(2, 12, seed=3)
    with torch.no_grad():
        want = hf(ids).logits[:, -1]
    cache = model.make_cache(2, 12)
    with kernels.force(kernel), torch.inference_mode():
        dec = _decoder(model, 2)
        dec(ids[:, :8], torch.arange(8)[None], None, cache)
        for t in range(8, 12):
            got = dec(ids[:, t : t + 1], torch.tensor([[t]]), None, cache)
    _close(got, want)


GEN_MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8),
    "penalties": dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


@needs_generate
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", list(GEN_MODES))
def test_generation_token_exact_each_kernel(pair, kernel: str, mode: str) -> None:
    model, hf = pair
    ids = _ids(1, 6, seed=11)
    kw = dict(GEN_MODES[mode], max_new_tokens=12, min_new_tokens=12)
    torch.manual_seed(5)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=999, **kw)
    with kernels.force(kernel):
        torch.manual_seed(5)
        got = model.generate(ids, pad_token_id=999, **kw)
    assert torch.equal(got, want)


@needs_generate
@pytest.mark.parametrize("kernel", KERNELS)
def test_generation_padded_batch_each_kernel(pair, kernel: str) -> None:
    model, hf = pair
    ids = _ids(3, 7, seed=13)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 999)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=999)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, **kw)
    with kernels.force(kernel):
        got = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


@needs_generate
def test_generation_uses_fast_path_by_default(pair) -> None:
    """No flag needed: generate prepares the host's kernels itself."""
    model, _ = pair
    fast.release(model)
    model.generate(_ids(1, 4), max_new_tokens=2)
    assert set(fast.kernel_names(model)) == {"blocks", "unembed", "prefill"}


# --------------------------------------------------------------------- fallbacks
def test_feature_check_off_falls_back_to_plain(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    model, hf = pair
    fast.release(model)
    monkeypatch.setattr(kernels, "_mkldnn_ops_present", lambda dtype: False)
    monkeypatch.setattr(kernels, "_available", {})
    assert not kernels.available("mkldnn", torch.float32)
    ids = _ids(2, 5)
    with kernels.force("mkldnn"), pytest.warns(UserWarning, match="not available"):
        got = _fast_logits(model, ids)
    assert fast.kernel_names(model) == {"blocks": "plain", "unembed": "plain", "prefill": "plain"}
    with torch.no_grad():
        _close(got, hf(ids).logits)


def test_broken_private_op_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose private op fails (changed signature, other build) is caught by the check."""
    monkeypatch.setattr(kernels, "_available", {})

    def broken(*args, **kwargs):
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken, raising=False)
    assert not kernels.available("mkldnn", torch.float32)
    assert kernels.available("plain", torch.float32)


def test_other_devices_and_dtypes_have_plain_only() -> None:
    assert not kernels.available("mkldnn", torch.float16)
    assert not kernels.available("transposed", torch.float32, "meta")
    assert kernels.available("plain", torch.float16, "meta")


def test_plain_path_with_grad_hooks_training_or_swapped_modules(pair) -> None:
    model, _ = pair
    assert fast.decoder(model, 1) is None  # gradients on
    with torch.no_grad():
        assert fast.decoder(model, 1) is not None
        with model.hooks({"h.0.ln_1": lambda a, n: None}):
            assert fast.decoder(model, 1) is None
        handle = model.transformer.h[1].ln_2.register_forward_pre_hook(lambda m, i: None)
        try:
            assert fast.decoder(model, 1) is None
        finally:
            handle.remove()
        model.train()
        try:
            assert fast.decoder(model, 1) is None
        finally:
            model.eval()
        act = model.transformer.h[0].mlp.act
        model.transformer.h[0].mlp.act = torch.nn.Tanh()  # a module the Decoder does not know
        try:
            assert fast.decoder(model, 1) is None
        finally:
            model.transformer.h[0].mlp.act = act
        # Conditions that appear between steps are seen by ready() before the next step.
        dec = fast.decoder(model, 1)
        assert dec.ready()
        with model.hooks({"h.1.mlp.act": lambda a, n: None}):
            assert not dec.ready()
        with torch.enable_grad():
            assert not dec.ready()
        assert dec.ready()


@needs_generate
def test_hooks_installed_while_streaming_are_honoured(pair) -> None:
    """A consumer of model.stream may install hooks between tokens: the next step sees them."""
    model, _ = pair
    seen: list[str] = []
    steps = model.stream(None, _ids(1, 4), max_new_tokens=4, min_new_tokens=4)
    next(steps)
    with model.hooks({"h.0.mlp.act": lambda a, n: seen.append(n)}):
        next(steps)
    assert seen == ["h.0.mlp.act"]
    next(steps)
    assert seen == ["h.0.mlp.act"]


@needs_generate
def test_torch_forward_hooks_take_plain_path(pair) -> None:
    model, _ = pair
    seen: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        with kernels.force(KERNELS[-1]), torch.no_grad():
            assert fast.decoder(model, 1) is None
        model.generate(_ids(1, 3), max_new_tokens=2, min_new_tokens=2)
    finally:
        handle.remove()
    assert seen == [(1, 64), (1, 64)]  # prefill's last position, then one step


@needs_generate
def test_generate_under_hooks_takes_plain_path(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = pair
    seen = []
    monkeypatch.setattr(fast, "prepare", lambda *a, **k: seen.append(1) or pytest.fail("fast path used"))
    with model.hooks({"h.1.mlp.act": lambda a, n: None}):
        model.generate(_ids(1, 4), max_new_tokens=2)
    assert not seen
    monkeypatch.undo()
    handle = model.transformer.wpe.register_forward_hook(lambda m, i, o: seen.append(1))
    try:
        model.generate(_ids(1, 4), max_new_tokens=2)
    finally:
        handle.remove()
    assert seen == [1, 1]  # prefill and one step, both through the module


def test_no_trace_in_state_dict_and_model_copies(pair) -> None:
    model, _ = pair
    keys = list(model.state_dict())
    with kernels.force(KERNELS[-1]):
        _fast_logits(model, _ids(1, 3))
    assert list(model.state_dict()) == keys
    copy.deepcopy(model)  # prepared (opaque) tensors are not attributes of the model


# --------------------------------------------------------------------- rebuilds
@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "plain"])
def test_rebuilt_after_weight_changes(make_checkpoint, kernel: str) -> None:
    directory, hf = make_checkpoint(seed=8)
    model = GPT2.from_pretrained(directory, device="cpu")
    ids = _ids(2, 6)

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return model(ids)

    with kernels.force(kernel):
        _close(_fast_logits(model, ids), plain())
        # 1) in-place edit (what an optimizer step does)
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
            model.transformer.h[0].attn.c_attn.bias.add_(0.2)
            model.transformer.wte.weight[:10].mul_(2.0)  # the tied unembedding too
        _close(_fast_logits(model, ids), plain())
        # 2) load_state_dict of other weights
        other = GPT2.from_pretrained(make_checkpoint(seed=9)[0], device="cpu")
        model.load_state_dict(other.state_dict())
        got = _fast_logits(model, ids)
        with torch.no_grad():
            _close(got, make_checkpoint(seed=9)[1](ids).logits)
        # 3) .to(): new tensors, new addresses
        model.to(torch.bfloat16)
        with kernels.force(kernel if kernels.available(kernel, torch.bfloat16) else "plain"):
            got = _fast_logits(model, ids)
        with torch.no_grad():
            want = model(ids)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
        model.to(torch.float32)
        _close(_fast_logits(model, ids), plain())


@pytest.mark.parametrize("kernel", KERNELS)
def test_decoder_sees_weight_edits_between_steps(make_checkpoint, kernel: str) -> None:
    """An edit between two steps (a stream consumer, a callback) rebuilds the prepared copies."""
    model = GPT2.from_pretrained(make_checkpoint(seed=8)[0], device="cpu")
    ids = _ids(2, 6)
    with kernels.force(kernel), torch.no_grad():
        dec = _decoder(model, 2)
        before = dec(ids, torch.arange(6)[None], None, None)
        model.transformer.h[0].mlp.c_proj.weight.mul_(3.0)
        model.transformer.h[1].attn.c_attn.bias.data = model.transformer.h[1].attn.c_attn.bias.data + 0.5
        assert dec.ready()
        got = dec(ids, torch.arange(6)[None], None, None)
        want = model(ids)[:, -1]
    assert not torch.allclose(before, want)
    _close(got, want)


@needs_generate
def test_generate_checks_once_a_stream_before_every_step(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate() runs no one else's code between steps, so the fast path checks hooks, modes
    and weights at the prompt only; a stream's consumer may change them between tokens, so
    there every step is checked (the hook test above)."""
    model, _ = pair
    calls: list[int] = []
    real = fast._HookWatch.any
    monkeypatch.setattr(fast._HookWatch, "any", lambda self: calls.append(1) or real(self))

    def count(run) -> int:
        calls.clear()
        run()
        return len(calls)

    short = count(lambda: model.generate(_ids(1, 4), max_new_tokens=2, min_new_tokens=2))
    long = count(lambda: model.generate(_ids(1, 4), max_new_tokens=7, min_new_tokens=7))
    assert short == long > 0
    streamed = count(lambda: list(model.stream(None, _ids(1, 4), max_new_tokens=7, min_new_tokens=7)))
    assert streamed >= long + 6
    with torch.no_grad():  # the first answer stands: a hook added later is not looked for
        dec = _decoder(model, 1)
        dec.check_each_step = False
        with model.hooks({"h.1.mlp.act": lambda a, n: None}):
            assert dec.ready()
            dec.check_each_step = True
            assert not dec.ready()


def _on_fast_and_plain_paths(directory: Path, run) -> dict[str, torch.Tensor]:
    """run(model) on a fresh model from ``directory`` twice: on the fast path (native forced)
    and on the plain path (a no-op hook keeps it there)."""
    runs = {}
    for path in ("fast", "plain"):
        model = GPT2.from_pretrained(directory, device="cpu")
        hooks = model.hooks({"h.0.ln_1": lambda a, n: None}) if path == "plain" else contextlib.nullcontext()
        with hooks, kernels.force("native"):
            runs[path] = run(model)
    return runs


def _new_layer_norm_storage(model: GPT2) -> None:
    ln = model.transformer.h[0].ln_1
    ln.weight.data = ln.weight.data * 2.0  # new storage: read in place, so only its address tells


def _new_position_storage(model: GPT2) -> None:
    wpe = model.transformer.wpe
    wpe.weight.data = wpe.weight.data * torch.linspace(-3.0, 3.0, wpe.weight.shape[1])


@needs_generate
@pytest.mark.parametrize("edit", [_new_layer_norm_storage, _new_position_storage])
def test_a_stream_sees_new_storage_for_tensors_read_in_place(make_checkpoint, edit) -> None:
    """`p.data = ...` between two tokens of a stream on a layer norm or an embedding (tensors
    the fast path reads in place, not through copies): the next step runs the edited model, as
    the plain path does (a no-op hook keeps the reference run on it)."""
    directory = make_checkpoint(seed=10)[0]

    def run(model: GPT2) -> torch.Tensor:
        steps = model.stream(None, _ids(1, 4), max_new_tokens=6, min_new_tokens=6, logprobs=3)
        got = [next(steps), next(steps)]
        edit(model)
        got += list(steps)
        return torch.tensor([list(st.top_logprobs[0]) for st in got])

    runs = _on_fast_and_plain_paths(directory, run)
    _close(runs["fast"], runs["plain"])
    unedited = GPT2.from_pretrained(directory, device="cpu")
    with kernels.force("native"):
        steps = unedited.stream(None, _ids(1, 4), max_new_tokens=6, min_new_tokens=6, logprobs=3)
        before = torch.tensor([list(st.top_logprobs[0]) for st in steps])
    assert not torch.allclose(before, runs["plain"], atol=1e-3)  # the edit changed the run


@needs_generate
def test_a_tokenizer_of_the_users_is_code_between_steps(make_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop strings read tokens through the tokenizer every step: a tokenizer that is not
    minigpt2's own runs user code there, so generate() checks before every step again, and an
    edit made from it is seen at the next step as on the plain path."""
    from minigpt2 import Tokenizer

    class Editing:  # the user's tokenizer: minigpt2's, but it edits a weight on its third call
        def __init__(self, model: GPT2) -> None:
            self.tok, self.model, self.n = Tokenizer(), model, 0

        def decode_bytes(self, ids: list[int]) -> bytes:
            self.n += 1
            if self.n == 3:
                with torch.no_grad():
                    for b in self.model.transformer.h:
                        b.mlp.c_proj.weight.mul_(-4.0)
            return self.tok.decode_bytes(ids)

    directory = make_checkpoint(seed=9)[0]

    def run(model: GPT2) -> torch.Tensor:
        out = model.generate(_ids(1, 4), max_new_tokens=6, min_new_tokens=6, stop=["\x00never"],
                             tokenizer=Editing(model), return_dict_in_generate=True, output_logits=True)  # fmt: skip
        return torch.cat(out.logits)

    runs = _on_fast_and_plain_paths(directory, run)
    _close(runs["fast"], runs["plain"])
    calls: list[int] = []
    real = fast._HookWatch.any
    monkeypatch.setattr(fast._HookWatch, "any", lambda self: calls.append(1) or real(self))
    model = GPT2.from_pretrained(directory, device="cpu")
    counts = {}
    for name, tok in (("ours", Tokenizer()), ("users", Editing(GPT2.from_pretrained(directory, device="cpu")))):
        for n in (2, 7):
            calls.clear()
            model.generate(_ids(1, 4), max_new_tokens=n, min_new_tokens=n, stop=["\x00never"], tokenizer=tok)
            counts[name, n] = len(calls)
    assert counts["ours", 2] == counts["ours", 7]
    assert counts["users", 7] >= counts["users", 2] + 5


def test_a_rebuild_keeps_check_each_step(make_checkpoint) -> None:
    model = GPT2.from_pretrained(make_checkpoint(seed=8)[0], device="cpu")
    with torch.no_grad():
        dec = fast.decoder(model, 1)
        dec.check_each_step = False
        model.transformer.h[0].mlp.c_proj.weight.mul_(2.0)  # before the first check: rebuilt there
        p = dec.p
        assert dec.ready() and dec.p is not p and dec.check_each_step is False


@needs_generate
def test_greedy_takes_the_native_argmax(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy's argmax over the logits runs on the native library when the step does (its
    equality with torch.max: tests/test_native.py); elsewhere torch.max, with the same answer."""
    model, hf = pair
    lib = fast.native.library()
    if lib is None or not kernels.available("native", torch.float32):
        pytest.skip("no native library here")
    calls: list[int] = []
    real = type(lib).max_rows
    monkeypatch.setattr(type(lib), "max_rows", lambda self, x: calls.append(x.shape[0]) or real(self, x))
    ids = _ids(2, 5)
    with kernels.force("native"):
        got = model.generate(ids, max_new_tokens=6, min_new_tokens=6)
    assert calls == [2] * 6
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                       do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(got, want)
    with torch.no_grad(), kernels.force("native"):
        dec = _decoder(model, 1)
    assert dec.native_step is not None
    x = torch.randn(3, 40)
    for scores in (x, x.t().contiguous().t(), x.to(torch.bfloat16)):  # contiguous fp32; not contiguous; bf16
        calls.clear()
        v, i = fast.max_last(scores, dec)
        want_v, want_i = torch.max(scores, dim=-1)
        assert torch.equal(i, want_i) and torch.equal(v, want_v)
        assert calls == ([3] if scores is x else [])
    assert torch.equal(fast.max_last(x, None).indices, torch.max(x, -1).indices)


# --------------------------------------------------------------------- choosing
def test_choice_is_measured_then_cached(pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = pair
    blocks, E = fast._sources(model)
    chosen = kernels.choose("blocks test", blocks[:4], 1, rounds=2)
    assert chosen in KERNELS
    data = json.loads(kernels.cache_file().read_text())
    (entry,) = [v for k, v in data.items() if "blocks test" in k]
    (sample,) = entry["samples"]
    assert entry["kernel"] == chosen and set(sample["seconds_per_pass"]) == set(MEASURED)
    assert sample["noise"] >= 1.0
    # The key names the host, the torch version and threads, the shapes, the dtype and the batch bucket.
    key = next(iter(data))
    assert kernels.host_id() in key and torch.__version__ in key and "float32" in key and "batch 1" in key
    assert f"{torch.get_num_threads()} threads" in key
    # A settled decision: a fresh process (empty memo) reads the file instead of measuring again.
    entry["settled"] = True
    kernels.cache_file().write_text(json.dumps(data))
    monkeypatch.setattr(kernels, "_decisions", {})
    monkeypatch.setattr(kernels, "_sample", lambda *a, **k: pytest.fail("measured again"))
    assert kernels.choose("blocks test", blocks[:4], 1) == chosen


def _fake_samples(monkeypatch: pytest.MonkeyPatch, samples: list[tuple[dict[str, float], float]]) -> list[int]:
    """Make choose() measure ``samples`` in turn (seconds per candidate, noise); returns a call counter."""
    calls: list[int] = []

    def sample(mats, cands, batch_size, rounds, inner=None):
        seconds, noise = samples[len(calls)]
        calls.append(1)
        return kernels.Sample({k: seconds[k] for k in cands}, noise)

    monkeypatch.setattr(kernels, "available", lambda k, dtype, device="cpu": k in ("plain", "transposed", "mkldnn"))
    monkeypatch.setattr(kernels, "_sample", sample)
    return calls


@pytest.mark.parametrize(
    "times, want",
    [
        ({"plain": 1.02, "transposed": 1.0, "mkldnn": 0.995}, "plain"),  # a tie: no copy is worth it
        ({"plain": 1.2, "transposed": 1.0, "mkldnn": 0.995}, "transposed"),
        ({"plain": 1.2, "transposed": 1.1, "mkldnn": 1.0}, "mkldnn"),
    ],
)
def test_choice_prefers_the_cheaper_kernel_on_a_tie(pair, monkeypatch: pytest.MonkeyPatch, times, want) -> None:
    model, _ = pair
    _fake_samples(monkeypatch, [(times, 1.0)])
    assert kernels.choose("tie test", fast._sources(model)[0][:4], 1) == want


@pytest.mark.skipif("native" not in KERNELS, reason="no C compiler with OpenMP here: the native kernel is not built")
def test_a_tie_goes_to_native_where_it_costs_no_more_memory(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tied products are no tie on the token: only with native does the step run whole in C
    (bf16 on the emulated AVX2 host: products tied, 157 tok/s on transposed, 222 on native). So
    native wins a tie with the kernels that copy as it does, and for the unembedding, which it
    reads in place, with plain too; the block matrices stay on plain on a tie (no copy)."""
    model, _ = pair
    monkeypatch.setattr(kernels, "available", lambda k, dtype, device="cpu": k in ("plain", "native", "transposed"))
    monkeypatch.setattr(kernels, "_sample", lambda mats, cands, *a, **k: kernels.Sample(dict.fromkeys(cands, 1.0), 1.0))
    blocks = fast._sources(model)[0][:4]
    assert kernels.choose("tie test", blocks, 1, candidates=[k for k in kernels.KERNELS if k != "plain"]) == "native"
    assert kernels.choose("tie test 2", blocks, 1) == "plain"
    fast.release(model)
    p = fast.prepare(model, 1)
    assert (p.block_kernel, p.unembed_kernel) == ("plain", "native")
    fast.release(model)


def test_a_quiet_clear_sample_settles_at_once(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = pair
    calls = _fake_samples(monkeypatch, [({"plain": 2.0, "transposed": 1.5, "mkldnn": 1.0}, 1.02)])
    mats = fast._sources(model)[0][:4]
    assert kernels.choose("settle test", mats, 1) == "mkldnn"
    monkeypatch.setattr(kernels, "_decisions", {})  # a fresh process
    assert kernels.choose("settle test", mats, 1) == "mkldnn"
    assert len(calls) == 1


def test_a_kernel_that_becomes_available_is_measured(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision settled where a candidate could not run (the native kernel without a C
    compiler, or with MINIGPT2_NATIVE=0) is measured again once it can: a new user's bf16 model
    otherwise stayed on mkldnn at ~124 tok/s against ~165 on native."""
    model, _ = pair
    calls = _fake_samples(monkeypatch, [({"plain": 2.0, "transposed": 1.5, "mkldnn": 1.0, "native": 0.6}, 1.02)] * 3)
    mats = fast._sources(model)[0][:4]
    assert kernels.choose("new candidate test", mats, 1) == "mkldnn" and len(calls) == 1  # settled without native
    monkeypatch.setattr(kernels, "_decisions", {})  # a fresh process, where native builds
    monkeypatch.setattr(kernels, "available", lambda k, dtype, device="cpu": k in ("plain", "transposed", "mkldnn", "native"))
    assert kernels.choose("new candidate test", mats, 1) == "native" and len(calls) == 2
    monkeypatch.setattr(kernels, "_decisions", {})
    assert kernels.choose("new candidate test", mats, 1) == "native" and len(calls) == 2  # settled now


def test_a_decision_measured_under_load_does_not_stick(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's second fact: a busy machine slowed the fastest kernel in one measurement.
    A noisy (or unclear) sample is used but measured again by the next processes, and the
    decision comes from every candidate's best over all samples."""
    model, _ = pair
    busy = {"plain": 1.0, "transposed": 1.3, "mkldnn": 1.6}  # mkldnn hit by other processes
    quiet_but_close = {"plain": 1.0, "transposed": 1.3, "mkldnn": 0.95}  # ahead, but not clearly
    again = {"plain": 0.98, "transposed": 1.25, "mkldnn": 0.8}
    calls = _fake_samples(monkeypatch, [(busy, 1.6), (quiet_but_close, 1.02), (again, 1.5)])
    mats = fast._sources(model)[0][:4]
    assert kernels.choose("load test", mats, 1) == "plain"  # what the busy sample says, for now
    for want in ("mkldnn", "mkldnn"):  # each later process measures once more
        monkeypatch.setattr(kernels, "_decisions", {})
        assert kernels.choose("load test", mats, 1) == want
    entry = next(v for k, v in json.loads(kernels.cache_file().read_text()).items() if "load test" in k)
    assert entry["settled"] and len(entry["samples"]) == kernels.SAMPLES
    monkeypatch.setattr(kernels, "_decisions", {})
    assert kernels.choose("load test", mats, 1) == "mkldnn"  # settled: read, not measured
    assert len(calls) == kernels.SAMPLES


def test_time_passes_drops_hopeless_candidates_and_reports_noise() -> None:
    import time

    x = [torch.randn(1, 64)]
    calls: dict[str, int] = {"slow": 0, "jit": 0, "absurd": 0}

    def sleeper(name: str, seconds: float, first: float | None = None):
        def fn(t):
            calls[name] = calls.get(name, 0) + 1
            time.sleep(first if first is not None and calls[name] == 1 else seconds)
            return t

        return [fn]

    s = kernels.time_passes({
        "quick": sleeper("quick", 0.004),
        "slow": sleeper("slow", 0.05),  # 12x: timed once after the warm-up, then dropped
        "jit": sleeper("jit", 0.004, first=0.04),  # a one-time cost in the warm-up decides nothing
        "absurd": sleeper("absurd", 0.5),  # cut short in the warm-up
    }, x, rounds=3)  # fmt: skip
    # slow: warm-up + two timed rounds; absurd: the warm-up + one more try after the rounds
    assert calls == {"quick": 4, "slow": 3, "jit": 4, "absurd": 2}
    assert s.seconds["slow"] > kernels.HOPELESS * s.seconds["quick"]
    assert s.seconds["jit"] < 2 * s.seconds["quick"]
    assert s.seconds["absurd"] >= 0.5
    assert 1.0 <= s.noise < 2.0
    assert not s.complete  # two candidates were not timed through: this sample settles nothing alone


def test_a_load_burst_on_the_good_candidates_does_not_settle_a_wrong_kernel() -> None:
    """The failure seen on a busy host: a burst hit the good candidates in the warm-up and
    the first timed round, they were dropped, and the sample looked quiet and clear: a wrong
    kernel settled for good. Now a candidate is timed twice before it is dropped, one cut
    short in the warm-up is tried again, and such a sample does not settle the decision."""
    import time

    x = [torch.randn(1, 64)]

    def burst(fast: float, slow: float, slow_calls: set[int]):
        n = {"calls": 0}

        def fn(t):
            n["calls"] += 1
            time.sleep(slow if n["calls"] in slow_calls else fast)
            return t

        return [fn]

    # In the first timed round only: timed again, and it wins.
    s = kernels.time_passes({"good": burst(0.002, 0.1, {2}), "other": burst(0.005, 0.005, set())}, x, rounds=3)
    assert s.complete and s.seconds["good"] < s.seconds["other"]
    # In the warm-up and both of the first two rounds: dropped, and the sample is incomplete.
    s = kernels.time_passes({"other": burst(0.01, 0.01, set()), "good": burst(0.002, 0.1, {1, 2, 3})}, x, rounds=3)
    assert not s.complete
    entry = s.to_json()
    assert entry["complete"] is False and kernels.decide([entry], ["good", "other"]) == ("other", False)
    # Cut short in the warm-up as absurd, fine afterwards: tried again, its real time recorded.
    s = kernels.time_passes({"other": burst(0.01, 0.01, set()), "good": burst(0.002, 0.5, {1})}, x, rounds=3)
    assert not s.complete and s.seconds["good"] < s.seconds["other"]
    entry = s.to_json()
    assert kernels.decide([entry], ["other", "good"]) == ("good", False)


def test_a_sample_measured_while_other_work_holds_the_cores_does_not_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other work on every core slows every candidate alike: the rounds agree (a new user's
    trial beside a test run measured every kernel ~15x slower at noise 1.07) and the sample
    looked quiet. Now a sample crowded in every round (more runnable tasks than cores) is used
    but settles nothing by itself; crowded in some rounds only, it may."""
    import io
    import time

    x = [torch.randn(1, 64)]
    fns = {"good": [lambda t: time.sleep(0.002)], "other": [lambda t: time.sleep(0.004)]}
    rounds = iter([True] * 10)
    monkeypatch.setattr(kernels, "crowded", lambda: next(rounds))
    s = kernels.time_passes(fns, x, rounds=3)
    assert s.crowded and s.complete
    entry = s.to_json()
    assert entry["crowded"] is True and kernels.decide([entry], ["good", "other"]) == ("good", False)
    quiet = dict(entry, crowded=False, noise=1.0)
    assert kernels.decide([quiet], ["good", "other"]) == ("good", True)  # the same sample, uncrowded: settled
    rounds = iter([True, False, True])
    assert not kernels.time_passes(fns, x, rounds=3).crowded
    # crowded() reads the running count of /proc/loadavg against this process's cores
    monkeypatch.undo()
    monkeypatch.setattr(kernels.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for text, want in (("0.5 0.4 0.3 2/80 999", False), ("3.1 2.0 1.0 5/80 999", True), ("garbled", False)):
        monkeypatch.setattr(kernels, "open", lambda *a, text=text, **k: io.StringIO(text), raising=False)
        assert kernels.crowded() is want, text


def test_measuring_leaves_the_global_rng_alone(pair) -> None:
    """The first generate measures kernels; seeded sampling must not notice."""
    model, _ = pair
    state = torch.get_rng_state()
    kernels.measure(fast._sources(model)[0][:4], KERNELS, 2, rounds=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_env_var_forces_a_kernel(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = pair
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("measured although forced"))
    for k in KERNELS:
        monkeypatch.setenv(kernels.ENV_KERNEL, k)
        _fast_logits(model, _ids(1, 3))
        assert fast.kernel_names(model) == {"blocks": k, "unembed": k, "prefill": "plain"}
    monkeypatch.setenv(kernels.ENV_KERNEL, "fastest")
    with pytest.raises(ValueError, match="MINIGPT2_KERNEL='fastest'"):
        _fast_logits(model, _ids(1, 3))
    with pytest.raises(ValueError, match="unknown kernel"):
        with kernels.force("nope"):
            pass


def test_batch_buckets() -> None:
    assert [kernels.batch_bucket(b) for b in (1, 2, 3, 5, 8, 9, 100)] == [1, 2, 4, 8, 8, 16, 64]


def test_extra_memory_reported(pair) -> None:
    model, _ = pair
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with kernels.force("plain"):
        _fast_logits(model, _ids(1, 2))
    assert fast.extra_bytes(model) == 0
    if "transposed" in KERNELS:
        with kernels.force("transposed"):
            _fast_logits(model, _ids(1, 2))
        assert 0 < fast.extra_bytes(model) <= weights
    fast.release(model)
    assert fast.extra_bytes(model) == 0 and fast.kernel_names(model) == {}


# --------------------------------------------------------------------- the benchmark
@needs_generate
def test_bench_script_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), kernels.ENV_CACHE_DIR: str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench.py"), "--size", "tiny", "--quick", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    figures = [row["figure"] for row in data["rows"]]
    assert any(f.startswith("decode fp32 batch 1") for f in figures)
    assert any(f.startswith("prefill fp32") for f in figures)
    assert any("load peak RSS" in f for f in figures)
    assert data["host"]["torch"] == torch.__version__


@needs_generate
def test_ablation_script_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), kernels.ENV_CACHE_DIR: str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_ablation.py"), "--size", "tiny", "--quick"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 1, float32 |")]
    assert [row.split(" | ")[1] for row in rows] == [
        "transformers fp32", "model path", "decoder, plain kernels", "decoder, chosen kernels"
    ]


# --------------------------------------------------------------------- threads of a step
def test_step_threads_on_a_quiet_machine_go_to_the_team_and_stay() -> None:
    st = fast.StepThreads(2)
    assert st.next() == 1  # the first step tells what one thread does
    st.record(1, 0.025)
    assert st.probe_due()
    st.probed(team=0.6e-3, single=1.0e-3)  # the team's product is clearly faster
    for _ in range(200):
        assert st.next() == 2
        st.record(2, 0.016)
    assert st.switches == 1 and not st.probe_due()


def test_step_threads_leave_a_contended_team_and_probe_it_with_backoff() -> None:
    st = fast.StepThreads(2)
    st.record(1, 0.025)
    st.probe_due()
    st.probed(0.6e-3, 1.0e-3)
    st.record(2, 0.016)
    st.record(2, 0.300)  # another process took a core: one slow team step is enough
    assert st.next() == 1
    gaps = []
    for _ in range(3):  # the team stays contended: each failed probe doubles the wait
        steps = 0
        while True:
            st.record(1, 0.030)
            steps += 1
            if st.probe_due():
                break
        gaps.append(steps)
        st.probed(team=20e-3, single=1.0e-3)
    assert gaps == [8, 16, 32] and st.next() == 1
    while not st.probe_due():
        st.record(1, 0.030)
    st.probed(team=0.5e-3, single=1.0e-3)  # the cores are free again
    assert st.next() == 2


def test_step_threads_weigh_the_team_by_whole_steps() -> None:
    """The probe only rules out contention: a team product 10 % faster is enough to try the
    team (three cold products gain less from a second thread than a whole step: bf16 124M
    here: 0.8-1.0 in the probe, ~0.78 in whole steps). The whole steps then decide."""
    st = fast.StepThreads(2)
    st.record(1, 0.010)
    st.probe_due()
    st.probed(team=0.9e-3, single=1.0e-3)
    assert st.next() == 2
    for _ in range(fast.StepThreads.TRIAL):
        st.record(2, 0.007)
    assert st.next() == 2  # 30 % faster than one thread: stays
    small = fast.StepThreads(2)  # a step that a second thread does not speed up
    small.record(1, 1.0e-3)
    small.probe_due()
    small.probed(team=0.9e-3, single=1.0e-3)
    for _ in range(fast.StepThreads.TRIAL):
        assert small.next() == 2
        small.record(2, 0.98e-3)
    assert small.next() == 1 and small.interval == 2 * fast.StepThreads.FIRST_INTERVAL
    small.probe_due()
    small.probed(team=1.2e-3, single=1.0e-3)  # the team's product slower: not tried
    assert small.next() == 1


def test_a_short_prompt_is_not_timed_as_a_step(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt of up to kernels.ROWS rows runs on the step kernels, but only one-token steps
    are recorded: a prompt's time would send the steps back to one thread at every call."""
    model, _ = pair
    recorded = []
    monkeypatch.setattr(fast.StepThreads, "record", lambda self, n, seconds: recorded.append(n))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.generate(_ids(1, 40, seed=3), max_new_tokens=4, min_new_tokens=4)
    finally:
        torch.set_num_threads(previous)
    assert len(recorded) == 3  # the three one-token steps, not the 40-token prompt


def test_each_batch_size_keeps_its_own_step_threads(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's time depends on its rows, so steps of one batch size never judge another's
    thread count (a batch of 8 after batch-1 steps read as a contended team and ran on one
    thread); each size's state carries over between generate calls."""
    model, _ = pair
    seen: list[fast.StepThreads] = []
    real = fast.StepThreads.record
    monkeypatch.setattr(fast.StepThreads, "record", lambda self, n, seconds: seen.append(self) or real(self, n, seconds))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    states = []
    try:
        with kernels.force("plain"):  # one prepared set for both sizes
            for batch in (1, 3, 1, 3):
                seen.clear()
                model.generate(_ids(batch, 5, seed=batch), max_new_tokens=3, min_new_tokens=3)
                states.append({id(st) for st in seen})
    finally:
        torch.set_num_threads(previous)
    assert all(len(s) == 1 for s in states)
    assert states[0] != states[1] and states[2] == states[0] and states[3] == states[1]


def test_numpy_kernel_steps_keep_adaptive_threads(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate runs the numpy kernel's steps with torch on one thread (between_steps): their
    thread state still follows the user's team, read when the Decoder was built (found by a
    review: the per-batch state read torch's setting at each step and found one thread)."""
    if not kernels.available("numpy", torch.float32):
        pytest.skip("numpy's BLAS is not OpenBLAS here")
    model, _ = pair
    recorded: list[int] = []
    monkeypatch.setattr(fast.StepThreads, "record", lambda self, n, seconds: recorded.append(n))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.force("numpy"):
            model.generate(_ids(1, 4, seed=5), max_new_tokens=5, min_new_tokens=5)
    finally:
        torch.set_num_threads(previous)
    assert len(recorded) == 4  # the four one-token steps


def test_step_threads_switched_off_or_single(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fast.ENV_THREADS, "0")
    assert fast.StepThreads.current_for(None) is None
    monkeypatch.delenv(fast.ENV_THREADS)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fast.StepThreads.current_for(None) is None
        torch.set_num_threads(2)
        st = fast.StepThreads.current_for(None)
        assert st is not None and st.n == 2 and fast.StepThreads.current_for(st) is st
    finally:
        torch.set_num_threads(previous)


def _threads_seen_by_hidden(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch's thread count at each Decoder.hidden call, from now on (the list fills as it runs)."""
    seen: list[int] = []
    real = fast.Decoder.hidden

    def hidden(self, *a, **k):
        seen.append(torch.get_num_threads())
        return real(self, *a, **k)

    monkeypatch.setattr(fast.Decoder, "hidden", hidden)
    return seen


@pytest.mark.parametrize("kernel", KERNELS)
def test_steps_restore_the_thread_settings(pair, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a step runs on (one thread, the team, OpenBLAS's threads), torch's and
    OpenBLAS's settings are the user's again when generate returns, also after an error."""
    model, _ = pair
    previous = torch.get_num_threads()
    blas = kernels.numpy_blas_threads()
    try:
        torch.set_num_threads(2)
        seen = _threads_seen_by_hidden(monkeypatch)
        with kernels.force(kernel):
            model.generate(_ids(1, 4), max_new_tokens=8, min_new_tokens=8)
            assert torch.get_num_threads() == 2 and kernels.numpy_blas_threads() == blas
            if kernel == "numpy":
                assert set(seen) == {1}  # torch on one thread, OpenBLAS does the products
            with torch.no_grad():
                dec = fast.decoder(model, 1)
                dec.unembed = lambda h: 1 / 0
                for _ in range(3):  # on one thread and on the team
                    with pytest.raises(ZeroDivisionError):
                        dec(_ids(1, 1), torch.tensor([[0]]), None, None)
                    assert torch.get_num_threads() == 2 and kernels.numpy_blas_threads() == blas
            assert torch.get_num_threads() == 2 and kernels.numpy_blas_threads() == blas
    finally:
        torch.set_num_threads(previous)


def test_a_check_of_several_drafts_runs_on_the_steps_threads(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Assisted decoding's check of 1 + k drafts (every position's logits) runs its products as
    a step does: with the numpy kernel, torch on one thread while OpenBLAS works (outside that,
    the two spinning pools made a 5-row check of gpt2-large's shape 16x a step), and its logits
    equal the plain model's at every position."""
    if not kernels.available("numpy", torch.float32):
        pytest.skip("numpy's BLAS thread count cannot be read here (not OpenBLAS)")
    model, _ = pair
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(kernels, "numpy_blas_threads", lambda: torch.get_num_threads())
        seen = _threads_seen_by_hidden(monkeypatch)
        ids = _ids(1, 6)
        with kernels.force("numpy"), torch.inference_mode():
            dec = fast.decoder(model, 5)
            assert dec is not None and dec.numpy_step
            cache = model.make_cache(1, 16)
            logits = dec(ids, torch.arange(6)[None], None, cache, last_only=False)
            assert seen == [1] and torch.get_num_threads() == 2
            assert logits.shape == (1, 6, model.config.vocab_size) and cache.length == 6
            torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-4 * model(ids).abs().max().item())
    finally:
        torch.set_num_threads(previous)


def test_numpy_kernel_only_on_the_users_thread_count(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernels.available("numpy", torch.float32):
        pytest.skip("numpy's BLAS thread count cannot be read here (not OpenBLAS)")
    model, _ = pair
    seen = []
    monkeypatch.setattr(kernels, "_sample", lambda mats, cands, b, rounds, inner=None: seen.append(list(cands)) or kernels.Sample(
        {k: 1.0 for k in cands}, 1.0))
    monkeypatch.setattr(kernels, "numpy_blas_threads", lambda: torch.get_num_threads())
    if "native" in KERNELS:  # with the native kernel at hand, numpy's second thread pool is not offered
        kernels.choose("threads test 0", fast._sources(model)[0][:4], 1)
        assert "native" in seen[-1] and "numpy" not in seen[-1]
    _no_native(monkeypatch)
    monkeypatch.setattr(kernels, "numpy_blas_threads", lambda: torch.get_num_threads() + 1)
    kernels.choose("threads test", fast._sources(model)[0][:4], 1)
    assert "numpy" not in seen[-1]
    monkeypatch.setattr(kernels, "numpy_blas_threads", lambda: torch.get_num_threads())
    kernels.choose("threads test 2", fast._sources(model)[0][:4], 1)
    assert "numpy" in seen[-1]


def test_bf16_upcast_runs_on_the_kernel_fp32_gets(make_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without native bf16 the upcast copy must be as fast as the fp32 model: its
    fp32 kernel is the fp32 decision for the same shapes (here: numpy's, so the steps run on
    numpy's threads, unembedding included)."""
    if not kernels.available("numpy", torch.float32):
        pytest.skip("numpy's BLAS thread count cannot be read here (not OpenBLAS)")
    ref_model, model = _bf16_pair(make_checkpoint)
    _no_native(monkeypatch)

    def sample(mats, cands, batch_size, rounds, inner=None):
        fastest = "numpy" if mats[0][0].dtype == torch.float32 else "upcast"
        return kernels.Sample({k: (1.0 if k == fastest else 2.0) for k in cands}, 1.0)

    monkeypatch.setattr(kernels, "_sample", sample)
    monkeypatch.setattr(kernels, "numpy_blas_threads", lambda: torch.get_num_threads())
    ids = _ids(1, 6, seed=8)
    got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, pad_token_id=999)
    assert fast.kernel_names(model) == {"blocks": "upcast:numpy", "unembed": "upcast:numpy", "prefill": "upcast"}
    with torch.no_grad():
        assert fast.decoder(model, 1).numpy_step == (torch.get_num_threads() > 1)
    want = ref_model.generate(ids, max_new_tokens=8, min_new_tokens=8, pad_token_id=999)
    assert (got == want).float().mean() >= 0.8  # bf16 weights: the same tokens nearly everywhere


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_token_attention_is_as_close_to_exact_as_sdpa(dtype) -> None:
    """The half-precision decode step's attention (fp32 inside) against float64, with a padding
    mask: at least as close as PyTorch's fused kernel in that dtype."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, T, 16, generator=g).to(dtype) for T in (1, 37, 37))
    mask = torch.ones(3, 1, 1, 37, dtype=torch.bool)
    mask[1, ..., :10] = False  # a left-padded row
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3)
    got = fast.one_token_attention(q, k, v, mask, 0.3)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert got.dtype == dtype and got.shape == (3, 4, 1, 16)
    assert (got.double() - exact).abs().max() <= (fused.double() - exact).abs().max() * 1.01
    unmasked = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert (fast.one_token_attention(q, k, v, None, 0.3).double() - unmasked).abs().max() < 1e-2


@pytest.mark.skipif(not kernels.available("mkldnn", torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_half_precision_mlp_carries_its_gelu_in_the_product(make_checkpoint) -> None:
    """bf16 with oneDNN for a prompt's rows: c_fc's product applies GPT-2's (tanh) GELU in its
    epilogue; the prompt's logits stay within bf16 noise of the plain model, with its tokens."""
    directory, _ = make_checkpoint(seed=23)
    model = GPT2.from_pretrained(directory, device="cpu", dtype=torch.bfloat16)
    ids = _ids(2, kernels.ROWS + 7, seed=5)  # more rows than a step: the prompt's kernels

    with kernels.force("mkldnn"), torch.inference_mode():  # a forced half kernel serves the rows too
        dec = _decoder(model, 2)
        assert all(layer[6] is fast._identity for layer in dec.layers_rows)  # no GELU pass of its own
        assert not any(layer[6] is fast._identity for layer in dec.layers)  # steps: a separate GELU
        got = dec.logits(dec.hidden(ids, torch.arange(ids.shape[1])[None], None, None, last_only=False))
        want = model(ids).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_a_rebuild_frees_the_old_copies_before_making_new_ones(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """One set of prepared weights per model, also while it is replaced: the old copies are
    gone before the first new one is made (a gpt2-xl fp32 switch from numpy's copies to
    oneDNN's peaked at 19.5 GB with both alive, ~14 GB without)."""
    import weakref

    model, _ = pair
    with kernels.force("transposed"), torch.inference_mode():
        fast.prepare(model, 1)
    old = weakref.ref(fast._prepared[model].blocks[0])
    alive = []
    real_init = kernels.PreparedLinear.__init__

    def spy(self, *args, **kwargs) -> None:
        alive.append(old() is not None)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(kernels.PreparedLinear, "__init__", spy)
    with kernels.force("plain"), torch.inference_mode():
        fast.prepare(model, 1)
    assert alive and not any(alive)
