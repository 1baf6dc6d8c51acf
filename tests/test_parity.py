"""The parity suite as a library: minigpt2.parity and minigpt2.testing against transformers.

The heart: faults that real conversions make, planted into a model, must be named at the
first activation they break (not only at the logits). Every reference value comes from
transformers' GPT2LMHeadModel on the same checkpoint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import TINY
from faults import EXPECTED, FAULTS, plant
from minigpt2 import GPT2
from minigpt2.parity import capture_minigpt2, compare_to_reference, export_reference, load_reference, save_reference
from minigpt2.parity.capture import default_names
from minigpt2.parity.check import generation_check
from minigpt2.parity.report import HALF_FLOOR, HALF_RTOL, compare_tensors, hint
from minigpt2.testing import (
    assert_logits_close,
    compare_to_transformers,
    max_relative_error,
    random_checkpoint,
)

IDS = torch.randint(0, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(checkpoint directory, transformers model) of the TINY config."""
    return tiny_checkpoint


def fresh(path: Path, **kw) -> GPT2:
    return GPT2.from_pretrained(path, device="cpu", **kw)


# ----------------------------------------------------------------------- a clean model
def test_clean_model_passes_every_check(tiny):
    path, hf = tiny
    model = fresh(path)
    report = compare_to_transformers(model, IDS, reference=hf, all_activations=True, grad=True, generate=6)
    assert report.passed, report.table()
    assert report.first_failure is None and report.first_failure_any is None
    # Every activation of the library, in forward order, then the logits.
    assert [r.name for r in report.rows] == model.activation_names() + ["logits"]
    assert all(r.shown for r in report.rows)
    assert max(r.ratio for r in report.rows) <= 1e-6  # the same arithmetic, not just close
    assert {r.name for r in report.grads} == {n for n, _ in model.named_parameters()}
    assert report.loss is not None and report.loss.rel_diff <= 1e-6
    g = report.generation
    assert g is not None and g.first_diff_step is None and len(g.ours) == 6 and g.ours == g.reference
    assert report.top1 is not None and report.top1.agreement == 1.0 and not report.top1.judged
    text = report.table()
    assert text.rstrip().endswith("PASS: everything within tolerance")
    json.dumps(report.to_dict())  # the JSON form serialises


def test_default_table_shows_the_stream_and_compares_everything(tiny):
    path, hf = tiny
    model = fresh(path)
    report = compare_to_transformers(model, IDS, reference=hf)
    shown = [r.name for r in report.rows if r.shown]
    assert shown == default_names(TINY["n_layer"]) + ["logits"]
    assert shown == ["embed", "h.0.resid_mid", "h.0.resid_post", "h.1.resid_mid", "h.1.resid_post", "ln_f", "logits"]
    # Everything else is still compared, to narrow a failure down: patterns included.
    assert {r.name for r in report.rows} == set(model.activation_names()) | {"logits"}


# ------------------------------------------------------------------ planted faults
@pytest.mark.parametrize("fault", FAULTS)
def test_planted_fault_is_named_where_it_first_breaks(tiny, fault):
    path, hf = tiny
    first_shown, first_any = EXPECTED[fault]
    report = compare_to_transformers(plant(fresh(path), fault), IDS, reference=hf)
    assert not report.passed
    assert report.first_failure == first_shown, report.table()
    assert report.first_failure_any == first_any, report.table()
    # Everything before the fault passes, the fault is far past the tolerance, not a rounding.
    names = [r.name for r in report.rows]
    before = names[: names.index(first_any)]
    assert all(r.passed for r in report.rows if r.name in before)
    bad = next(r for r in report.rows if r.name == first_any)
    assert bad.ratio > 100 * report.rtol
    # The same fault with every activation in the table: the table itself names it.
    full = compare_to_transformers(plant(fresh(path), fault), IDS, reference=hf, all_activations=True)
    assert full.first_failure == first_any
    verdict = "\n".join(full.verdict_lines())
    assert f"FAIL: first past tolerance: {first_any}" in verdict
    assert full.hint and full.hint in verdict


def test_hints_name_the_part_that_usually_breaks():
    assert "ln_2" in hint("h.1.ln_2") and "block 1" in hint("h.1.ln_2")
    assert "c_attn" in hint("h.0.attn.k") and "[B, nh, T, hs]" in hint("h.0.attn.k")
    assert "1/sqrt(head_dim)" in hint("h.3.attn.pattern")
    assert "wpe" in hint("embed") and "wte" in hint("logits")
    assert hint("not.a.name") == ""


def test_reference_none_checks_the_computation_on_the_models_own_weights(tiny):
    """reference=None builds transformers from the model's own weights: a weight fault then
    agrees with itself, a code fault does not."""
    path, _ = tiny
    weights = compare_to_transformers(plant(fresh(path), "ln_2 bias dropped in block 1"), IDS)
    assert weights.passed, weights.table()
    code = compare_to_transformers(plant(fresh(path), "unscaled attention"), IDS)
    assert code.first_failure_any == "h.0.attn.pattern"
    # A checkpoint path as the reference: transformers loads the original files.
    by_path = compare_to_transformers(plant(fresh(path), "wpe off by one position"), IDS, reference=path)
    assert by_path.first_failure == "embed"


def test_gradient_only_fault_is_found_by_grad(tiny):
    """A forward that is right but cuts the gradient (a detach of block 1's MLP output): the
    table passes, the gradients name block 1's ln_2 and MLP parameters."""
    path, hf = tiny
    model = fresh(path)
    with model.hooks({"h.1.mlp.out": lambda act, name: act.detach()}):
        report = compare_to_transformers(model, IDS, reference=hf, grad=True)
    assert all(r.passed for r in report.rows)
    assert report.loss.passed
    assert not report.passed and report.first_failure is None
    # Everything between the detach and the loss gets no gradient at all (ratio 1).
    cut = {f"transformer.h.1.{m}.{p}" for m in ("ln_2", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")}
    assert {r.name for r in report.grads if r.ratio == 1.0} == cut
    assert {r.name for r in report.worst_grads(5)} <= cut
    assert "gradients" in report.table()


# --------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_judged_by_top1_agreement(make_checkpoint, dtype):
    path, hf = make_checkpoint(seed=4, n_layer=3, n_embd=96, n_head=6)
    report = compare_to_transformers(fresh(path, dtype=dtype), IDS, reference=hf)
    assert report.top1 is not None and report.top1.judged
    # Each row's limit: 4x how far transformers' own model in this dtype is from float32.
    limits = {r.name: r.limit for r in report.rows}
    assert len(set(limits.values())) > 1 and min(limits.values()) >= HALF_FLOOR[dtype]
    assert "limit" in report.table() and "transformers' own" in report.tolerance
    logits = next(r for r in report.rows if r.name == "logits")
    assert logits.ratio > 1e-4  # the float32 tolerance could not hold ...
    assert report.passed, report.table()  # ... and is not applied
    assert "top-1 agreement" in report.table()


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_fault_in_bfloat16_is_named_where_it_first_breaks(make_checkpoint, fault):
    """Half precision blurs every row, yet each fault still stands out where it first breaks
    (in this small model some faults move the residual stream less than bf16's own noise,
    so only the narrowing-down over every activation shows them)."""
    path, hf = make_checkpoint(seed=4, n_layer=3, n_embd=96, n_head=6)
    report = compare_to_transformers(plant(fresh(path, dtype=torch.bfloat16), fault), IDS, reference=hf)
    assert not report.passed
    first_shown, first_any = EXPECTED[fault]
    assert report.first_failure_any == first_any, report.table()
    assert report.first_failure in (first_shown, None)
    assert first_any in "\n".join(report.verdict_lines())


# ------------------------------------------------------------------------ generation
def _tied_tokens_checkpoint(tmp_path: Path, hf) -> tuple[Path, int, int]:
    """A checkpoint whose tokens a < b have identical wte rows (so their logits tie exactly)
    and a is the greedy pick after IDS."""
    with torch.no_grad():
        a = int(hf(IDS).logits[0, -1].argmax())
    b = next(t for t in range(a + 1, TINY["vocab_size"]) if t not in IDS.tolist()[0])
    clone = copy.deepcopy(hf)
    with torch.no_grad():
        clone.transformer.wte.weight[b] = clone.transformer.wte.weight[a]
    clone.save_pretrained(tmp_path)
    return tmp_path, a, b


def _raise_head_row(model: GPT2, token: int, eps: float) -> None:
    """Untie the head and lift one token's row so its logit rises by ~eps x sum|ln_f|."""
    head = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        _, acts = model.run_with_cache(IDS, names=["ln_f"])
        head[token] += eps * acts["ln_f"][0, -1].sign()
    model.lm_head.weight = torch.nn.Parameter(head)


def test_generation_near_tie_is_reported_as_one(tmp_path, tiny):
    _, hf = tiny
    path, a, b = _tied_tokens_checkpoint(tmp_path, hf)
    ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    model = fresh(path)
    _raise_head_row(model, b, 1e-7)  # far inside the logit tolerance: a tie broken the other way
    g = generation_check(model, ref, IDS, 4)
    assert g.first_diff_step == 0 and (g.ours_token, g.ref_token) == (b, a)
    assert g.ref_margin == 0.0 and g.ours_margin > 0
    assert g.near_tie and g.passed
    report = compare_to_transformers(model, IDS, reference=ref, generate=4)
    assert report.passed and "near-tie" in report.table()


def test_generation_difference_beyond_the_tolerance_fails(tmp_path, tiny):
    _, hf = tiny
    path, a, b = _tied_tokens_checkpoint(tmp_path, hf)
    ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    model = fresh(path)
    _raise_head_row(model, b, 1e-2)  # the same flip, by a logit change no rounding explains
    g = generation_check(model, ref, IDS, 4)
    assert g.first_diff_step == 0 and not g.near_tie and not g.passed
    assert g.logits_diff > g.tie_bound


# ------------------------------------------------------------------ reference files
def test_reference_file_holds_everything_documented(tmp_path, tiny):
    path, hf = tiny
    ref_file = export_reference(tmp_path / "ref.safetensors", path, IDS, text="some text")
    model = fresh(path)
    params = [n for n, _ in model.named_parameters()]
    with safe_open(str(ref_file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    expected = (["input_ids", "targets"] + model.activation_names() + ["logits", "loss"]
                + [f"grad.{n}" for n in params])
    assert sorted(keys) == sorted(expected)
    assert meta["format"] == "minigpt2-parity" and meta["format_version"] == "1"
    header, config = json.loads(meta["header"]), json.loads(meta["config"])
    assert header["names"] == expected and header["text"] == "some text"
    assert {"minigpt2", "torch", "transformers"} <= set(header["versions"])
    assert config["n_layer"] == TINY["n_layer"] and config["model_type"] == "gpt2"
    B, T, C, nh = 1, IDS.shape[1], TINY["n_embd"], TINY["n_head"]
    assert header["shapes"]["h.0.attn.q"] == [B, nh, T, C // nh]
    assert header["shapes"]["h.1.attn.pattern"] == [B, nh, T, T]
    assert header["shapes"]["h.0.mlp.act"] == [B, T, 4 * C]
    assert tensors["input_ids"].dtype == torch.int64 and torch.equal(tensors["input_ids"], IDS)
    assert torch.equal(tensors["targets"][0, :-1], IDS[0, 1:]) and tensors["targets"][0, -1] == -100
    assert tensors["loss"].shape == () and tensors["logits"].dtype == torch.float32
    # The file's numbers are transformers' own (eager attention there, SDPA here: rounding apart).
    with torch.no_grad():
        out = hf(IDS, labels=IDS)
    assert_logits_close(tensors["logits"], out.logits, rtol=1e-6)
    assert tensors["loss"].item() == pytest.approx(out.loss.item(), rel=1e-6)
    for n in params:
        assert tensors[f"grad.{n}"].shape == dict(model.named_parameters())[n].shape


def test_model_against_reference_file(tmp_path, tiny):
    path, _ = tiny
    ref_file = export_reference(tmp_path / "ref.safetensors", path, IDS)
    clean = compare_to_reference(ref_file, model=fresh(path), grad=True)
    assert clean.passed, clean.table()
    assert len(clean.grads) == len(list(fresh(path).parameters()))
    broken = compare_to_reference(ref_file, model=plant(fresh(path), "q and k swapped in c_attn of block 0"))
    assert (broken.first_failure, broken.first_failure_any) == ("h.0.resid_mid", "h.0.attn.q")


def _dump(model: GPT2, path: Path, keep=None, transform=None) -> Path:
    """What another implementation writes: its tensors under the reference's names."""
    cap = capture_minigpt2(model, IDS, grad=True)
    tensors = {"input_ids": cap.input_ids, **cap.activations, "logits": cap.logits, "loss": cap.loss}
    tensors.update({f"grad.{n}": g for n, g in cap.grads.items()})
    if keep is not None:
        tensors = {k: v for k, v in tensors.items() if k in keep}
    if transform is not None:
        tensors = transform(tensors)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


def test_dump_with_any_subset_of_names(tmp_path, tiny):
    path, _ = tiny
    ref_file = export_reference(tmp_path / "ref.safetensors", path, IDS)
    # A port that writes only a few tensors, one row without the batch dimension.
    dump = _dump(fresh(path), tmp_path / "few.safetensors", keep={"embed", "h.1.ln_2", "logits"},
                 transform=lambda t: {k: v[0] for k, v in t.items()})
    report = compare_to_reference(ref_file, dump=dump)
    assert report.passed, report.table()
    assert [r.name for r in report.rows] == ["embed", "h.1.ln_2", "logits"]
    assert "h.0.attn.q" in report.missing and "not provided" in report.table()
    # The same port with a fault: named among the names it provides.
    faulty = _dump(plant(fresh(path), "ln_2 bias dropped in block 1"), tmp_path / "bad.safetensors",
                   keep={"embed", "h.1.ln_2", "logits"})
    report = compare_to_reference(ref_file, dump=faulty)
    assert report.first_failure_any == "h.1.ln_2" and not report.passed
    # Gradients from a dump.
    full = compare_to_reference(ref_file, dump=_dump(fresh(path), tmp_path / "all.safetensors"), grad=True)
    assert full.passed and full.loss.passed and len(full.grads) > 0


def test_dump_in_another_layout_fails_with_the_shapes(tmp_path, tiny):
    path, _ = tiny
    ref_file = export_reference(tmp_path / "ref.safetensors", path, IDS)
    # q stored [B, T, nh, hs] instead of [B, nh, T, hs].
    dump = _dump(fresh(path), tmp_path / "layout.safetensors", keep={"embed", "h.0.attn.q"},
                 transform=lambda t: {**t, "h.0.attn.q": t["h.0.attn.q"].transpose(1, 2)})
    report = compare_to_reference(ref_file, dump=dump, all_activations=True)
    row = next(r for r in report.rows if r.name == "h.0.attn.q")
    assert not row.passed and "shape [1, 20, 4, 16], reference [1, 4, 20, 16]" in row.note
    assert "another order" in row.note and report.first_failure == "h.0.attn.q"


def test_dump_of_other_input_ids_is_refused(tmp_path, tiny):
    path, _ = tiny
    ref_file = export_reference(tmp_path / "ref.safetensors", path, IDS)
    other = _dump(fresh(path), tmp_path / "other.safetensors",
                  transform=lambda t: {**t, "input_ids": t["input_ids"].flip(-1)})
    with pytest.raises(ValueError, match="different input ids"):
        compare_to_reference(ref_file, dump=other)


def test_half_precision_dump_is_judged_by_top1(tmp_path, tiny):
    path, _ = tiny
    ref_file = export_reference(tmp_path / "ref.safetensors", path, IDS)
    dump = _dump(fresh(path, dtype=torch.bfloat16), tmp_path / "bf16.safetensors", keep={"embed", "ln_f", "logits"},
                 transform=lambda t: {k: v.bfloat16() for k, v in t.items()})
    report = compare_to_reference(ref_file, dump=dump)
    assert report.dtype == "bfloat16" and report.top1.judged
    assert all(r.limit == HALF_RTOL[torch.bfloat16] for r in report.rows)  # no half run to measure: fixed
    no_logits = _dump(fresh(path, dtype=torch.bfloat16), tmp_path / "bf16_acts.safetensors", keep={"embed", "ln_f"},
                      transform=lambda t: {k: v.bfloat16() for k, v in t.items()})
    report = compare_to_reference(ref_file, dump=no_logits)
    assert report.dtype == "bfloat16" and report.passed, report.table()
    assert report.passed, report.table()


def test_reference_file_errors(tmp_path, tiny):
    path, _ = tiny
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        compare_to_reference(tmp_path / "nope.safetensors", model=fresh(path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_reference(bad)
    no_ids = tmp_path / "no_ids.safetensors"
    save_file({"logits": torch.zeros(1, 2, 3)}, str(no_ids))
    with pytest.raises(ValueError, match="no input_ids"):
        load_reference(no_ids)
    float_ids = tmp_path / "float_ids.safetensors"
    save_file({"input_ids": torch.zeros(1, 3)}, str(float_ids))
    with pytest.raises(ValueError, match="integer token ids"):
        load_reference(float_ids)
    no_grads = save_reference(capture_minigpt2(fresh(path), IDS), tmp_path / "nograd.safetensors")
    with pytest.raises(ValueError, match="no gradients"):
        compare_to_reference(no_grads, model=fresh(path), grad=True)
    with pytest.raises(ValueError, match="exactly one"):
        compare_to_reference(no_grads)


def test_compare_errors(tiny):
    path, _ = tiny
    model = fresh(path)
    with pytest.raises(ValueError, match="reference must be"):
        compare_to_transformers(model, IDS, reference=42)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compare_to_transformers(model, torch.tensor([[1, TINY["vocab_size"]]]), reference=path)
    with pytest.raises(ValueError, match="positive number of tokens"):
        generation_check(model, model, IDS, 0)


# ------------------------------------------------------------------ minigpt2.testing
def test_random_checkpoint_is_transformers_saved_perturbed_and_reproducible(tmp_path):
    state = torch.random.get_rng_state()
    a = random_checkpoint(tmp_path / "a", seed=3, n_layer=1)
    b = random_checkpoint(tmp_path / "b", seed=3, n_layer=1)
    c = random_checkpoint(tmp_path / "c", seed=4, n_layer=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert {"config.json", "model.safetensors"} <= {f.name for f in a.iterdir()}
    assert json.loads((a / "config.json").read_text())["n_layer"] == 1
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb, \
            safe_open(str(c / "model.safetensors"), "pt") as fc:
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
        assert not torch.equal(fa.get_tensor("transformer.h.0.ln_1.bias"), fc.get_tensor("transformer.h.0.ln_1.bias"))
        for k in fa.keys():  # nothing hides behind 0 and 1
            t = fa.get_tensor(k)
            if k.endswith(".bias") or ".ln_" in k:
                assert not torch.all(t == 0) and not torch.all(t == 1), k
    assert fresh(a).config.n_layer == 1


def test_assert_logits_close_and_max_relative_error():
    ref = torch.tensor([[1.0, -2.0, 4.0]])
    assert max_relative_error(ref, ref) == 0.0
    assert max_relative_error(ref + 0.0004, ref) == pytest.approx(1e-4, rel=1e-3)
    assert assert_logits_close(ref + 0.0002, ref) == pytest.approx(5e-5, rel=1e-3)
    with pytest.raises(AssertionError, match=r"logits: max .* is 2\.500e-04 x max .* \(limit 1e-04\).*index \[0, 1\]"):
        assert_logits_close(ref + torch.tensor([[0.0, 0.001, 0.0]]), ref)
    with pytest.raises(AssertionError, match="shape"):
        assert_logits_close(ref[0], ref)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_logits_close(ref * float("nan"), ref)
    assert assert_logits_close(ref.bfloat16(), ref, rtol=1e-2, what="bf16") <= 1e-2
    assert max_relative_error(torch.ones(2), torch.zeros(2)) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        max_relative_error(torch.ones(2), torch.ones(3))


def test_compare_tensors_edge_cases():
    row = compare_tensors("x", torch.tensor([float("nan"), 1.0]), torch.ones(2), 1e-4)
    assert not row.passed and "non-finite" in row.note
    row = compare_tensors("x", torch.zeros(2), torch.zeros(2), 1e-4)
    assert row.passed and row.ratio == 0.0
    row = compare_tensors("x", torch.ones(2, 3), torch.ones(1, 2, 3), 1e-4)  # a dump without the batch dim
    assert row.passed
