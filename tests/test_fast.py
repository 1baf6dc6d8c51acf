"""The inference fast paths (kernels.py, fast.py) against transformers.

Every candidate kernel is forced in turn, whatever the host would choose, and must keep
fp32 logits within the parity tolerance and generation token-identical to transformers.
Then: the fallbacks (feature check off, gradients on, hooks, training mode), the rebuild
when a weight changes, the per-host choice and its on-disk cache, and a smoke run of
scripts/bench.py. Tiny configs only; no timing assertions.
"""

from __future__ import annotations

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


def _fast_logits(model: GPT2, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), fast.fast_path(model, ids.shape[0]) as unembed:
        return unembed(model.transformer(ids))  # (B, T, V)


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
        assert fast.kernel_names(model) == {"blocks": kernel, "unembed": kernel}
    _close(got, want)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_installed_only_inside(pair, kernel: str) -> None:
    model, _ = pair
    conv = model.transformer.h[0].attn.c_attn
    with kernels.force(kernel), torch.no_grad(), fast.fast_path(model, 1):
        assert (conv.kernel is not None) == (kernel != "plain")
    assert conv.kernel is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_incremental_decode_with_cache(pair, kernel: str) -> None:
    """Prefill then one token at a time through the KV cache, as generation does."""
    model, hf = pair
    ids = _ids(2, 12, seed=3)
    with torch.no_grad():
        want = hf(ids).logits[:, -1]
    cache = model.make_cache(2, 12)
    with kernels.force(kernel), torch.inference_mode():
        with fast.fast_path(model, 2) as unembed:
            unembed(model.transformer(ids[:, :8], cache=cache)[:, -1])
        for t in range(8, 12):
            with fast.fast_path(model, 2) as unembed:
                got = unembed(model.transformer(ids[:, t : t + 1], cache=cache)[:, -1])
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
    """No flag needed: generate prepares the host's kernels itself, and leaves nothing installed."""
    model, _ = pair
    fast.release(model)
    model.generate(_ids(1, 4), max_new_tokens=2)
    assert set(fast.kernel_names(model)) == {"blocks", "unembed"}
    assert all(c.kernel is None for c in fast.conv1ds(model))


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
    assert fast.kernel_names(model) == {"blocks": "plain", "unembed": "plain"}
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


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "plain"])
def test_plain_path_with_grad_hooks_or_training(pair, kernel: str) -> None:
    model, _ = pair
    conv = model.transformer.h[0].attn.c_attn
    with kernels.force(kernel):
        with fast.fast_path(model, 1):  # gradients on
            assert conv.kernel is None
        with torch.no_grad(), model.hooks({"h.0.ln_1": lambda a, n: None}), fast.fast_path(model, 1):
            assert conv.kernel is None
        model.train()
        try:
            with torch.no_grad(), fast.fast_path(model, 1):
                assert conv.kernel is None
        finally:
            model.eval()
        with torch.no_grad(), fast.fast_path(model, 1):
            assert conv.kernel is not None
            with torch.enable_grad():  # switched on inside: the slot is ignored
                x = torch.randn(1, 2, conv.nx, requires_grad=True)
                conv(x).sum().backward()
                assert x.grad is not None


def test_torch_forward_hooks_take_plain_path(pair) -> None:
    model, _ = pair
    seen: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        with kernels.force(KERNELS[-1]):
            _fast_logits(model, _ids(1, 3))
    finally:
        handle.remove()
    assert seen == [(1, 3, 64)]


@needs_generate
def test_generate_under_hooks_takes_plain_path(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = pair
    seen = []
    monkeypatch.setattr(fast, "prepare", lambda *a, **k: seen.append(1) or pytest.fail("fast path used"))
    with model.hooks({"h.1.mlp.act": lambda a, n: None}):
        model.generate(_ids(1, 4), max_new_tokens=2)
    assert not seen


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
        got = _fast_logits(model, ids)
        with torch.no_grad():
            want = model(ids)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
        model.to(torch.float32)
        _close(_fast_logits(model, ids), plain())


# --------------------------------------------------------------------- choosing
def test_choice_is_measured_once_then_cached(pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = pair
    blocks, E = fast._sources(model)
    chosen = kernels.choose("blocks test", blocks[:4], 1, rounds=2)
    assert chosen in KERNELS
    data = json.loads(kernels.cache_file().read_text())
    (entry,) = [v for k, v in data.items() if "blocks test" in k]
    assert entry["kernel"] == chosen and set(entry["seconds_per_pass"]) == set(KERNELS)
    # A fresh process (empty memo) reads the file instead of measuring again.
    monkeypatch.setattr(kernels, "_decisions", {})
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert kernels.choose("blocks test", blocks[:4], 1) == chosen
    # The key names the host, the torch version, the shapes, the dtype and the batch bucket.
    key = next(iter(data))
    assert kernels.host_id() in key and torch.__version__ in key and "float32" in key and "batch 1" in key


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
        assert fast.kernel_names(model) == {"blocks": k, "unembed": k}
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
