"""The model against transformers: logits, cache, padding, names, init, bad inputs.

Every expected value comes from transformers' GPT2LMHeadModel on the same checkpoint
(random weights saved by transformers itself, see conftest.py), never from minigpt2.
fp32 tolerance (CONVENTIONS.md): max |ours - transformers| <= 1e-4 x max |logit|.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import transformers

from conftest import TINY
from minigpt2 import GPT2, GPT2Config, KVCache
from minigpt2.config import PRESETS

RTOL = 1e-4  # relative to the largest |logit|


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (the CONVENTIONS.md parity measure)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def hf_logits(hf: Any, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids, **kw).logits.float()


def random_ids(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(minigpt2 model, transformers model) on the TINY checkpoint."""
    path, hf = tiny_checkpoint
    return GPT2.from_pretrained(path, device="cpu"), hf


# --------------------------------------------------------------------- logit parity
# One small checkpoint per config option (and one with all of them at once).
CONFIGS: dict[str, dict[str, Any]] = {
    "gelu_new": dict(activation_function="gelu_new"),
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "gelu": dict(activation_function="gelu"),
    "relu": dict(activation_function="relu"),
    "silu": dict(activation_function="silu"),
    "n_inner": dict(n_inner=80),
    "no_scale_attn_weights": dict(scale_attn_weights=False),
    "scale_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True, n_layer=3),
    "reorder_and_upcast_attn": dict(reorder_and_upcast_attn=True),
    "layer_norm_epsilon": dict(layer_norm_epsilon=1e-2),
    "odd_sizes": dict(vocab_size=997, n_positions=37, n_embd=48, n_head=3, n_layer=1),
    "everything": dict(
        vocab_size=523, n_positions=61, n_embd=60, n_head=5, n_layer=3, n_inner=97,
        activation_function="silu", scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True, layer_norm_epsilon=3e-4,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logit_parity_per_config(make_checkpoint, name):
    path, hf = make_checkpoint(seed=3, **CONFIGS[name])
    model = GPT2.from_pretrained(path, device="cpu")
    c = hf.config
    # Two rows; the full context length, so every position embedding is used.
    ids = random_ids(c.vocab_size, 2, min(c.n_positions, 64), seed=1)
    with torch.no_grad():
        ours = model(ids)
    ref = hf_logits(hf, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = rel_err(ours, ref)
    print(f"[parity] {name}: max rel logit error {err:.2e}")
    assert err <= RTOL, f"{name}: {err:.3e}"


def test_logit_parity_gpt2_124m(gpt2_checkpoint):
    path, hf = gpt2_checkpoint
    model = GPT2.from_pretrained(path, device="cpu")
    ids = random_ids(50257, 2, 48, seed=2)
    ids[0, :3] = torch.tensor([0, 50256, 50255])  # the table's edges
    with torch.no_grad():
        ours = model(ids)
    err = rel_err(ours, hf_logits(hf, ids))
    print(f"[parity] gpt2 124M: max rel logit error {err:.2e}")
    assert err <= RTOL


def test_bf16_top1_agreement(gpt2_checkpoint):
    """bf16 weights: argmax agrees with transformers fp32 on a sanity set; logits stay fp32."""
    path, hf = gpt2_checkpoint
    model = GPT2.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = random_ids(50257, 4, 64, seed=4)
    with torch.no_grad():
        ours = model(ids)
    assert ours.dtype == torch.float32
    ref = hf_logits(hf, ids)
    top = ours.argmax(-1)
    agree = (top == ref.argmax(-1)).float().mean().item()
    scale = ref.abs().max().item()
    # Random weights give flat logits (median top-1/top-2 margin ~2% of the largest logit),
    # so bf16 rounding flips a few near-ties. Where it does, our pick must be a near-tie in
    # transformers' fp32 logits too; everything with a clear winner must agree.
    shortfall = (ref.max(-1).values - ref.gather(-1, top[..., None])[..., 0]).max().item()
    print(f"[parity] gpt2 124M bf16: top-1 agreement {agree:.1%} on {ids.numel()} positions, "
          f"max rel error {rel_err(ours, ref):.2e}, worst flip {shortfall / scale:.2e} of max |logit|")
    assert agree >= 0.9
    assert shortfall <= 0.02 * scale
    assert rel_err(ours, ref) <= 0.03


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_small(make_checkpoint, dtype):
    """Every config option also runs in bf16/fp16 (upcast attention included)."""
    path, hf = make_checkpoint(seed=3, **CONFIGS["everything"])
    model = GPT2.from_pretrained(path, device="cpu", dtype=dtype)
    ids = random_ids(hf.config.vocab_size, 2, 40, seed=5)
    with torch.no_grad():
        ours = model(ids)
    assert ours.dtype == torch.float32
    ref = hf_logits(hf, ids)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) < 0.05
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_int32_ids_and_1d_ids(tiny):
    model, hf = tiny
    ids = random_ids(TINY["vocab_size"], 1, 20, seed=6)
    with torch.no_grad():
        ref = model(ids)
        assert torch.equal(model(ids.int()), ref)
        assert torch.equal(model(ids[0]), ref)  # a 1-D tensor is one row


def test_loss_matches_transformers(tiny):
    model, hf = tiny
    ids = random_ids(TINY["vocab_size"], 2, 24, seed=7)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: those labels are ignored
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours = model.loss(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask, labels=labels).loss
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_training_forward_and_gradients_match_transformers(make_checkpoint):
    """Train mode (dropout 0, so both are deterministic): same loss, same gradients,
    with and without gradient checkpointing."""
    path, hf = make_checkpoint(seed=5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, n_layer=3)
    model = GPT2.from_pretrained(path, device="cpu").train()
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).train()  # a copy: grads stay ours
    ids = random_ids(TINY["vocab_size"], 2, 20, seed=14)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    ref = hf(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    ref.backward()
    ref_grads = {n: p.grad for n, p in hf.named_parameters()}
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        loss = model.loss(ids, attention_mask=mask)
        loss.backward()
        assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
        for name, p in model.named_parameters():
            assert rel_err(p.grad, ref_grads[name]) <= 1e-4, (checkpointing, name)


# ------------------------------------------------------------------------ KV cache
def test_cache_token_by_token_equals_full_forward(tiny):
    model, _ = tiny
    ids = random_ids(TINY["vocab_size"], 2, 20, seed=8)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 20)
        steps = [model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])]
    assert cache.length == 20
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_cache_chunked_equals_full_forward(tiny):
    model, _ = tiny
    ids = random_ids(TINY["vocab_size"], 3, 25, seed=9)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(3, 32)
        chunks = [model(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 19), (19, 25))]
    assert rel_err(torch.cat(chunks, dim=1), full) <= 1e-5


def test_cache_with_every_config_option(make_checkpoint):
    path, hf = make_checkpoint(seed=3, **CONFIGS["everything"])
    model = GPT2.from_pretrained(path, device="cpu")
    ids = random_ids(hf.config.vocab_size, 2, hf.config.n_positions, seed=10)
    with torch.no_grad():
        cache = model.make_cache(2)
        out = torch.cat([model(ids[:, :30], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(30, ids.shape[1])], 1)
    assert rel_err(out, hf_logits(hf, ids)) <= RTOL


def test_cache_with_left_padding(tiny):
    """Prefill a left-padded batch, then decode with the mask growing: each row's real
    logits equal that row's own full forward (cache of the row alone not needed)."""
    model, _ = tiny
    V = TINY["vocab_size"]
    a = random_ids(V, 1, 12, seed=11)  # long row
    b = random_ids(V, 1, 8, seed=12)  # short row, left-padded by 4
    pad = 4
    prefill = torch.cat([a[:, :8], torch.cat([torch.zeros(1, pad, dtype=torch.long), b[:, :4]], 1)])  # (2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :pad] = 0
    steps_a, steps_b = a[0, 8:], b[0, 4:]  # 4 more tokens each
    with torch.no_grad():
        cache = model.make_cache(2, 16)
        outs = [model(prefill, attention_mask=mask, cache=cache)]
        for t in range(4):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            step = torch.stack([steps_a[t], steps_b[t]])[:, None]  # (2, 1)
            outs.append(model(step, attention_mask=mask, cache=cache))
        out = torch.cat(outs, 1)  # (2, 12, V)
        alone_a, alone_b = model(a), model(b)
    assert rel_err(out[0], alone_a[0]) <= 1e-5
    assert rel_err(out[1, pad:], alone_b[0]) <= 1e-5


def test_cache_reorder_and_reset(tiny):
    model, _ = tiny
    ids = random_ids(TINY["vocab_size"], 2, 10, seed=13)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 10)
        model(ids[:, :6], cache=cache)
        cache.reorder(torch.tensor([1, 0]))  # swap the rows
        swapped = model(ids.flip(0)[:, 6:], cache=cache)
        cache.reset()
        assert cache.length == 0
        again = model(ids, cache=cache)
    assert rel_err(swapped, full.flip(0)[:, 6:]) <= 1e-5
    assert rel_err(again, full) <= 1e-5


# ------------------------------------------------------------ padding and positions
def test_left_padding_equals_row_alone_and_transformers(tiny):
    model, hf = tiny
    V = TINY["vocab_size"]
    rows = [random_ids(V, 1, n, seed=20 + n)[0] for n in (16, 9, 1)]
    T = 16
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf_logits(hf, ids, attention_mask=mask, position_ids=position_ids)
        for i, r in enumerate(rows):
            real = slice(T - len(r), T)
            alone = model(r[None])[0]
            assert rel_err(ours[i, real], alone) <= 1e-5
            assert rel_err(ours[i, real], ref[i, real]) <= RTOL


def test_right_padding_equals_transformers_plain_forward(tiny):
    model, hf = tiny
    ids = random_ids(TINY["vocab_size"], 2, 14, seed=30)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf_logits(hf, ids, attention_mask=mask)
    assert rel_err(ours[0], ref[0]) <= RTOL
    assert rel_err(ours[1, :9], ref[1, :9]) <= RTOL


def test_all_ones_mask_is_no_mask(tiny):
    model, hf = tiny
    ids = random_ids(TINY["vocab_size"], 2, 14, seed=31)
    with torch.no_grad():
        ours = model(ids, attention_mask=torch.ones_like(ids))
    assert rel_err(ours, hf_logits(hf, ids)) <= RTOL


def test_explicit_position_ids(tiny):
    model, hf = tiny
    ids = random_ids(TINY["vocab_size"], 2, 10, seed=32)
    pos = torch.stack([torch.arange(40, 50), torch.tensor([0, 0, 1, 5, 9, 3, 127, 2, 8, 4])])
    with torch.no_grad():
        ours = model(ids, position_ids=pos)
        ref = hf_logits(hf, ids, position_ids=pos)
        broadcast = model(ids, position_ids=pos[0])  # one row of positions for the batch
    assert rel_err(ours, ref) <= RTOL
    assert rel_err(broadcast, hf_logits(hf, ids, position_ids=pos[:1].expand(2, -1))) <= RTOL


# ------------------------------------------------------------- names and structure
def test_print_matches_transformers(tiny):
    model, hf = tiny
    ours, ref = repr(model).splitlines(), repr(hf).splitlines()
    assert ours[0] == "GPT2(" and ref[0] == "GPT2LMHeadModel("
    assert ours[1:] == ref[1:]


@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "gelu", "relu", "silu", "n_inner"])
def test_print_matches_transformers_per_config(make_checkpoint, name):
    path, hf = make_checkpoint(seed=3, **CONFIGS[name])
    model = GPT2.from_pretrained(path, device="cpu")
    assert repr(model).splitlines()[1:] == repr(hf).splitlines()[1:]


def test_print_gpt2_124m(gpt2_checkpoint):
    path, hf = gpt2_checkpoint
    with torch.device("meta"):  # the print needs no weights
        model = GPT2(GPT2Config.from_preset("gpt2"))
    assert repr(model).splitlines()[1:] == repr(hf).splitlines()[1:]
    assert "(c_attn): Conv1D(nf=2304, nx=768)" in repr(model)


def test_names_state_dict_and_tied_head(tiny):
    model, hf = tiny
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert list(model.state_dict()) == list(hf.state_dict())
    assert "lm_head.weight" in model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in model.parameters()) == hf.num_parameters()
    fresh = GPT2(GPT2Config(**TINY))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert list(fresh.state_dict()) == list(hf.state_dict())
    # The tie survives .to() and a load_state_dict of transformers' state dict.
    fresh = fresh.to(torch.float64).to(torch.float32)
    fresh.load_state_dict(hf.state_dict())
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    with torch.no_grad():
        ids = random_ids(TINY["vocab_size"], 1, 8)
        assert rel_err(fresh.eval()(ids), hf_logits(hf, ids)) <= RTOL


def test_initialisation_statistics():
    """GPT2(config): N(0, 0.02), residual projections N(0, 0.02/sqrt(2 n_layer)), biases 0, LN 1/0."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=2000, n_positions=256, n_embd=128, n_layer=4, n_head=4)
    model = GPT2(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        p = p.detach()
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(p == expected), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
        else:
            std = resid_std if name.endswith("c_proj.weight") else 0.02
            n = p.numel()
            # std of a sample std ~ std / sqrt(2n); allow 6 sigma plus a little.
            assert abs(p.std().item() - std) <= std * (6 / math.sqrt(2 * n) + 0.01), name
            assert abs(p.mean().item()) <= 6 * std / math.sqrt(n), name
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("bad", [1000, 5000, -1])
def test_out_of_range_id_names_the_id(tiny, bad):
    model, _ = tiny
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=rf"{bad}\b"):
        model(ids)


@pytest.mark.parametrize(
    "ids, words",
    [
        (torch.zeros(1, 4), "dtype"),
        (torch.zeros(1, 4, dtype=torch.bool), "dtype"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        ([[1, 2, 3]], "LongTensor"),
    ],
)
def test_bad_input_ids(tiny, ids, words):
    model, _ = tiny
    with pytest.raises(ValueError, match=words):
        model(ids)


def test_too_long_sequence_names_n_positions(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="n_positions=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_attention_mask_shape_mismatch(tiny):
    model, _ = tiny
    ids = torch.zeros(2, 5, dtype=torch.long)
    for mask in (torch.ones(2, 4), torch.ones(3, 5), torch.ones(2, 5, 1)):
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=mask)


def test_bad_attention_mask_type(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=[[1] * 5] * 2)


def test_bad_labels(tiny):
    model, _ = tiny
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="label 1000"):
        model.loss(ids, labels=torch.full((2, 5), 1000))
    with pytest.raises(ValueError, match="label -5"):
        model.loss(ids, labels=torch.full((2, 5), -5))
    with pytest.raises(ValueError, match="labels"):
        model.loss(ids, labels=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="labels shape"):
        model.loss(ids, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 1000"):
        model.loss(torch.full((2, 5), 1000))
    with pytest.raises(ValueError, match="attention_mask"):
        model.loss(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        model.loss(ids, reduction="none")


def test_bad_position_ids(tiny):
    model, _ = tiny
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="128"):
        model(ids, position_ids=torch.arange(124, 129))
    with pytest.raises(ValueError, match="position"):
        model(ids, position_ids=torch.zeros(2, 5))  # float positions


def test_cache_overflow_and_mismatch(tiny):
    model, _ = tiny
    with torch.no_grad():
        cache = model.make_cache(1, 8)
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="cache"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        assert cache.length == 6  # a refused call leaves the cache as it was
        with pytest.raises(ValueError, match="batch"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="n_positions=128"):
            model.make_cache(1, 129)
        big = model.make_cache(1)
        model(torch.zeros(1, 128, dtype=torch.long), cache=big)
        with pytest.raises(ValueError, match="n_positions=128"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=big)
        other = KVCache(TINY["n_layer"], 1, TINY["n_head"] * 2, 8, TINY["n_embd"] // TINY["n_head"] // 2)
        with pytest.raises(ValueError, match="cache"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=other)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(n_inner=100, activation_function="relu", layer_norm_epsilon=1e-3, n_layer=3, n_embd=48, n_head=6),
        dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
             bos_token_id=1, eos_token_id=2, pad_token_id=3, resid_pdrop=0.0, initializer_range=0.01),
    ],
)
def test_config_from_transformers_dict(kwargs):
    hf_cfg = transformers.GPT2Config(**kwargs)
    ours = GPT2Config.from_dict(hf_cfg.to_dict())
    for f in dataclasses.fields(GPT2Config):
        if f.name == "extra":
            continue
        assert getattr(ours, f.name) == getattr(hf_cfg, f.name), f.name
    assert ours.inner_dim == (hf_cfg.n_inner or 4 * hf_cfg.n_embd)
    # Unknown keys are kept aside, not lost, and not fields.
    assert "summary_type" in ours.extra


def test_config_absent_keys_take_transformers_defaults():
    ours, hf_cfg = GPT2Config.from_dict({}), transformers.GPT2Config()
    for f in dataclasses.fields(GPT2Config):
        if f.name != "extra":
            assert getattr(ours, f.name) == getattr(hf_cfg, f.name), f.name
    partial = GPT2Config.from_dict({"n_layer": 2, "model_type": "gpt2", "something_new": [1, 2]})
    assert partial.n_layer == 2 and partial.n_embd == 768 and partial.extra == {"something_new": [1, 2]}


def test_config_json_round_trip_through_transformers(tmp_path):
    cfg = GPT2Config(vocab_size=300, n_layer=3, n_head=2, n_embd=32, n_inner=50, activation_function="silu",
                     scale_attn_by_inverse_layer_idx=True)
    cfg.to_json_file(tmp_path / "config.json")
    hf_cfg = transformers.GPT2Config.from_pretrained(tmp_path)
    back = GPT2Config.from_json_file(tmp_path / "config.json")
    assert back == cfg
    assert GPT2Config.from_dict(hf_cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data, match",
    [
        (dict(n_embd=100, n_head=12), "n_embd=100.*n_head=12"),
        (dict(activation_function="swish"), "swish"),
        (dict(model_type="bert"), "model_type 'bert' is not GPT-2"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size="50257"), "vocab_size"),
        (dict(n_inner=-1), "n_inner"),
        (dict(attn_pdrop=1.5), "attn_pdrop"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ],
)
def test_config_validation(data, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config.from_dict(data)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config"):
        GPT2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        GPT2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not GPT-2"):
        GPT2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json"):
        GPT2Config.from_json_file(tmp_path / "config.json")


# Published sizes of the official checkpoints (tied head counted once).
OFFICIAL_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "distilgpt2": 81_912_576,
}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_presets_match_transformers_shapes(name):
    cfg = GPT2Config.from_preset(name)
    assert GPT2Config.from_preset(f"openai-community/{name}") == cfg
    with torch.device("meta"):
        ours = GPT2(cfg)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**PRESETS[name]))
    ours_shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert ours_shapes == {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert sum(p.numel() for p in ours.parameters()) == OFFICIAL_PARAMS[name]


def test_unknown_preset():
    with pytest.raises(ValueError, match="gpt3"):
        GPT2Config.from_preset("gpt3")
