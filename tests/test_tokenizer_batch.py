"""The API batches and servers use: the transformers-shaped call (padding, truncation, tensors),
``decode_with_offsets``, token / id conversion, ``batch_decode``, and the batch call feeding
``generate``. Held against transformers' tokenizer call and tiktoken's ``decode_with_offsets``.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt2 import GPT2, Tokenizer
from minigpt2.tokenizer import BatchEncoding

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parent.parent / "minigpt2" / "data"
EOT = "<|endoftext|>"
TEXTS = ["Hello world, this is a longer line of text", "Hi", "", f"two{EOT}specials{EOT}", "  spaces\n\nand lines ",
         "émoji 👍🏽 中文"]  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def hf() -> Any:
    hf = transformers.AutoTokenizer.from_pretrained(str(DATA))
    hf.pad_token = hf.eos_token  # transformers needs one to pad; minigpt2 pads with EOS without one
    return hf


def _plain(batch: Any) -> dict[str, Any]:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in batch.items()}


CALLS = [
    dict(padding=padding, truncation=truncation, max_length=max_length, padding_side=side)
    for padding, truncation, max_length, side in itertools.product(
        [False, True, "longest", "max_length"], [None, True, False], [None, 3, 8], ["left", "right"]
    )
    if not (padding == "max_length" and max_length is None)  # would pad every row to 1024
]


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # transformers' note on padding=True + max_length
@pytest.mark.parametrize("kwargs", CALLS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_call_matches_transformers(tok: Tokenizer, hf: Any, kwargs: dict[str, Any]) -> None:
    assert _plain(tok(TEXTS, **kwargs)) == _plain(hf(TEXTS, **kwargs))
    assert _plain(tok(TEXTS[0], **kwargs)) == _plain(hf(TEXTS[0], **kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [dict(padding=True, return_tensors="pt"), dict(padding=True, padding_side="left", return_tensors="np"),
     dict(padding=True, pad_to_multiple_of=4), dict(padding="max_length", max_length=12, pad_to_multiple_of=4),
     dict(padding=True, return_attention_mask=False), dict(truncation=True, max_length=2, padding=True, return_tensors="pt"),
     dict(padding="do_not_pad"), dict(truncation="only_first", max_length=4), dict(padding=True, truncation="do_not_truncate")],
)  # fmt: skip
def test_call_options_match_transformers(tok: Tokenizer, hf: Any, kwargs: dict[str, Any]) -> None:
    ours, theirs = tok(TEXTS, **kwargs), hf(TEXTS, **kwargs)
    assert _plain(ours) == _plain(theirs)
    for key, value in ours.items():
        if kwargs.get("return_tensors") == "pt":
            assert value.dtype == torch.int64 and value.shape == theirs[key].shape
    single = tok("Hello world", return_tensors="pt")
    assert single.input_ids.shape == (1, 2) and single["attention_mask"].tolist() == [[1, 1]]


def test_truncation_side_left(tok: Tokenizer, hf: Any) -> None:
    ours = Tokenizer()
    ours.truncation_side = hf.truncation_side = "left"
    try:
        assert _plain(ours(TEXTS, truncation=True, max_length=3, padding=True)) == _plain(
            hf(TEXTS, truncation=True, max_length=3, padding=True)
        )
    finally:
        hf.truncation_side = "right"


def test_padding_without_a_pad_token_uses_eos(tok: Tokenizer) -> None:
    assert tok.pad_token is None and tok.pad_token_id is None  # GPT-2 declares none, as transformers says
    batch = tok(["a b c", "a"], padding=True, padding_side="left")
    assert batch["input_ids"][1][:2] == [tok.eos_token_id] * 2 and batch["attention_mask"][1] == [0, 0, 1]
    other = Tokenizer()
    other.pad_token = "!"
    assert other.pad_token_id == 0 and other(["a b", "a"], padding=True)["input_ids"][1] == [64, 0]
    with pytest.raises(ValueError, match="not a token"):
        other.pad_token = "<not in the vocabulary>"


def test_batch_encoding_is_a_dict_with_attributes(tok: Tokenizer) -> None:
    batch = tok(["a", "b c"], padding=True, return_tensors="pt")
    assert isinstance(batch, BatchEncoding) and isinstance(batch, dict)
    assert batch.input_ids is batch["input_ids"] and set(batch) == {"input_ids", "attention_mask"}
    moved = batch.to("cpu")
    assert torch.equal(moved.attention_mask, batch.attention_mask)
    with pytest.raises(AttributeError, match="token_type_ids"):
        batch.token_type_ids  # noqa: B018
    assert tok([], padding=True) == {"input_ids": [], "attention_mask": []}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [(dict(padding="yes"), ValueError, "padding='yes'"), (dict(truncation="only_second", max_length=2), ValueError, "only_second"),
     (dict(return_tensors="pt"), ValueError, "padding=True"), (dict(return_tensors="tf", padding=True), ValueError, "'tf'"),
     (dict(padding=True, padding_side="middle"), ValueError, "padding_side='middle'"),
     (dict(max_length=0), ValueError, "max_length=0"), (dict(padding=True, pad_to_multiple_of=-2), ValueError, "pad_to_multiple_of"),
     (dict(padding=True, truncation=True, max_length=6, pad_to_multiple_of=4), ValueError, "multiple of 4")],
)  # fmt: skip
def test_call_bad_values(tok: Tokenizer, kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        tok(TEXTS, **kwargs)


def test_call_bad_text(tok: Tokenizer) -> None:
    for bad in (None, 3, [b"bytes"], ["ok", 1], [["nested"]]):
        with pytest.raises(TypeError, match="str"):
            tok(bad)  # type: ignore[arg-type]


def test_left_padded_batch_is_ready_for_generate(gpt2_tiny_vocab_checkpoint: Any) -> None:
    """Each row of tok(..., padding=True, padding_side="left") generates what it does alone."""
    path, _ = gpt2_tiny_vocab_checkpoint
    model = GPT2.from_pretrained(path, device="cpu")
    tok = Tokenizer()
    prompts = ["The quick brown fox", "Hi", "A somewhat longer prompt than the others"]
    batch = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, eos_token_id=None)
    width = batch.input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        alone = model.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=4, eos_token_id=None)
        assert out[row, width:].tolist() == alone[0, -4:].tolist()


# -- decode_with_offsets ------------------------------------------------------------------------
def _tiktoken_reference(tok: Tokenizer) -> Any:
    """tiktoken's own Encoding over GPT-2's ranks (which are its ids), for its decode_with_offsets."""
    import tiktoken

    ranks = {tok.decode_bytes([i]): i for i in range(50256)}
    return tiktoken.Encoding("gpt2-ref", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={EOT: 50256})


def test_decode_with_offsets_matches_tiktoken(tok: Tokenizer) -> None:
    reference = _tiktoken_reference(tok)
    texts = [*TEXTS, "👨\u200d👩\u200d👧 family", "a" * 50, "中文文本：你好，世界！", "e\u0301\u0301 combining", ""]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode_with_offsets(ids) == reference.decode_with_offsets(ids), text


def test_decode_with_offsets_on_split_and_broken_characters(tok: Tokenizer) -> None:
    emoji = tok.encode("a😀b")  # "a", three byte tokens of the emoji (one of them two bytes), "b"
    text, offsets = tok.decode_with_offsets(emoji)
    assert text == "a😀b" and offsets[0] == 0 and offsets[-1] == 2 and set(offsets[1:-1]) == {1}
    rng = random.Random(3)
    for _ in range(300):  # arbitrary ids: invalid UTF-8, U+FFFD in the text, skipped specials
        ids = [rng.choice([rng.randrange(256), rng.randrange(50257), 50256]) for _ in range(rng.randint(0, 12))]
        skip = rng.random() < 0.5
        text, offsets = tok.decode_with_offsets(ids, skip_special_tokens=skip)
        assert text == tok.decode(ids, skip_special_tokens=skip)
        assert len(offsets) == len(ids) and offsets == sorted(offsets)
        assert all(0 <= o <= len(text) for o in offsets)
        for i, (token, offset) in enumerate(zip(ids, offsets)):
            # The text before a token is what the ids before it decode to, less any character the
            # token itself completes or breaks: never more.
            before = tok.decode(ids[:i], skip_special_tokens=skip)
            assert text[:offset] == before[:offset], (ids, i)
            if skip and token == 50256:
                assert offset == (offsets[i + 1] if i + 1 < len(ids) else len(text))
    assert tok.decode_with_offsets([]) == ("", [])
    assert tok.decode_with_offsets([50256, 15496], skip_special_tokens=True) == ("Hello", [0, 0])


# -- conversions --------------------------------------------------------------------------------
def test_token_id_conversions_match_transformers(tok: Tokenizer, hf: Any) -> None:
    ids = tok.encode(" ".join(TEXTS))
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])
    assert tok.convert_ids_to_tokens(torch.tensor(ids)) == tokens
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tok.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens) == ids
    assert tok.convert_tokens_to_ids("Ġworld") == 995
    assert tok.convert_tokens_to_ids("not a token") == hf.convert_tokens_to_ids("not a token") == 50256  # unk
    assert tok.get_vocab() == hf.get_vocab()
    with pytest.raises(ValueError, match="50257"):
        tok.convert_ids_to_tokens([50257])


def test_batch_decode(tok: Tokenizer, hf: Any) -> None:
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert tok.batch_decode(batch.input_ids) == hf.batch_decode(batch.input_ids)
    assert tok.batch_decode(batch.input_ids, skip_special_tokens=True) == hf.batch_decode(batch.input_ids, skip_special_tokens=True)
