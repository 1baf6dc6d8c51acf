"""Tests for minigpt2.tokenizer: parity with Hugging Face GPT-2 tokenizers, offline.

Every reference tokenizer is built from the package's own vocab.json/merges.txt
(never the Hub).  In transformers >= 5 ``GPT2Tokenizer`` and
``GPT2TokenizerFast`` are the same Rust-backed class, so an independent
pure-Python implementation of OpenAI's original ``encoder.py`` algorithm
(pair-ranked merges) is used as a genuinely "slow" second oracle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from minigpt2.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parent.parent / "minigpt2" / "data"
VOCAB = DATA / "vocab.json"
MERGES = DATA / "merges.txt"
EOT = "<|endoftext|>"


def _random_unicode(seed: int, length: int) -> str:
    """Deterministic mix of scripts, symbols, emoji and whitespace."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
        (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x3040, 0x30FF),
        (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF),
    ]  # fmt: skip
    whitespace = [" ", "  ", "\n", "\t", "\r\n", "\u3000", "\xa0"]
    out = []
    for _ in range(length):
        if rng.random() < 0.15:
            out.append(rng.choice(whitespace))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


CORPUS: list[str] = [
    "",
    "Hello world",
    " Hello world",
    "Hello world ",
    "   leading and trailing spaces   ",
    "many          spaces     between",
    "The quick brown fox jumps over the lazy dog. It wasn't the dog's fault!",
    "line one\nline two\n\n\nline five\n",
    "windows\r\nline endings\r\n\r\n",
    "\ttab\tseparated\tvalues\t\t",
    "def f(x):\n    if x > 0:\n        return x ** 2\n    return -x  # comment\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2.5, null], "nested": {"a": "b"}}',
    "numbers 1234567 and 3.14159 and 1,000,000 and 0x1F",
    "don't I'll we've they're she'd it's you'm",
    "DON'T I'LL WE'VE",
    "'s 't 're 've 'm 'll 'd",
    "emoji 😀😃 👍🏽 thumbs",
    "family 👨\u200d👩\u200d👧\u200d👦 and rainbow flag 🏳️\u200d🌈",
    "flags 🇰🇷🇯🇵🇺🇸 and keycap 1️⃣",
    "中文文本：你好，世界！这是一个测试。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다. 안녕하세요, 세계!",
    "العربية: مرحبا بالعالم",
    "עברית: שלום עולם",
    "Ελληνικά και Русский язык",
    "café naïve résumé (composed)",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301 (decomposed)",
    "Zalgo: Z\u0351\u036b\u0343a\u0310\u0312l\u0350g\u0346o\u0334",
    f"{EOT}",
    f"text before{EOT}",
    f"{EOT}text after",
    f"two{EOT}{EOT}in a row {EOT} spaced",
    "<|endoftext|",
    "|endoftext|>",
    "<|endoftext|>>",
    "<<|endoftext|>",
    "< |endoftext| >",
    "\u00a0non-breaking\u00a0spaces\u2003em space\u3000ideographic",
    "zero\u200bwidth\ufeffbom",
    "control \x00\x01\x1b[31m red \x7f",
    "soft\u00adhyphen and ligature ﬁ and ℌ𝔢𝔩𝔩𝔬",
    "math ∑∫√∞ ≠ ≤ ≥ and arrows → ⇒",
    "   \n   \n\t\n",
    "\n",
    " ",
    "a" * 300,
    "ab " * 100,
    "https://example.com/path?query=1&b=2#frag",
    "email: someone@example.org, tel +1 (555) 123-4567",
    _random_unicode(seed=1234, length=2000),
    _random_unicode(seed=99, length=300),
]


# -- fixtures -------------------------------------------------------------
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module", params=["GPT2Tokenizer", "GPT2TokenizerFast"])
def hf_tok(request):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, request.param)
    # Positional (vocab, merges): file paths, no Hub access.
    return cls(str(VOCAB), str(MERGES))


class _ReferenceBPE:
    """OpenAI's original GPT-2 algorithm, written independently for the tests.

    Pre-tokenize with the GPT-2 regex (``regex`` module), spell each piece in
    the byte-level alphabet, then repeatedly merge the adjacent *pair* with the
    best merges.txt rank -- no tiktoken involved.
    """

    def __init__(self, vocab_path: Path, merges_path: Path) -> None:
        regex = pytest.importorskip("regex")
        self.pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        )
        self.vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(line.split(" ")): i for i, line in enumerate(lines) if line}
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.spell = bytes_to_unicode()

    def _bpe(self, word: tuple[str, ...]) -> tuple[str, ...]:
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids: list[int] = []
        for k, segment in enumerate(text.split(EOT) if special else [text]):
            if k:
                ids.append(self.vocab[EOT])
            for piece in self.pattern.findall(segment):
                spelled = tuple(self.spell[b] for b in piece.encode("utf-8"))
                ids.extend(self.vocab[t] for t in self._bpe(spelled))
        return ids


@pytest.fixture(scope="module")
def ref_bpe() -> _ReferenceBPE:
    return _ReferenceBPE(VOCAB, MERGES)


# -- anchors and basic API -------------------------------------------------
def test_known_anchors(tok: Tokenizer) -> None:
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.encode(EOT) == [50256]
    assert tok.eos_token_id == 50256
    assert tok.eos_token == EOT
    assert tok.n_vocab == 50257
    assert len(tok) == 50257
    assert repr(tok) == "Tokenizer(n_vocab=50257, eos_token_id=50256)"


def test_byte_alphabet_matches_transformers() -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from minigpt2.tokenizer.bytelevel import bytes_to_unicode as _byte_to_unicode_table

    assert dict(enumerate(_byte_to_unicode_table())) == bytes_to_unicode()


def test_construction_is_cached() -> None:
    Tokenizer()  # warm
    start = time.perf_counter()
    for _ in range(100):
        Tokenizer()
    assert time.perf_counter() - start < 0.5
    assert Tokenizer()._spec is Tokenizer.from_pretrained(None)._spec


# -- parity ----------------------------------------------------------------
def test_corpus_is_varied() -> None:
    assert len(CORPUS) >= 40
    assert len(set(CORPUS)) == len(CORPUS)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_encode_matches_reference_bpe(tok: Tokenizer, ref_bpe: _ReferenceBPE) -> None:
    for text in CORPUS:
        assert tok.encode(text) == ref_bpe.encode(text), text[:60]


def test_every_vocab_token_string_matches_transformers(tok: Tokenizer) -> None:
    # Each token's own text is the hardest input for merge-order differences
    # between tiktoken (ranks of concatenations) and pair-ranked BPE.  Tokens
    # are joined into documents (one token text per line) to keep this fast.
    transformers = pytest.importorskip("transformers")
    from minigpt2.tokenizer.bytelevel import token_to_bytes as _token_to_bytes

    hf = transformers.GPT2TokenizerFast(str(VOCAB), str(MERGES))
    texts = []
    for token in json.loads(VOCAB.read_text(encoding="utf-8")):
        data = _token_to_bytes(token)
        if data is not None:
            texts.append(data.decode("utf-8", errors="replace"))
    docs = ["\n".join(texts[i : i + 500]) for i in range(0, len(texts), 500)]
    docs += ["".join(texts[i : i + 500]) for i in range(0, len(texts), 500)]
    ours = tok.encode_batch(docs)
    theirs = hf(docs, add_special_tokens=False)["input_ids"]
    mismatches = [d[:80] for d, a, b in zip(docs, ours, theirs) if a != b]
    assert not mismatches, mismatches[:3]


def test_random_strings_match_transformers(tok: Tokenizer, hf_tok) -> None:
    rng = random.Random(7)
    pool = list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000'sdmtlvre aZé1٣²½.,!?<|>") + [
        EOT, "'ll", "n't", "\u0301", "👍", "🏽", "👨\u200d👩\u200d👧", "🇰🇷", "한", "中",
    ]  # fmt: skip
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    ours = tok.encode_batch(texts)
    theirs = hf_tok(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:5]


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(CORPUS) == [tok.encode(t) for t in CORPUS]
    big = CORPUS * 40  # large enough for the threaded path
    assert tok.encode_batch(big, num_threads=4) == [tok.encode(t) for t in big]
    assert tok.encode_batch([]) == []


def test_encode_rejects_non_strings(tok: Tokenizer) -> None:
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# -- long runs of one character class ----------------------------------------------------------
def test_whitespace_class_is_the_regex_whitespace() -> None:
    """The long-run cut is exact only if WHITESPACE is exactly what ``\\s`` matches in tiktoken's
    regex: probe it with a pattern that keeps only ``\\s`` matches, over every code point."""
    import tiktoken

    from minigpt2.tokenizer.bytelevel import WHITESPACE

    probe = tiktoken.Encoding(
        "ws-probe", pat_str=r"\s", mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
    )
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    matched = probe.decode_bytes(probe.encode_ordinary(every)).decode("utf-8")
    assert matched == "".join(sorted(WHITESPACE))
    assert all(c.isspace() for c in WHITESPACE)  # the cheap pre-check for long runs relies on it


def test_whitespace_runs_around_the_cut_match_transformers(tok: Tokenizer) -> None:
    """Runs just under, at and over the length where minigpt2 stops handing them to tiktoken's
    regex, of every whitespace kind, in every position a run can take."""
    transformers = pytest.importorskip("transformers")
    from minigpt2.tokenizer.bytelevel import LONG_RUN, WHITESPACE

    hf = transformers.GPT2TokenizerFast(str(VOCAB), str(MERGES))
    texts = []
    for c in WHITESPACE:
        for n in (LONG_RUN - 1, LONG_RUN, LONG_RUN + 1, 3 * LONG_RUN + 7):
            run = c * n
            texts += [run, f"a{run}b", f"{run} x", f"x{run}", f" {run}\n{run}é", f"{run}{EOT}{run}", f"'s{run}'s"]
    texts.append(" \t\n\u3000" * LONG_RUN + "end")
    ours = tok.encode_batch(texts)
    theirs = hf(texts, add_special_tokens=False)["input_ids"]
    mismatches = [repr(t[:3]) + f"..x{len(t)}" for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:5]


def test_the_issues_runs_encode_to_transformers_ids(tok: Tokenizer) -> None:
    """Each used to raise a Rust PanicException (a BaseException) from tiktoken's regex; the ids
    are transformers' (checked below against it for the other kinds of run)."""
    assert tok.encode(" " * 999_999) == [220] * 999_999
    assert tok.encode("\n" * 1_000_000) == [628] * 500_000
    assert tok.encode("a" + " " * 1_000_000 + "b") == [64] + [220] * 999_999 + [275]


def test_runs_of_a_million_match_transformers(tok: Tokenizer) -> None:
    """One character class, 10^6 long: letters, digits, punctuation (single pieces tiktoken
    merges with its heap, O(n log n)) and whitespace mixed from several kinds."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast(str(VOCAB), str(MERGES))
    runs = {
        "letters": "a" * 1_000_000,
        "digits": "7" * 1_000_000,
        "punctuation": "." * 1_000_000,
        "mixed whitespace then a word": " \n\t\r\u3000\xa0\x0b\x0c\x85\u2028" * 100_000 + "word",
    }
    ours = tok.encode_batch(list(runs.values()), num_threads=2)
    theirs = hf(list(runs.values()), add_special_tokens=False)["input_ids"]
    for name, a, b in zip(runs, ours, theirs):
        assert a == b, name


def test_a_million_of_every_whitespace_kind_encodes(tok: Tokenizer) -> None:
    """Every kind alone at 10^6 (the cut is exact at any length past LONG_RUN: the test above and
    the one around the cut hold it against transformers)."""
    from minigpt2.tokenizer.bytelevel import WHITESPACE

    spell = tok._spec.bpe.encoding.decode_bytes  # tiktoken's own decoder (GPT-2's ranks are its ids)
    texts = [f"x{c * 1_000_000}y" for c in WHITESPACE]
    for text, ids in zip(texts, tok.encode_batch(texts, num_threads=2)):
        assert spell(ids) == text.encode(), hex(ord(text[1]))
        assert ids[-1] == tok.encode(text[-2:])[-1], hex(ord(text[1]))  # the run's last one starts "y"'s piece


# -- special tokens in user text, add_prefix_space ------------------------------------------------
def test_allowed_and_disallowed_special(tok: Tokenizer, ref_bpe: _ReferenceBPE) -> None:
    text = f"user typed {EOT} here"
    assert tok.encode(text) == tok.encode(text, allowed_special="all") == tok.encode(text, allowed_special={EOT})
    assert 50256 in tok.encode(text)
    plain = tok.encode(text, allowed_special=set())  # tiktoken's encode_ordinary: no special ids
    assert 50256 not in plain and tok.decode(plain) == text
    assert plain == ref_bpe.encode(text, special=False)
    with pytest.raises(ValueError, match=r"<\|endoftext\|>.*disallowed_special"):
        tok.encode(text, allowed_special=set(), disallowed_special="all")
    with pytest.raises(ValueError, match="disallowed_special"):
        tok.encode(text, disallowed_special={EOT})
    assert tok.encode("no special", disallowed_special="all") == tok.encode("no special")
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="'all' or a set"):
        tok.encode(text, allowed_special="<|endoftext|>")


def test_special_tokens_as_plain_text_match_transformers_split_special_tokens(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(DATA))
    texts = [t for t in CORPUS if EOT in t or "endoftext" in t]
    assert len(texts) >= 5
    for text in texts:
        assert tok.encode(text, allowed_special=set()) == hf(text, split_special_tokens=True)["input_ids"], text


def test_add_prefix_space_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(DATA), add_prefix_space=True)
    ours = Tokenizer(add_prefix_space=True)
    assert ours.add_prefix_space and not Tokenizer().add_prefix_space
    assert ours.encode("Hello world") == [18435, 995] == Tokenizer().encode(" Hello world")
    texts = [*CORPUS, f"a{EOT}b", f"{EOT} b", f"{EOT}\nb{EOT}"]
    assert ours.encode_batch(texts) == [hf.encode(t, add_special_tokens=False) for t in texts]


# -- decoding --------------------------------------------------------------
@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_round_trip_corpus(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_random_byteish_strings(tok: Tokenizer) -> None:
    rng = random.Random(2024)
    for _ in range(300):
        n = rng.randint(0, 64)
        latin1 = bytes(rng.randrange(256) for _ in range(n)).decode("latin-1")
        assert tok.decode(tok.encode(latin1)) == latin1
        utf8 = bytes(rng.randrange(256) for _ in range(n)).decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(utf8)) == utf8
        cps = "".join(
            chr(rng.choice([rng.randrange(0x80), rng.randrange(0x80, 0xD800),
                            rng.randrange(0xE000, 0x110000)]))
            for _ in range(n)
        )  # fmt: skip
        assert tok.decode(tok.encode(cps)) == cps


def test_decode_matches_transformers_on_arbitrary_ids(tok: Tokenizer, hf_tok) -> None:
    # Random ids often split UTF-8 characters: both must replace them alike.
    rng = random.Random(5)
    for _ in range(500):
        ids = [
            rng.choice([rng.randrange(256), rng.randrange(50257), 50256])
            for _ in range(rng.randint(0, 10))
        ]
        assert tok.decode(ids) == hf_tok.decode(ids, clean_up_tokenization_spaces=False), ids


def test_partial_utf8_and_decode_bytes(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji is split across byte tokens
    assert tok.decode(ids[:1]) == "\ufffd"
    pieces = b"".join(tok.decode_bytes([i]) for i in ids)
    assert pieces == "😀".encode()
    assert tok.decode_bytes([]) == b""
    assert tok.decode([]) == ""


def test_decode_accepts_tensors_and_arrays(tok: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensors and arrays")
    assert tok.decode(tuple(ids)) == "tensors and arrays"
    assert tok.decode(torch.tensor(ids)) == "tensors and arrays"
    assert tok.decode(np.array(ids, dtype=np.int64)) == "tensors and arrays"
    assert tok.decode(torch.tensor(ids[0])) == tok.decode(ids[:1])
    with pytest.raises(ValueError):
        tok.decode(torch.tensor([ids, ids]))


@pytest.mark.parametrize("bad", [-1, 50257, 10**9])
def test_out_of_range_ids_raise_value_error(tok: Tokenizer, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"{bad}.*50257"):
        tok.decode([15496, bad])
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode_bytes([bad])


def test_non_integer_ids_raise_type_error(tok: Tokenizer) -> None:
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.decode([1, "a"])


# -- loading -------------------------------------------------------------------
def test_directory_without_files_falls_back_with_a_warning(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"no tokenizer files.*GPT-2's tokenizer"):
        loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode(CORPUS[6]) == tok.encode(CORPUS[6])
    with pytest.warns(UserWarning, match=str(tmp_path)):
        assert Tokenizer.from_pretrained(str(tmp_path)).n_vocab == 50257


@pytest.mark.parametrize(
    "name", ["/nonexistent/minigpt2-tok", "./no-such-dir", "../no-such-dir", "~/no-such-dir-xyz"]
)
def test_missing_paths_raise(name: str) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-dir|nonexistent"):
        Tokenizer.from_pretrained(name)


def test_file_path_and_missing_pathlike_raise(tmp_path: Path) -> None:
    some_file = tmp_path / "vocab.json"
    shutil.copy(VOCAB, some_file)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Tokenizer.from_pretrained(some_file)
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.json", MERGES)
    with pytest.raises(ValueError):
        Tokenizer(VOCAB, None)


def test_hub_ids_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # GPT-2's own repos need no download; any other repo that is not in the cache is an error
    # naming it (not GPT-2's tokenizer in its place), and comes at once, without retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for name in ["gpt2", "openai-community/gpt2", "distilgpt2"]:
        assert Tokenizer.from_pretrained(name).encode("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match="minigpt2-tests/no-such-model"):
        Tokenizer.from_pretrained("minigpt2-tests/no-such-model")
    assert time.perf_counter() - start < 10


def test_local_directory_with_files(tmp_path: Path, tok: Tokenizer) -> None:
    shutil.copy(VOCAB, tmp_path / "vocab.json")
    shutil.copy(MERGES, tmp_path / "merges.txt")
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode_batch(CORPUS) == tok.encode_batch(CORPUS)


# -- saving -------------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    names = sorted(os.listdir(out))
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    assert config["model_max_length"] == 1024
    assert config["add_prefix_space"] is False
    assert {config[k] for k in ("eos_token", "bos_token", "unk_token")} == {EOT}
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token_id == tok.eos_token_id
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    reloaded = Tokenizer.from_pretrained(out)
    assert reloaded.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    tok.save_pretrained(out)  # overwriting is fine and leaves no temporary files
    assert sorted(os.listdir(out)) == names


# -- fine-tune-like vocabularies ----------------------------------------------
def _finetune_dir(path: Path) -> Path:
    vocab = json.loads(VOCAB.read_text(encoding="utf-8"))
    vocab["<|pad|>"] = 50257  # extra token inside vocab.json
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copy(MERGES, path / "merges.txt")
    added = {"<|pad|>": 50257, "<|im_start|>": 50258, "<|im_end|>": 50259}
    (path / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    return path


FINETUNE_TEXTS = [
    "<|im_start|>user\nHello <|pad|> there<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>",
    f"{EOT}<|pad|><|pad|>",
    " <|pad|>x",
    "<|im_start|",
    "ordinary text with no special tokens",
]


def test_finetune_directory_with_added_tokens(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _finetune_dir(tmp_path / "ft")
    ours = Tokenizer.from_pretrained(directory)
    assert ours.n_vocab == 50260
    assert ours.eos_token_id == 50256
    hf = transformers.GPT2Tokenizer.from_pretrained(str(directory))
    for text in FINETUNE_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    assert 50258 in ours.encode(FINETUNE_TEXTS[0])

    out = tmp_path / "ft-saved"
    ours.save_pretrained(out)
    hf_saved = transformers.AutoTokenizer.from_pretrained(str(out))
    reloaded = Tokenizer.from_pretrained(out)
    for text in FINETUNE_TEXTS:
        assert hf_saved.encode(text, add_special_tokens=False) == ours.encode(text)
        assert reloaded.encode(text) == ours.encode(text)


def test_reordered_ids_and_unreachable_tokens(tmp_path: Path) -> None:
    # Shuffled ids break "rank == id"; an extra byte-level token that no merge
    # produces must never be emitted by encode but must decode.
    transformers = pytest.importorskip("transformers")
    vocab = json.loads(VOCAB.read_text(encoding="utf-8"))
    perm = list(range(len(vocab)))
    random.Random(0).shuffle(perm)
    shuffled = {token: perm[i] for token, i in vocab.items()}
    shuffled["Ġhelloworld"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled, ensure_ascii=False), "utf-8")
    shutil.copy(MERGES, tmp_path / "merges.txt")
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.eos_token_id == perm[50256]
    hf = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
    texts = CORPUS[:20] + [" helloworld", "hello helloworld"]
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert len(vocab) not in ours.encode(" helloworld")
    assert ours.decode([len(vocab)]) == " helloworld"


def test_type_errors_name_the_bad_element(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match=r"text\[1\] is 2 \(type int\).*decode"):
        tok(["a", 2])
    with pytest.raises(TypeError, match=r"row 0 is the single id 15496; use decode"):
        tok.batch_decode([15496, 995])
    assert tok.batch_decode([[15496], [995]]) == [tok.decode([15496]), tok.decode([995])]
