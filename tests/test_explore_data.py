"""The explorer's data functions hold the library's own numbers (minigpt2/explore/data.py).

Each endpoint's dict is checked against the function it claims to come from, on a random
checkpoint with the full GPT-2 vocabulary (so real text tokenizes): tokens against the
Tokenizer, attention against run_with_cache, the lens against logit_lens, step against
sampling, every sweep column against model.generate.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from minigpt2 import GPT2, Tokenizer, logit_lens, sampling
from minigpt2.explore import data
from minigpt2.internals import describe

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def model_and_tok(gpt2_tiny_vocab_checkpoint):
    path, _ = gpt2_tiny_vocab_checkpoint
    return GPT2.from_pretrained(path), Tokenizer.from_pretrained(path)


def decode_f32(o: dict) -> np.ndarray:
    assert o["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(o["base64"]), dtype="<f4").reshape(o["shape"])


def test_tokens_are_the_tokenizers(model_and_tok):
    model, tok = model_and_tok
    text = "Hello  world\n\ttabs, caf\u00e9 \U0001F600<|endoftext|>end"
    t = data.tokens(model, tok, prompt=text)
    assert t["input_ids"] == tok.encode(text)
    assert t["pieces"] == [tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace") for i in t["input_ids"]]
    assert "".join(t["pieces"]).startswith("Hello  world\n\ttabs")  # spaces and newlines kept as they are
    assert t["count"] == len(t["input_ids"]) and t["n_positions"] == 256 and not t["too_long"]
    # A character split over two tokens shows as byte escapes, never as U+FFFD.
    split = [p for p in t["pieces"] if "\\x" in p]
    assert split and all("\ufffd" not in p for p in t["pieces"])
    assert t["text"] == text


def test_tokens_empty_long_and_ids(model_and_tok):
    model, tok = model_and_tok
    empty = data.tokens(model, tok, prompt="")
    assert empty["input_ids"] == [tok.eos_token_id] and "endoftext" in empty["note"]
    long = data.tokens(model, tok, prompt=" a" * 300)
    assert long["too_long"] and long["count"] == 300
    again = data.tokens(model, tok, input_ids=[464, 412])
    assert again["pieces"] == ["The", " E"]
    with pytest.raises(data.BadValue, match="outside the model's vocabulary") as e:
        data.tokens(model, tok, input_ids=[1, 50257])
    assert e.value.param == "input_ids"
    with pytest.raises(data.BadValue, match="prompt must be a string"):
        data.tokens(model, tok, prompt=5)


def test_architecture_is_inspects(model_and_tok):
    model, _ = model_and_tok
    a = data.architecture(model)
    text = describe(model, explain=True)
    for row in a["tree"]:
        assert row["line"] in text
        for note in row["notes"]:
            assert note in text
    by_path = {r["path"]: r for r in a["tree"] if r["path"] is not None}
    assert by_path[""]["parameters"] == model.num_parameters()
    assert by_path["transformer.h.*.attn.c_attn"]["shapes"] == {"weight": [64, 192], "bias": [192]}
    assert by_path["transformer.h.*"]["parameters"] == model.parameter_breakdown()["transformer.h.0.attn"] + sum(
        v for k, v in model.parameter_breakdown().items() if k.startswith("transformer.h.0.") and not k.endswith("attn")
    )
    assert by_path["lm_head"]["parameters"] == 0 and by_path["lm_head"]["tied_to"] == "transformer.wte.weight"
    assert a["num_parameters"] == model.num_parameters()
    assert a["config"]["n_layer"] == 2 and a["config"]["head_dim"] == 16
    gpt2 = a["comparison"]["columns"][0]
    assert (gpt2["n_layer"], gpt2["n_embd"], gpt2["n_positions"], gpt2["num_parameters"]) == ("2", 64, 256, model.num_parameters())


def test_comparison_sizes_are_transformers(model_and_tok):
    """BERT / BART / T5 base sizes, rebuilt with transformers on the meta device and counted."""
    transformers = pytest.importorskip("transformers")
    built = {
        "BERT (bert-base)": (transformers.BertForMaskedLM, transformers.BertConfig()),
        "BART (bart-base)": (transformers.BartForConditionalGeneration, transformers.BartConfig(
            vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)),
        "T5 (t5-base)": (transformers.T5ForConditionalGeneration, transformers.T5Config(
            vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)),
    }
    for column in data.OTHER_FAMILIES:
        cls, config = built[column["model"]]
        with torch.device("meta"):
            m = cls(config)
        assert m.num_parameters() == column["num_parameters"], column["model"]
        assert config.vocab_size == column["vocab_size"]


def test_next_token_logits_are_the_models(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode(PROMPT)
    r = data.next_token(model, ids)
    logits = decode_f32(r["logits"])
    assert logits.shape == (50257,)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0, -1].numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # generate's own first token is the argmax of these logits
    first = model.generate([ids], max_new_tokens=1)[0, -1].item()
    assert int(logits.argmax()) == first


def test_step_is_samplings(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode(PROMPT)
    greedy = data.step(model, tok, ids, mode="greedy", settings={"repetition_penalty": 1.3})
    assert greedy["token_id"] == model.generate([ids], max_new_tokens=1, repetition_penalty=1.3)[0, -1].item()
    assert greedy["input_ids"] == ids + [greedy["token_id"]] and greedy["text"] == tok.decode(greedy["input_ids"])
    settings = {"temperature": 0.7, "top_k": 100, "top_p": 0.6}
    s = data.step(model, tok, ids, mode="sample", settings=settings, seed=123)
    g = torch.Generator().manual_seed(123)
    expect = model.generate([ids], max_new_tokens=1, do_sample=True, generator=g, **settings)[0, -1].item()
    assert s["token_id"] == expect
    logits = data.last_logits(model, ids)
    scores = sampling.process(sampling.Processors(do_sample=True, **settings), torch.tensor([ids]), logits[None],
                              n_new=0, eos_ids=None)
    assert s["kept"] == int((scores > float("-inf")).sum())
    assert s["prob"] == pytest.approx(float(torch.softmax(scores[0], -1)[expect]), rel=1e-6)


@pytest.mark.parametrize("bad, param", [
    ({"temperature": 0}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"), ({"top_p": 0}, "top_p"), ({"top_p": 1.2}, "top_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"typical_p": 0}, "typical_p"), ({"min_p": 2}, "min_p"),
    ({"top_q": 1}, "top_q"), ("warm", "settings"),
])
def test_step_rejects_bad_settings(model_and_tok, bad, param):
    model, tok = model_and_tok
    with pytest.raises(data.BadValue) as e:
        data.step(model, tok, [464], mode="sample", settings=bad, seed=0)
    assert e.value.param == param
    assert param in str(e.value) or param == "settings"


def test_step_rejects_bad_mode_seed_and_length(model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(data.BadValue, match="mode"):
        data.step(model, tok, [464], mode="beam")
    with pytest.raises(data.BadValue, match="seed"):
        data.step(model, tok, [464], mode="sample", seed=-1)
    with pytest.raises(data.BadValue, match="prompt of 256 tokens \\+ 1 new tokens exceeds n_positions=256"):
        data.step(model, tok, [464] * 256, mode="greedy")


def test_min_p_and_typical_p_are_the_library_s(model_and_tok):
    """The panel and the sweep have min-p and typical-p, and a step with them is sampling's."""
    model, tok = model_and_tok
    assert {"min_p", "typical_p"} <= set(data.available_warpers())
    keys = [s.key for s in data.strategies()]
    assert {"min_p-0.1", "min_p-0.05", "typical_p-0.9", "typical_p-0.5"} <= set(keys)
    settings = data.ProcessorSettings.parse({"min_p": 0.2, "typical_p": 0.9, "top_k": 0})
    p = settings.processors(do_sample=True)
    assert p.min_p == 0.2 and p.typical_p == 0.9
    assert data.ProcessorSettings.parse({"typical_p": 1.0}).processors(do_sample=True).typical_p in (None, 1.0)  # 1 = off
    with pytest.raises(data.BadValue, match="min_p"):
        data.ProcessorSettings.parse({"min_p": 1.5})


def test_attention_is_run_with_cache(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode(PROMPT)
    r = data.attention(model, ids, 1)
    pattern = decode_f32(r["pattern"])
    _, acts = model.run_with_cache(torch.tensor([ids]), names=["h.1.attn.pattern"])
    np.testing.assert_array_equal(pattern, acts["h.1.attn.pattern"][0].numpy())
    assert pattern.shape == (4, len(ids), len(ids)) and r["n_head"] == 4
    assert np.all(np.triu(pattern, k=1) == 0)  # the causal mask: no weight on later keys
    for bad in (-1, 2, "0", 1.0):
        with pytest.raises(data.BadValue, match="layer must be an integer in \\[0, 1\\]"):
            data.attention(model, ids, bad)


def test_lens_is_logit_lens(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode(PROMPT)
    r = data.lens(model, ids, 5)
    ref = logit_lens(model, torch.tensor([ids]), k=5)
    assert r["names"] == ["embed", "h.0.resid_post", "h.1.resid_post"]
    assert r["token_ids"] == ref.token_ids[0].tolist()
    np.testing.assert_array_equal(np.array(r["probs"], dtype=np.float32), ref.probs[0].numpy())
    with pytest.raises(data.BadValue, match="exceeds n_positions=256"):
        data.lens(model, [464] * 257)
    with pytest.raises(data.BadValue, match="k must be"):
        data.lens(model, ids, 0)


def test_every_sweep_column_is_generate(model_and_tok):
    model, tok = model_and_tok
    ids = tok.encode(PROMPT)
    n, seed = 6, 7
    for strategy in data.strategies():
        col = data.SweepColumn(model, tok, ids, strategy, n, seed)
        events = []
        while not col.done:
            events.append(col.advance(4))
        made = [t["id"] for e in events for t in e["tokens"]]
        g = torch.Generator().manual_seed(seed) if strategy.sampled else None
        expect = model.generate([ids], max_new_tokens=n, generator=g, **strategy.kwargs)[0, len(ids):].tolist()
        assert made == expect[: len(made)] and len(made) == len(expect), strategy.key
        assert events[-1]["done"] and events[-1]["finish_reason"] in ("eos", "length")
        assert col.advance(4)["tokens"] == []


def test_sweep_probabilities_are_the_processed_distribution(model_and_tok):
    """Each token's probability: softmax(sampling.process(...)) at its step, from a full forward."""
    model, tok = model_and_tok
    ids = tok.encode(PROMPT)
    strategy = next(s for s in data.strategies() if s.key == "top_p-0.75")
    col = data.SweepColumn(model, tok, ids, strategy, 5, 3)
    tokens = []
    while not col.done:
        tokens += col.advance(2)["tokens"]
    seq = ids + [t["id"] for t in tokens]
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0]
    p = sampling.Processors(do_sample=True, temperature=1.0, top_k=0, top_p=0.75)
    for i, t in enumerate(tokens):
        scores = sampling.process(p, torch.tensor([seq[: len(ids) + i]]), logits[len(ids) + i - 1][None], n_new=i, eos_ids=None)
        probs = torch.softmax(scores[0], -1)
        assert t["prob"] == pytest.approx(float(probs[t["id"]]), rel=1e-4)
        assert [a["id"] for a in t["alternatives"]][:1] == [int(probs.argmax())]
        assert t["piece"] == data.piece(tok, t["id"])
    assert "".join(t["text"] for t in tokens) == tok.decode(seq[len(ids):])


def test_sweep_checks(model_and_tok):
    model, _ = model_and_tok
    assert data.check_sweep(model, [464], 30, 0) == ([464], 30, 0)
    with pytest.raises(data.BadValue, match="max_new_tokens"):
        data.check_sweep(model, [464], 0, 0)
    with pytest.raises(data.BadValue, match="prompt of 250 tokens \\+ 30 new tokens exceeds n_positions=256"):
        data.check_sweep(model, [464] * 250, 30, 0)
    with pytest.raises(data.BadValue, match="seed"):
        data.check_sweep(model, [464], 5, "x")


def test_vocabulary_pieces(model_and_tok):
    model, tok = model_and_tok
    v = data.vocabulary(model, tok)
    assert len(v) == model.config.vocab_size
    assert v[464] == "The" and v[198] == "\n" and v[50256] == "<|endoftext|>"
    assert v[tok.encode("\U0001F600")[0]].startswith("\\x")


@pytest.mark.parametrize("ids, where", [([1.5], "input_ids[0] is 1.5"), ([464, True], "input_ids[1] is True"),
                                        ("464", "'464'")])
def test_bad_ids_name_the_element_not_the_container(model_and_tok, ids, where):
    model, _ = model_and_tok
    with pytest.raises(data.BadValue, match="input_ids") as e:
        data.check_ids(model, ids)
    assert where in str(e.value) and "got list" not in str(e.value)
