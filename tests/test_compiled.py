"""The opt-in compiled decode step (compiled.py): token-exact with transformers, logits within
the parity tolerance, compiled once per signature, out of the way of hooks and gradients.

One small model, compiled once for the module (inductor takes ~10-20 s on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from minigpt2 import GPT2, compiled, fast

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


def test_compile_flag_is_checked(make_checkpoint) -> None:
    directory, _ = make_checkpoint(seed=41)
    with pytest.raises(ValueError, match="compile must be True or False"):
        GPT2.from_pretrained(directory, device="cpu", compile="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_on_cuda_warns_and_stays_eager_and_exact(make_checkpoint) -> None:
    """No CUDA-graph step was built (no GPU to test it on): on CUDA the flag says so in one
    warning, and generation stays the eager path, token-identical with transformers."""
    import transformers

    directory, _ = make_checkpoint(seed=41)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).cuda().eval()
    with pytest.warns(UserWarning, match="CPU-only"):
        model = GPT2.from_pretrained(directory, device="cuda", compile=True)
    ids = _ids(1, 6, seed=4).cuda()
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, min_new_tokens=8), want)
    assert compiled.compile_seconds(model) == {}
