"""The tokenizer of any fine-tune: directories saved by transformers 5 after ``add_tokens`` /
``add_special_tokens`` (with AddedToken flags), the older layouts, the choices transformers
makes between the files, save/load round trips both ways, the Hub cache, and bad directories.

Every expected value comes from transformers' own tokenizer loaded from the same directory.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minigpt2 import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AddedToken as HFAddedToken  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "minigpt2" / "data"
EOT = "<|endoftext|>"

# Fine-tunes as people make them: transformers 5 loads GPT-2's tokenizer, adds tokens, saves.
VARIANTS: dict[str, Callable[[Any], Any]] = {
    "pad token": lambda t: t.add_special_tokens({"pad_token": "<pad>"}),
    "flags": lambda t: t.add_tokens([
        HFAddedToken("<|pad|>", lstrip=True),
        HFAddedToken("foo", rstrip=True, special=False),  # already in the vocabulary
        HFAddedToken("<x>", lstrip=True, rstrip=True, special=True, normalized=False),
        HFAddedToken("word", single_word=True),
        HFAddedToken("café"),  # not byte-level: decodes as transformers decodes it
        HFAddedToken(" sp"),
    ]),
    "chat": lambda t: t.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "pad_token": "<|pad|>"}
    ),
    "overlapping": lambda t: t.add_tokens([
        HFAddedToken("<a>", normalized=False), HFAddedToken("<a><b>", normalized=True), HFAddedToken("a>", normalized=False),
        HFAddedToken("ab"), HFAddedToken("abc", special=True),
    ]),
}  # fmt: skip

POOL = ["<pad>", "<|pad|>", "foo", "<x>", "word", "café", " sp", "<a>", "<b>", "a>", "ab", "abc", "<|im_start|>",
        "<|im_end|>", EOT, " ", "  ", "\n", "\t", "\u3000", "x", "é", "_", "1", ".", "words"]  # fmt: skip
TEXTS = [
    "<pad>", " a <|pad|> b", "x  foo   y", "food", "<x>  z", "  <x>", "a word b", "awordb", "word_x", "wordé",
    "a café b", " sp sp", "<a><b>", "x<a><b>y", "abc abcd ab", "<|im_start|>user\nhi<|im_end|>\n",
    f"{EOT} {EOT}", "no added tokens at all", "\t<|pad|>\n\n", "\u3000<x>\u3000", "",
]  # fmt: skip
_rng = random.Random(0)
TEXTS += ["".join(_rng.choice(POOL) for _ in range(_rng.randint(1, 12))) for _ in range(200)]


def _hf_base() -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(DATA))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant saved by transformers' save_pretrained (tokenizer.json + tokenizer_config.json)."""
    out = {}
    for name, change in VARIANTS.items():
        tok = _hf_base()
        change(tok)
        out[name] = tmp_path_factory.mktemp("ft")
        tok.save_pretrained(str(out[name]))
    return out


def assert_same_as_transformers(ours: Tokenizer, hf: Any, texts: list[str] = TEXTS) -> None:
    """Ids, text, special tokens and vocabulary: everything a user reads off a tokenizer."""
    expected = hf(texts, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(texts) == expected
    assert ours(texts)["input_ids"] == hf(texts)["input_ids"]
    assert ours.batch_decode(expected) == hf.batch_decode(expected)
    assert ours.batch_decode(expected, skip_special_tokens=True) == hf.batch_decode(expected, skip_special_tokens=True)
    for ids in expected[:60]:
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
    for attr in ("eos_token", "eos_token_id", "bos_token_id", "unk_token_id", "pad_token", "pad_token_id",
                 "all_special_tokens", "all_special_ids"):  # fmt: skip
        assert getattr(ours, attr) == getattr(hf, attr), attr
    assert ours.n_vocab == len(hf)
    assert ours.get_vocab() == hf.get_vocab()
    flags = {i: (t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special) for i, t in ours.added_tokens_decoder.items()}
    theirs = {i: (t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special) for i, t in hf.added_tokens_decoder.items()}
    assert flags == theirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_by_transformers_5(saved: dict[str, Path], variant: str) -> None:
    directory = saved[variant]
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert_same_as_transformers(Tokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(str(directory)))


def test_the_issues_pad_token(saved: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(saved["pad token"])
    assert tok.encode("<pad>") == [50257]  # was [27, 15636, 29]: the packaged vocab.json served instead
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 50257
    assert tok.decode([50257, 15496], skip_special_tokens=True) == "Hello"


def test_lstrip_swallows_the_spaces_around(saved: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(saved["flags"])
    pad = tok.convert_tokens_to_ids("<|pad|>")
    assert tok.encode(" a <|pad|> b") == [257, pad, 275]  # " a", "<|pad|>" with its space, " b"
    assert tok.encode(" a <|pad|> b", allowed_special=set()) == [257, pad, 275]  # not special: still matched


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_round_trip(saved: dict[str, Path], variant: str, tmp_path: Path) -> None:
    ours = Tokenizer.from_pretrained(saved[variant])
    ours.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(names)
    # Both worlds read the saved directory back with the ids, flags and special tokens of the
    # original (assert_same_as_transformers held `ours` against transformers on the original).
    assert_same_as_transformers(Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path)))
    if variant in ("flags", "chat"):
        # A reader of the older layout too (no tokenizer.json: vocab.json + merges.txt with the
        # added tokens declared in tokenizer_config.json / added_tokens.json).
        (tmp_path / "tokenizer.json").unlink()
        hf_old = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        assert_same_as_transformers(Tokenizer.from_pretrained(tmp_path), hf_old, TEXTS[:40])


def test_vocab_merges_layout_with_added_tokens_json(tmp_path: Path) -> None:
    """The layout of older fine-tunes: an extra entry in vocab.json, added_tokens.json, a
    special_tokens_map.json naming a pad token, no tokenizer_config.json."""
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    vocab["<|pad|>"] = 50257
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copy(DATA / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    texts = ["a<|pad|><|im|>", "<|pad|> x", f"{EOT}<|im|>", "<|im", "plain"]

    def check() -> Tokenizer:
        ours = Tokenizer.from_pretrained(tmp_path)
        assert_same_as_transformers(ours, transformers.AutoTokenizer.from_pretrained(str(tmp_path)), texts)
        return ours

    # Undeclared, "<|pad|>" is a plain vocabulary entry: BPE pieces in text, as in transformers.
    assert check().encode("<|pad|>") != [50257]
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|pad|>": 50257, "<|im|>": 50258}))
    assert check().encode("<|pad|><|im|>") == [50257, 50258]
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    assert check().pad_token_id == 50257


def _edit(directory: Path, out: Path, config: dict | None = None, drop: tuple[str, ...] = (),
          tokenizer_json: Callable[[dict], None] | None = None) -> Path:  # fmt: skip
    shutil.copytree(directory, out)
    if config is not None:
        data = json.loads((out / "tokenizer_config.json").read_text())
        data.update(config)
        data = {k: v for k, v in data.items() if v is not ...}
        (out / "tokenizer_config.json").write_text(json.dumps(data))
    if tokenizer_json is not None:
        data = json.loads((out / "tokenizer.json").read_text())
        tokenizer_json(data)
        (out / "tokenizer.json").write_text(json.dumps(data))
    for name in drop:
        (out / name).unlink()
    return out


def _prefix_space_in_json(data: dict) -> None:
    data["pre_tokenizer"]["add_prefix_space"] = True


def _bos_template(data: dict) -> None:
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": EOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {EOT: {"id": EOT, "ids": [50256], "tokens": [EOT]}},
    }


def _gap_in_ids(data: dict) -> None:
    data["added_tokens"].append(dict(id=50300, content="<y>", single_word=False, lstrip=False, rstrip=False,
                                     normalized=False, special=True))  # fmt: skip


EDITS: dict[str, dict[str, Any]] = {
    # GPT2Tokenizer rebuilds its pre-tokenizer from the config: tokenizer.json's flag is not read ...
    "prefix space in tokenizer.json only": dict(config={"add_prefix_space": ...}, tokenizer_json=_prefix_space_in_json),
    # ... unless the config names the generic class, which uses tokenizer.json as it is.
    "generic class": dict(config={"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": ...},
                          tokenizer_json=_prefix_space_in_json),
    "prefix space in the config": dict(config={"add_prefix_space": True}),
    "pad token not in the vocabulary": dict(config={"pad_token": "<pad>"}),  # added, new id
    "another eos token": dict(config={"eos_token": "<eos>"}),
    "split special tokens": dict(config={"split_special_tokens": True}),
    "BOS template": dict(tokenizer_json=_bos_template),  # the call adds it, encode does not
    "add_bos_token with tokenizer.json": dict(config={"add_bos_token": True}),  # ignored: the file decides
    "declared ids with a gap": dict(tokenizer_json=_gap_in_ids),  # tokenizers assigns the next id
    "declared ids with a gap in the config": dict(config={"added_tokens_decoder": {
        "50256": {"content": EOT, "special": True, "normalized": True},
        "50300": {"content": "<x>", "special": True, "normalized": False, "lstrip": True}}}),
    "no tokenizer_config.json": dict(drop=("tokenizer_config.json",)),
}  # fmt: skip


@pytest.mark.parametrize("edit", list(EDITS))
def test_what_transformers_reads_from_which_file(saved: dict[str, Path], edit: str, tmp_path: Path) -> None:
    directory = _edit(saved["pad token"], tmp_path / "d", **EDITS[edit])
    # A checkpoint's config.json says model_type gpt2: transformers picks GPT2Tokenizer by it
    # when tokenizer_config.json is absent, as minigpt2 does.
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    texts = ["hello", " hello", "<pad> <|endoftext|>x", "<x><y> <eos>", "", "\nnew line", *TEXTS[:30]]
    assert_same_as_transformers(Tokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(str(directory)), texts)


def test_template_and_truncation(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = _edit(saved["pad token"], tmp_path / "d", tokenizer_json=_bos_template)
    ours, hf = Tokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    texts = ["Hello world, this is long", "Hi", ""]
    for kw in (dict(), dict(add_special_tokens=False), dict(truncation=True, max_length=3, padding=True),
               dict(truncation=True, max_length=1, padding="max_length", max_length_unused=None)):  # fmt: skip
        kw.pop("max_length_unused", None)
        assert dict(ours(texts, **kw)) == dict(hf(texts, **kw)), kw
    assert ours.encode("Hello") == [15496] and ours("Hello")["input_ids"] == [50256, 15496]
    ours.save_pretrained(tmp_path / "saved")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))("Hello")["input_ids"] == [50256, 15496]
    assert Tokenizer.from_pretrained(tmp_path / "saved")("Hello")["input_ids"] == [50256, 15496]


def test_from_pretrained_overrides(saved: dict[str, Path]) -> None:
    directory = saved["chat"]
    hf = transformers.AutoTokenizer.from_pretrained(str(directory), add_prefix_space=True, eos_token="<|im_end|>")
    ours = Tokenizer.from_pretrained(directory, add_prefix_space=True, eos_token="<|im_end|>")
    assert_same_as_transformers(ours, hf, TEXTS[:40])
    assert ours.eos_token_id == 50259


def test_a_vocabulary_trained_from_scratch(tmp_path: Path) -> None:
    """Not GPT-2's vocabulary: one that tokenizers' BpeTrainer learns (merges in its own order),
    saved as a GPT-2 tokenizer. minigpt2's rank-of-concatenation BPE must equal its pair ranks."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    source = sorted((Path(transformers.__file__).parent / "models").rglob("*.py"))
    train = [p.read_text(encoding="utf-8", errors="replace") for p in source[:60]]
    held_out = [p.read_text(encoding="utf-8", errors="replace") for p in source[60:120]]
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    ))  # fmt: skip
    rust.model.save(str(tmp_path))  # vocab.json + merges.txt
    hf = transformers.GPT2Tokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    ours = Tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert ours.eos_token_id == 0 == hf.eos_token_id
    texts = held_out + TEXTS[:50] + ["x" * 3000, " " * 3000 + "y"]
    assert ours.encode_batch(texts) == [hf.encode(t, add_special_tokens=False) for t in texts]
    ours.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert ours.encode_batch(texts[:20]) == [reloaded.encode(t, add_special_tokens=False) for t in texts[:20]]


def test_from_the_hub_cache(saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub repo id read through huggingface_hub's cache (offline), with tokenizer.json only."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--someone--chat-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(saved["chat"], repo / "snapshots" / commit)
    ours = Tokenizer.from_pretrained("someone/chat-gpt2")
    assert_same_as_transformers(ours, transformers.AutoTokenizer.from_pretrained(str(saved["chat"])), TEXTS[:40])
    assert ours.name_or_path == "someone/chat-gpt2"
    # A repo the cache does not hold: an error naming it, not GPT-2's tokenizer in its place.
    with pytest.raises(ValueError, match="someone/not-cached"):
        Tokenizer.from_pretrained("someone/not-cached")


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


BAD: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "a config but no vocabulary": (lambda d, ok: _write(d, {"tokenizer_config.json": "{}"}), "no vocabulary"),
    "vocab.json without merges.txt": (lambda d, ok: _write(d, {"vocab.json": (DATA / "vocab.json").read_text()}),
                                      "has vocab.json but no merges.txt"),
    "merges.txt without vocab.json": (lambda d, ok: _write(d, {"merges.txt": (DATA / "merges.txt").read_text()}),
                                      "has merges.txt but no vocab.json"),
    "tokenizer.json is not JSON": (lambda d, ok: _write(d, {"tokenizer.json": "{not json"}), "not valid JSON"),
    "tokenizer.json of another model": (lambda d, ok: _write(d, {"tokenizer.json": json.dumps(
        {"model": {"type": "WordPiece", "vocab": {"a": 0}, "merges": []}})}), "not BPE"),
    "a normalizer": (lambda d, ok: _edit(ok, d, config={"tokenizer_class": "PreTrainedTokenizerFast"},
                     tokenizer_json=lambda j: j.update(normalizer={"type": "NFKC"})), "normalizer 'NFKC'"),
    "another pre-tokenizer": (lambda d, ok: _edit(ok, d, config={"tokenizer_class": "PreTrainedTokenizerFast"},
                              tokenizer_json=lambda j: j.update(pre_tokenizer={"type": "Whitespace"})), "'Whitespace'"),
    "not byte-level": (lambda d, ok: _write(d, {"vocab.json": json.dumps({"a": 0, "b": 1}), "merges.txt": "a b\n"}),
                       "byte-level"),
    "an added token id that is not a number": (lambda d, ok: _edit(ok, d, config={"added_tokens_decoder": {
        "fifty": {"content": "<x>"}}}), "'fifty' is not an integer"),
    "a malformed added token": (lambda d, ok: _edit(ok, d, tokenizer_json=lambda j: j["added_tokens"].append({"id": 7})),
                                "added_tokens"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tokenizer_files_raise_value_errors(saved: dict[str, Path], tmp_path: Path, case: str) -> None:
    make, message = BAD[case]
    directory = make(tmp_path / "bad", saved["pad token"])
    with pytest.raises(ValueError, match=message) as info:
        Tokenizer.from_pretrained(directory)
    assert str(directory) in str(info.value) or "bad" in str(info.value)


def test_constructor_reads_files_as_gpt2tokenizer_does() -> None:
    """Tokenizer(vocab, merges, ...) is transformers.GPT2Tokenizer(vocab=..., merges=..., ...)
    followed by add_tokens."""
    from minigpt2.tokenizer import AddedToken

    hf = transformers.GPT2Tokenizer(vocab=str(DATA / "vocab.json"), merges=str(DATA / "merges.txt"), pad_token="<pad>")
    hf.add_tokens([HFAddedToken("<x>", lstrip=True), "plain"])
    ours = Tokenizer(DATA / "vocab.json", DATA / "merges.txt", pad_token="<pad>",
                     added_tokens=[AddedToken("<x>", lstrip=True), "plain"])  # fmt: skip
    assert_same_as_transformers(ours, hf, TEXTS[:60] + ["a plain <x> b", "explained"])
