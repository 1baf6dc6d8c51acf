"""Activation cache, hooks, logit lens, score and parameter counts, held against transformers."""

from __future__ import annotations

import copy
import math
import struct
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY

import minigpt2
from minigpt2 import GPT2, GPT2Config, Tokenizer
from minigpt2.internals import ActivationCache, describe, parameter_breakdown

L, NH, C = TINY["n_layer"], TINY["n_head"], TINY["n_embd"]
HS = C // NH


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """(our model, transformers' model with eager attention so it can return its weights)."""
    path, hf = tiny_checkpoint
    hf = copy.deepcopy(hf)
    hf.set_attn_implementation("eager")
    return GPT2.from_pretrained(path, device="cpu"), hf.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cached(pair, ids):
    model, _ = pair
    return model.run_with_cache(ids)


@pytest.fixture(scope="module")
def hf_out(pair, ids):
    _, hf = pair
    with torch.no_grad():
        return hf(ids, output_hidden_states=True, output_attentions=True)


# ------------------------------------------------------------------- run_with_cache
def test_cache_has_every_name_with_its_shape(pair, ids, cached):
    model, _ = pair
    logits, acts = cached
    B, T = ids.shape
    assert isinstance(acts, ActivationCache)
    assert list(acts) == model.activation_names()  # every name, pattern included
    per_block = ["resid_pre", "ln_1", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.out", "resid_mid",
                 "ln_2", "mlp.act", "mlp.out", "resid_post"]
    assert list(acts) == ["embed", *(f"h.{i}.{n}" for i in range(L) for n in per_block), "ln_f"]  # forward order
    inner = 4 * C
    for name, t in acts.items():
        local = name.split(".", 2)[-1] if name.startswith("h.") else name
        expected = {
            "attn.q": (B, NH, T, HS), "attn.k": (B, NH, T, HS), "attn.v": (B, NH, T, HS),
            "attn.pattern": (B, NH, T, T), "mlp.act": (B, T, inner),
        }.get(local, (B, T, C))
        assert tuple(t.shape) == expected, name
        assert t.device == model.device and not t.requires_grad
    assert logits.dtype == torch.float32 and logits.shape == (B, T, TINY["vocab_size"])


def test_cache_matches_transformers_hidden_states_and_logits(cached, hf_out):
    logits, acts = cached
    hs = hf_out.hidden_states  # embeddings, each block's output but the last, then ln_f(last)
    assert torch.allclose(acts["embed"], hs[0], atol=1e-5)
    for i in range(L - 1):
        assert torch.allclose(acts[f"h.{i}.resid_post"], hs[i + 1], atol=1e-5), i
        assert torch.equal(acts[f"h.{i + 1}.resid_pre"], acts[f"h.{i}.resid_post"])
    assert torch.allclose(acts["ln_f"], hs[L], atol=1e-5)
    assert torch.allclose(logits, hf_out.logits, atol=1e-4 * hf_out.logits.abs().max())


def test_ln_f_of_last_resid_post_through_unembedding_is_the_logits(pair, cached):
    model, _ = pair
    logits, acts = cached
    with torch.no_grad():
        again = model.lm_head(model.transformer.ln_f(acts[f"h.{L - 1}.resid_post"]))
    assert torch.equal(again, logits)


def test_attention_pattern_rows_sum_to_one_causal_and_equal_transformers(cached, hf_out):
    _, acts = cached
    for i in range(L):
        p = acts[f"h.{i}.attn.pattern"]
        T = p.shape[-1]
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-6)
        above = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        assert (p[..., above] == 0).all()
        assert torch.allclose(p, hf_out.attentions[i], atol=1e-6)


def test_pattern_with_padding_and_layer_scaling_equals_transformers(make_checkpoint):
    path, hf = make_checkpoint(seed=3, scale_attn_by_inverse_layer_idx=True)
    hf = copy.deepcopy(hf)
    hf.set_attn_implementation("eager")
    model = GPT2.from_pretrained(path, device="cpu")
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: ours follows the mask, so give transformers the same positions
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, acts = model.run_with_cache(ids, names=lambda n: n.endswith("pattern"), attention_mask=mask)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    for i in range(L):
        p, q = acts[f"h.{i}.attn.pattern"], theirs.attentions[i]
        assert torch.allclose(p[0], q[0], atol=1e-6)
        assert torch.allclose(p[1, :, 3:], q[1, :, 3:], atol=1e-6)  # the real tokens' rows
        assert (p[1, :, 3:, :3] == 0).all()  # nobody attends to padding
    assert torch.allclose(logits[1, 3:], theirs.logits[1, 3:], atol=1e-4 * theirs.logits.abs().max())


def test_q_k_v_recombine_to_the_pattern_and_the_attention_output(pair, cached):
    model, _ = pair
    _, acts = cached
    for i in range(L):
        q, k, v = (acts[f"h.{i}.attn.{x}"] for x in "qkv")
        T = q.shape[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(HS)  # (B, nh, T, T)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        pattern = F.softmax(scores, dim=-1)
        assert torch.allclose(pattern, acts[f"h.{i}.attn.pattern"], atol=1e-6)
        y = (pattern @ v).transpose(1, 2).reshape(q.shape[0], T, C)  # heads side by side
        with torch.no_grad():
            out = model.transformer.h[i].attn.c_proj(y)
        assert torch.allclose(out, acts[f"h.{i}.attn.out"], atol=1e-5)
        # and the residual bookkeeping
        assert torch.allclose(acts[f"h.{i}.resid_mid"], acts[f"h.{i}.resid_pre"] + acts[f"h.{i}.attn.out"], atol=1e-6)
        assert torch.allclose(acts[f"h.{i}.resid_post"], acts[f"h.{i}.resid_mid"] + acts[f"h.{i}.mlp.out"], atol=1e-6)


def test_names_filter_keeps_only_those_and_stays_on_sdpa(pair, ids, cached, monkeypatch):
    model, _ = pair
    from minigpt2.model import GPT2Attention

    def refuse(*a, **k):
        raise AssertionError("explicit attention ran without a pattern being asked for")

    monkeypatch.setattr(GPT2Attention, "_explicit_attention", refuse)
    logits, acts = model.run_with_cache(ids, names=["h.1.mlp.out", "embed"])
    assert list(acts) == ["embed", "h.1.mlp.out"]  # forward order
    assert torch.equal(acts["h.1.mlp.out"], cached[1]["h.1.mlp.out"]) or torch.allclose(
        acts["h.1.mlp.out"], cached[1]["h.1.mlp.out"], atol=1e-5)
    _, acts = model.run_with_cache(ids, names=lambda n: n.endswith("attn.q"))
    assert list(acts) == [f"h.{i}.attn.q" for i in range(L)]
    _, acts = model.run_with_cache(ids, names="ln_f")
    assert list(acts) == ["ln_f"]
    with pytest.raises(AssertionError, match="explicit"):  # asking for a pattern does take that path
        model.run_with_cache(ids, names=["h.0.attn.pattern"])


def test_unknown_names_are_clear_errors(pair, ids, cached):
    model, _ = pair
    for bad in (["h.99.mlp.out"], ["mlp.out"], ["embed", "nope"]):
        with pytest.raises(ValueError, match="unknown activation name"):
            model.run_with_cache(ids, names=bad)
    with pytest.raises(ValueError, match="names="):
        model.run_with_cache(ids, names=3)
    _, acts = model.run_with_cache(ids, names=["embed"])
    with pytest.raises(KeyError, match="not in this cache"):
        acts["ln_f"]
    with pytest.raises(ValueError):  # the same error is a ValueError too
        acts["ln_f"]


# ---------------------------------------------------------------------------- hooks
def test_zeroing_mlp_out_by_hook_equals_zeroing_c_proj(pair, ids):
    model, hf = pair
    n = 1
    with torch.no_grad(), model.hooks({f"h.{n}.mlp.out": lambda act, name: torch.zeros_like(act)}):
        hooked = model(ids)
    ablated = copy.deepcopy(model)
    hf_ablated = copy.deepcopy(hf)
    with torch.no_grad():
        for m in (ablated.transformer.h[n].mlp.c_proj, hf_ablated.transformer.h[n].mlp.c_proj):
            m.weight.zero_()
            m.bias.zero_()
        ours = ablated(ids)
        theirs = hf_ablated(ids).logits
        plain = model(ids)
    assert torch.allclose(hooked, ours, atol=1e-5)
    assert torch.allclose(hooked, theirs, atol=1e-4 * theirs.abs().max())
    assert not torch.allclose(hooked, plain, atol=1e-3)  # the ablation did something


def test_hooks_get_the_name_are_removed_after_the_block_and_after_an_exception(pair, ids):
    model, _ = pair
    seen = []
    with torch.no_grad():
        plain = model(ids)
        with model.hooks({"h.0.ln_1": lambda a, name: seen.append(name), "ln_f": lambda a, name: seen.append(name)}):
            model(ids)
        assert seen == ["h.0.ln_1", "ln_f"]
        model(ids)
        assert seen == ["h.0.ln_1", "ln_f"]  # gone after the block
        with pytest.raises(RuntimeError, match="boom"):
            with model.hooks({"embed": lambda a, name: torch.zeros_like(a)}):
                raise RuntimeError("boom")
        assert torch.equal(model(ids), plain)  # gone after an exception, too
    def tapped(m):
        return [x for x in m.modules() if getattr(x, "taps", None) is not None]
    assert not tapped(model)


def test_bad_hooks_are_clear_errors(pair, ids):
    model, _ = pair
    with pytest.raises(ValueError, match="unknown activation name"):
        with model.hooks({"h.7.mlp.out": lambda a, n: None}):
            pass
    with torch.no_grad(), pytest.raises(ValueError, match="shape"):
        with model.hooks({"h.0.mlp.out": lambda a, n: a[:, :1]}):
            model(ids)
    with torch.no_grad(), model.hooks({"h.0.mlp.out": lambda a, n: torch.zeros(a.shape, dtype=torch.float64)}):
        model(ids)  # a replacement of another dtype is cast, not an error


def test_patching_through_run_with_cache_shows_downstream_effect(pair, ids, cached):
    model, _ = pair
    logits, acts = model.run_with_cache(
        ids, names=["h.0.mlp.out", "h.1.resid_pre"], hooks={"h.0.mlp.out": lambda a, n: a * 0}
    )
    assert (acts["h.0.mlp.out"] == 0).all()  # the cache records the replacement
    assert torch.allclose(acts["h.1.resid_pre"], cached[1]["h.0.resid_mid"], atol=1e-6)
    assert not torch.allclose(logits, cached[0], atol=1e-3)


def test_run_with_cache_inside_a_hooks_block_sees_the_patch_and_unwinds(pair, ids, cached):
    model, _ = pair
    order = []
    outer = {"h.0.mlp.out": lambda a, n: (order.append("outer"), a * 0)[1], "ln_f": lambda a, n: order.append("ln_f")}
    with model.hooks(outer):
        logits, acts = model.run_with_cache(ids, names=["h.0.mlp.out", "h.1.resid_pre"],
                                            hooks={"h.0.mlp.out": lambda a, n: order.append("inner")})
        assert order == ["outer", "inner", "ln_f"]  # outer block first, then the inner one
        assert (acts["h.0.mlp.out"] == 0).all()
        assert torch.allclose(acts["h.1.resid_pre"], cached[1]["h.0.resid_mid"], atol=1e-6)
        with torch.no_grad():
            assert torch.equal(model(ids), logits)  # the outer hook is still there
    with torch.no_grad():
        assert torch.allclose(model(ids), cached[0], atol=1e-5)  # and gone after its block
    assert not [m for m in model.modules() if getattr(m, "taps", None) is not None]


# ----------------------------------------------------------------------- logit lens
def test_logit_lens_last_row_is_the_models_top_k_and_first_row_the_embeddings(pair, ids):
    model, hf = pair
    lens = minigpt2.logit_lens(model, ids, k=5)
    B, T = ids.shape
    assert lens.names == ["embed"] + [f"h.{i}.resid_post" for i in range(L)]
    assert lens.token_ids.shape == (B, L + 1, T, 5) and lens.probs.shape == (B, L + 1, T, 5)
    with torch.no_grad():
        hf_out = hf(ids, output_hidden_states=True)
        top = F.softmax(hf_out.logits, -1).topk(5, dim=-1)
        emb = F.softmax(hf.lm_head(hf.transformer.ln_f(hf_out.hidden_states[0])), -1).topk(5, dim=-1)
    assert torch.equal(lens.token_ids[:, -1], top.indices)
    assert torch.allclose(lens.probs[:, -1], top.values, atol=1e-5)
    assert torch.equal(lens.token_ids[:, 0], emb.indices)
    assert (lens.probs[..., :-1] >= lens.probs[..., 1:]).all()  # sorted
    assert torch.equal(lens.input_ids, ids)


def test_logit_lens_table_has_a_row_per_layer(vocab_pair):
    model, _, tok = vocab_pair
    ids = torch.tensor(tok.encode("One two three"))  # 1-D: one row
    lens = minigpt2.logit_lens(model, ids, k=2)
    lines = lens.table(tok).splitlines()
    assert [ln.split()[0] for ln in lines] == ["input", "embed", "h.0", "h.1"]
    assert lines[0].split("'")[1::2] == ["One", " two", " three"]
    last = lens.token_ids[0, -1, :, 0].tolist()
    assert all(repr(tok.decode([t])) in lines[-1] for t in last)
    with pytest.raises(ValueError, match="row"):
        lens.table(tok, row=1)


def test_logit_lens_bad_k(pair, ids):
    model, _ = pair
    for bad in (0, -1, TINY["vocab_size"] + 1, 2.0, True):
        with pytest.raises(ValueError, match="k="):
            minigpt2.logit_lens(model, ids, k=bad)


# ---------------------------------------------------------------------------- score
@pytest.fixture(scope="module")
def vocab_pair(gpt2_tiny_vocab_checkpoint):
    path, hf = gpt2_tiny_vocab_checkpoint
    return GPT2.from_pretrained(path, device="cpu"), hf, Tokenizer()


LONG = " ".join(
    f"Sentence {i} says that the {w} is {a} and the morning is {b}." for i, (w, a, b) in enumerate(
        [("river", "cold", "long"), ("city", "bright", "short"), ("forest", "quiet", "grey")] * 12)
)


def hf_window_nll(hf, ids: list[int], n_pos: int, stride: int) -> tuple[float, int]:
    """transformers' sliding-window recipe: loss per window on its last trg_len labels."""
    seq = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + n_pos, len(ids))
        trg_len = end - prev_end
        window = seq[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        n = int((labels[:, 1:] != -100).sum())  # tokens the shifted loss counts
        with torch.no_grad():
            loss = hf(window, labels=labels).loss
        if n:
            nll += float(loss) * n
            count += n
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("stride", [None, 100, 256, 3])
def test_score_equals_transformers_loss_on_the_same_windows(vocab_pair, stride):
    model, hf, tok = vocab_pair
    ids = tok.encode(LONG)
    n_pos = model.config.n_positions
    if stride == 3:  # tiny steps: keep it short
        ids = ids[: n_pos + 9]
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    assert len(ids) > n_pos  # several windows
    r = minigpt2.score(model, tok, text, stride=stride)
    nll, count = hf_window_nll(hf, ids, n_pos, r.stride)
    assert r.stride == (stride or n_pos // 2)
    assert r.count == count and r.token_ids == ids
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    scored = [lp for lp in r.logprobs if lp is not None]
    assert len(r.logprobs) == len(r.tokens) == len(ids) and r.logprobs[0] is None
    assert -math.fsum(scored) == pytest.approx(r.nll)
    if stride != n_pos:
        assert len(scored) == len(ids) - 1  # with overlap, every token but the first is scored


def test_score_short_text_matches_transformers_per_token(vocab_pair):
    model, hf, tok = vocab_pair
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    r = minigpt2.score(model, tok, text)
    t = torch.tensor([ids])
    with torch.no_grad():
        out = hf(t, labels=t)
        lp = F.log_softmax(out.logits[0, :-1], -1).gather(1, t[0, 1:, None])[:, 0]
    assert r.tokens == [tok.decode([i]) for i in ids]
    assert r.logprobs[0] is None
    assert torch.allclose(torch.tensor(r.logprobs[1:]), lp, atol=1e-4)
    assert r.perplexity == pytest.approx(math.exp(float(out.loss)), rel=1e-5)
    assert set(r.to_dict()) == {"tokens", "logprobs", "nll", "perplexity"}


def test_score_bad_inputs(vocab_pair, tiny_checkpoint):
    model, _, tok = vocab_pair
    for text in ("", "Hi"):
        assert len(tok.encode(text)) < 2
        with pytest.raises(ValueError, match="at least 2 tokens"):
            minigpt2.score(model, tok, text)
    for stride in (0, -5, model.config.n_positions + 1, 1.5, True):
        with pytest.raises(ValueError, match="stride"):
            minigpt2.score(model, tok, "Hello there, world", stride=stride)
    with pytest.raises(ValueError, match="str"):
        minigpt2.score(model, tok, [1, 2, 3])
    small = GPT2.from_pretrained(tiny_checkpoint[0], device="cpu")  # vocab 1000 < GPT-2 ids
    with pytest.raises(ValueError, match="vocabulary"):
        minigpt2.score(small, tok, "Hello there, world")


# ----------------------------------------------------------------- parameter counts
def test_num_parameters_of_gpt2_is_transformers_count():
    with torch.device("meta"):
        model = GPT2(GPT2Config())
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    assert model.num_parameters() == 124_439_808 == hf.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    parts = parameter_breakdown(model)
    assert sum(parts.values()) == 124_439_808
    assert list(parts)[:6] == ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1",
                               "transformer.h.0.attn", "transformer.h.0.ln_2", "transformer.h.0.mlp"]
    assert list(parts)[-1] == "transformer.ln_f" and "lm_head" not in parts
    hf_named = dict(hf.named_parameters())
    for key, n in parts.items():
        assert n == sum(p.numel() for k, p in hf_named.items() if k.startswith(key + ".")), key
    assert model.num_parameters(only_trainable=True) == 124_439_808


def test_describe_tree_lines_equal_transformers_print(pair):
    model, hf = pair
    text = describe(model)
    ours = text.split("\n\n")[0].splitlines()[1:]  # the tree section, title dropped
    theirs = str(hf).splitlines()
    assert ours[1:] == theirs[1:]  # every line but the class name on top
    assert f"{hf.num_parameters():,}" in text.split("Parameters")[1]
    explained = describe(model, explain=True)
    for word in ("wte", "wpe", "c_attn", "3 x", "ln_1", "ln_2", "c_fc", "GELU", "ln_f", "tied", "[B, T, 64]"):
        assert word in explained, word
    leaf = [ln for ln in theirs if ln.strip().startswith("(") and ln.rstrip().endswith(")")]
    assert all(ln in explained.splitlines() for ln in leaf)  # the notes are added, never edit a line


# ---------------------------------------------------------------------------- plots
def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_attention_writes_a_png_of_the_requested_size(cached, tmp_path):
    pytest.importorskip("matplotlib")
    from minigpt2.plots import plot_attention

    _, acts = cached
    p = acts["h.0.attn.pattern"][0]
    tokens = [f"t{i}" for i in range(p.shape[-1])]
    assert png_size(plot_attention(p[1], tokens, tmp_path / "one.png", size=(640, 480))) == (640, 480)
    assert png_size(plot_attention(p, tokens, tmp_path / "grid.png", size=(900, 700))) == (900, 700)
    with pytest.raises(ValueError, match="token labels"):
        plot_attention(p, tokens[:-1], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plot_attention(p, tokens, tmp_path / "no" / "x.png")


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, cached, tmp_path):
    from minigpt2.plots import plot_attention

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    p = cached[1]["h.0.attn.pattern"][0, 0]
    with pytest.raises(ImportError, match=r"pip install minigpt2\[viz\]"):
        plot_attention(p, ["a"] * p.shape[-1], tmp_path / "x.png")
