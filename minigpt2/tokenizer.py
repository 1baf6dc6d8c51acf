"""GPT-2 byte-level BPE tokenizer built on ``tiktoken``.

The GPT-2 tokenizer is distributed as two files:

* ``vocab.json`` maps every token, written in GPT-2's *byte-level alphabet*
  (see :func:`_byte_to_unicode_table`), to its integer id;
* ``merges.txt`` lists the BPE merges, highest priority first.

``tiktoken`` provides a fast BPE engine but wants ``{token_bytes: rank}``
where the rank is the merge priority.  This module converts the Hugging Face
files into that form entirely locally (no downloads, no hash checks), keeps
the token ids identical to those of ``transformers.GPT2Tokenizer``, and
handles special / added tokens (``<|endoftext|>`` and any extra tokens of a
fine-tune) itself, so encoding matches Hugging Face even when special-token
strings appear inside ordinary text.

Typical use::

    tok = Tokenizer()                      # standard GPT-2, from package data
    ids = tok.encode("Hello world")        # [15496, 995]
    text = tok.decode(ids)                 # "Hello world"
    tok = Tokenizer.from_pretrained("path/to/finetune")   # vocab.json + merges.txt
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from .hub import HubRepo, atomic_write, local_dir

__all__ = ["Tokenizer", "GPT2_PATTERN", "DEFAULT_EOS_TOKEN"]

logger = logging.getLogger(__name__)

#: GPT-2's pre-tokenization regex: contractions, letter runs, digit runs and
#: punctuation runs (each optionally preceded by one space), then whitespace.
#: ``\s+(?!\S)`` leaves the last space of a run to be glued to the next word.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

DEFAULT_EOS_TOKEN = "<|endoftext|>"

_DATA_DIR = Path(__file__).resolve().parent / "data"
_VOCAB_NAME = "vocab.json"
_MERGES_NAME = "merges.txt"
_ADDED_TOKENS_NAME = "added_tokens.json"
_CONFIG_NAME = "tokenizer_config.json"
_SPECIAL_MAP_NAME = "special_tokens_map.json"

# vocab.json entries that are not produced by any merge are treated as special
# tokens (split out of the text before BPE) only when they look like <|...|>.
_SPECIAL_LOOKING = re.compile(r"<\|.+\|>", re.DOTALL)


# ---------------------------------------------------------------------------
# GPT-2's byte <-> printable-unicode convention
# ---------------------------------------------------------------------------
@functools.cache
def _byte_to_unicode_table() -> tuple[str, ...]:
    """Return the character GPT-2 uses to spell each byte value 0..255.

    GPT-2 (``bytes_to_unicode`` in OpenAI's ``encoder.py``) stores tokens as
    text in which each *byte* is one visible character, so that the files
    contain no whitespace or control characters:

    * the 188 bytes that are already printable, non-space Latin-1 characters
      -- ``!``..``~`` (33..126), ``¡``..``¬`` (161..172) and ``®``..``ÿ``
      (174..255) -- are spelled by the code point with the same number;
    * the remaining 68 bytes (0..32 i.e. controls and the space, 127..160 i.e.
      DEL, C1 controls and NBSP, and 173 the soft hyphen) are spelled by the
      code points 256, 257, ... assigned in increasing byte order.

    So the space byte 0x20 -- the 33rd "ugly" byte -- becomes chr(256 + 32) =
    ``Ġ`` and the newline 0x0A becomes chr(256 + 10) = ``Ċ``.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = []
    next_extra = 256
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(next_extra))
            next_extra += 1
    return tuple(table)


@functools.cache
def _unicode_to_byte_map() -> dict[str, int]:
    """Inverse of :func:`_byte_to_unicode_table`: spelling character -> byte."""
    return {ch: b for b, ch in enumerate(_byte_to_unicode_table())}


def _token_to_bytes(token: str) -> bytes | None:
    """Bytes spelled by a byte-level token string, or None if it is not one."""
    lookup = _unicode_to_byte_map()
    try:
        return bytes(lookup[ch] for ch in token)
    except KeyError:
        return None


def _token_to_bytes_lenient(token: str) -> bytes:
    """Bytes for decoding any vocab entry.

    Characters of the byte-level alphabet map to their byte; any other
    character contributes its own UTF-8 encoding (this is what the Hugging Face
    ``ByteLevel`` decoder does for such entries).
    """
    lookup = _unicode_to_byte_map()
    out = bytearray()
    for ch in token:
        b = lookup.get(ch)
        if b is None:
            out += ch.encode("utf-8", errors="surrogatepass")
        else:
            out.append(b)
    return bytes(out)


def _bytes_to_token(data: bytes) -> str:
    """Spell raw bytes in GPT-2's byte-level alphabet."""
    table = _byte_to_unicode_table()
    return "".join(table[b] for b in data)


# ---------------------------------------------------------------------------
# Building the BPE core from vocab.json + merges.txt (cached)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Core:
    """Immutable tokenizer state, shared by all Tokenizer objects on the same files."""

    encoding: tiktoken.Encoding
    # rank (what tiktoken returns) -> token id; None when ranks already are ids.
    rank_to_id: tuple[int, ...] | None
    # id -> bytes for decoding; None marks an id that is not in the vocabulary.
    id_to_bytes: tuple[bytes | None, ...]
    special_tokens: Mapping[str, int]
    special_regex: re.Pattern[str] | None
    vocab: Mapping[str, int]  # as read from vocab.json (for save_pretrained)
    merges: tuple[str, ...]  # raw "a b" merge lines (for save_pretrained)
    # First characters of the special tokens: texts containing none of them
    # skip the special-token split (the common case, "<" for <|...|> tokens).
    special_first_chars: frozenset[str]


def _read_merges(path: Path) -> list[str]:
    """Merge lines of a merges.txt, without the ``#version`` header and blanks."""
    lines = path.read_text(encoding="utf-8").split("\n")
    merges = []
    for i, line in enumerate(lines):
        line = line.rstrip("\r")
        if not line or (i == 0 and line.startswith("#version")):
            continue
        merges.append(line)
    return merges


def _build_core(
    vocab: Mapping[str, int],
    merges: Sequence[str],
    added_tokens: Mapping[str, int],
    source: str,
) -> _Core:
    """Turn a Hugging Face GPT-2 vocabulary into a tiktoken BPE engine.

    tiktoken repeatedly merges the adjacent pair whose *concatenation* has the
    lowest rank, so the mergeable ranks must follow merges.txt order (that is
    what Hugging Face uses as merge priority).  Only single bytes and merge
    results are mergeable: a vocab entry no merge produces can never come out
    of Hugging Face's BPE, so it must not come out of ours either.
    """
    if not vocab:
        raise ValueError(f"{source}: vocab.json is empty")
    ids = list(vocab.values())
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise ValueError(f"{source}: vocab.json ids must be non-negative integers")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: vocab.json maps several tokens to the same id")

    # 1. The 256 single-byte tokens (needed as the starting point of every BPE).
    byte_table = _byte_to_unicode_table()
    token_bytes_to_id: dict[bytes, int] = {}
    for b, ch in enumerate(byte_table):
        if ch not in vocab:
            raise ValueError(
                f"{source}: vocab.json has no token for byte {b} (spelled {ch!r}); "
                "not a byte-level BPE vocabulary"
            )
        token_bytes_to_id[bytes([b])] = vocab[ch]

    # 2. Merge results, in priority order.  Skip (with a warning) merges that
    #    reference tokens missing from the vocabulary or repeat an earlier
    #    result: tiktoken can express neither.
    merge_order: list[bytes] = []
    problems: list[str] = []
    for line in merges:
        parts = line.split(" ")
        if len(parts) != 2:
            problems.append(f"malformed merge line {line!r}")
            continue
        left, right = parts
        merged = left + right
        if left not in vocab or right not in vocab or merged not in vocab:
            problems.append(f"merge {line!r} uses tokens missing from vocab.json")
            continue
        data = _token_to_bytes(merged)
        if data is None:
            problems.append(f"merge {line!r} is not byte-level")
            continue
        if data in token_bytes_to_id:
            problems.append(f"merge {line!r} repeats an existing token")
            continue
        token_bytes_to_id[data] = vocab[merged]
        merge_order.append(data)
    if problems:
        logger.warning(
            "%s: ignored %d inconsistent merge(s), e.g. %s", source, len(problems), problems[0]
        )

    # 3. Ranks.  In the usual case ids grow with merge order and tiktoken can
    #    return vocab ids directly; otherwise (reordered fine-tune vocabularies)
    #    tiktoken works on merge order and we translate its ranks to ids.
    merge_ids = [token_bytes_to_id[data] for data in merge_order]
    if all(a < b for a, b in zip(merge_ids, merge_ids[1:])):
        mergeable_ranks = dict(token_bytes_to_id)
        rank_to_id: tuple[int, ...] | None = None
    else:
        mergeable_ranks = {bytes([b]): b for b in range(256)}
        for i, data in enumerate(merge_order):
            mergeable_ranks[data] = 256 + i
        translation = [0] * len(mergeable_ranks)
        for data, rank in mergeable_ranks.items():
            translation[rank] = token_bytes_to_id[data]
        rank_to_id = tuple(translation)

    # 4. Special tokens: declared added tokens, plus unreachable <|...|> entries.
    reachable_ids = set(token_bytes_to_id.values())
    special_tokens: dict[str, int] = {}
    for token, idx in vocab.items():
        if idx not in reachable_ids and _SPECIAL_LOOKING.fullmatch(token):
            special_tokens[token] = idx
    vocab_ids = set(ids)
    for token, idx in added_tokens.items():
        if not token:
            continue
        if token in vocab and vocab[token] != idx:
            raise ValueError(
                f"{source}: added token {token!r} has id {idx} but vocab.json says {vocab[token]}"
            )
        if token not in vocab and idx in vocab_ids:
            raise ValueError(f"{source}: added token {token!r} reuses id {idx} of vocab.json")
        special_tokens[token] = idx
    if len(set(special_tokens.values())) != len(special_tokens):
        raise ValueError(f"{source}: several added tokens share one id")

    # 5. Decoding table: every vocab entry, then the special tokens.
    n_vocab = 1 + max(max(ids), max(special_tokens.values(), default=0))
    id_to_bytes: list[bytes | None] = [None] * n_vocab
    for token, idx in vocab.items():
        id_to_bytes[idx] = _token_to_bytes_lenient(token)
    for token, idx in special_tokens.items():
        id_to_bytes[idx] = token.encode("utf-8")

    # Longest alternatives first: at one position the longest special token
    # wins, like Hugging Face's added-token matcher.
    special_regex = None
    if special_tokens:
        alternatives = sorted(special_tokens, key=lambda s: (-len(s), s))
        special_regex = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    encoding = tiktoken.Encoding(
        name=f"minigpt2-bpe-{len(mergeable_ranks)}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=mergeable_ranks,
        special_tokens={},  # handled in Python, see Tokenizer.encode
    )
    return _Core(
        encoding=encoding,
        rank_to_id=rank_to_id,
        id_to_bytes=tuple(id_to_bytes),
        special_tokens=dict(special_tokens),
        special_regex=special_regex,
        vocab=dict(vocab),
        merges=tuple(merges),
        special_first_chars=frozenset(tok[0] for tok in special_tokens),
    )


def _file_key(path: Path) -> tuple[str, int, int]:
    """Cache key for a file: resolved path plus size and mtime (edits invalidate)."""
    resolved = path.expanduser().resolve()
    st = resolved.stat()
    return (str(resolved), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load_core(
    vocab_key: tuple[str, int, int],
    merges_key: tuple[str, int, int],
    added_tokens: tuple[tuple[str, int], ...],
) -> _Core:
    """Read and build a :class:`_Core`; cached per (vocab, merges, added tokens)."""
    vocab_path, merges_path = Path(vocab_key[0]), Path(merges_key[0])
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_path}: expected a JSON object mapping token -> id")
    merges = _read_merges(merges_path)
    return _build_core(vocab, merges, dict(added_tokens), source=str(vocab_path.parent))


def _token_content(value: Any) -> str | None:
    """Token text from a config value: a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_directory_extras(directory: Path) -> tuple[dict[str, int], str | None]:
    """Added tokens and eos token declared in a Hugging Face tokenizer directory.

    Reads ``added_tokens.json`` ({token: id}) and the ``added_tokens_decoder`` /
    ``eos_token`` entries of ``tokenizer_config.json`` when present.
    """
    added: dict[str, int] = {}
    eos: str | None = None
    added_path = directory / _ADDED_TOKENS_NAME
    if added_path.is_file():
        with open(added_path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{added_path}: expected a JSON object mapping token -> id")
        for token, idx in data.items():
            added[str(token)] = int(idx)
    config_path = directory / _CONFIG_NAME
    if config_path.is_file():
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if isinstance(config, dict):
            decoder = config.get("added_tokens_decoder") or {}
            if isinstance(decoder, dict):
                for idx, entry in decoder.items():
                    content = _token_content(entry)
                    if content is not None:
                        added[content] = int(idx)
            eos = _token_content(config.get("eos_token"))
            if config.get("add_prefix_space"):
                logger.warning(
                    "%s sets add_prefix_space=true, which this tokenizer ignores", config_path
                )
    return added, eos


def _hub_download(repo_id: str) -> Path | None:
    """Directory holding ``repo_id``'s vocab.json + merges.txt, or None.

    Through :class:`minigpt2.hub.HubRepo` (the cache only when offline or when the Hub does
    not answer); any failure (no network, unknown repo, invalid id) gives None.
    """
    repo = HubRepo(repo_id)
    try:
        vocab, merges = repo.file(_VOCAB_NAME), repo.file(_MERGES_NAME)
        if vocab is None or merges is None or merges.parent != vocab.parent:
            return None
        for optional in (_ADDED_TOKENS_NAME, _CONFIG_NAME):
            repo.file(optional)
    except ValueError:
        return None
    return vocab.parent


_GPT2_REPO_IDS = {
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
    "openai-community/gpt2", "openai-community/gpt2-medium",
    "openai-community/gpt2-large", "openai-community/gpt2-xl",
    "distilbert/distilgpt2",
}  # fmt: skip


def _coerce_ids(ids: Any) -> list[int]:
    """Turn a list/tuple of ints, a 1-D tensor or a NumPy array into a list."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ndim = getattr(ids, "ndim", None)
        if ndim is not None and ndim > 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
        if not isinstance(ids, list):  # 0-d tensor / array
            ids = [ids]
    elif isinstance(ids, int):
        raise TypeError("decode expects a sequence of token ids, not a single int")
    elif not isinstance(ids, list):
        ids = list(ids)
    return ids


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
class Tokenizer:
    """GPT-2 byte-level BPE tokenizer with Hugging Face-identical token ids.

    ``Tokenizer()`` is the standard GPT-2 tokenizer (files shipped in
    ``minigpt2/data``).  Pass ``vocab_file``/``merges_file`` (or use
    :meth:`from_pretrained` on a directory) for another byte-level BPE
    vocabulary such as a fine-tune's.  Construction is cached per file pair, so
    creating many tokenizers is cheap.

    Special tokens (``<|endoftext|>`` and added tokens) written literally in
    the text are encoded as their single id, exactly like ``transformers``.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merges_file: str | os.PathLike[str] | None = None,
        *,
        added_tokens: Mapping[str, int] | None = None,
        eos_token: str | None = None,
    ) -> None:
        """Load a vocabulary.

        Args:
            vocab_file: GPT-2 style ``vocab.json``; default: packaged GPT-2.
            merges_file: matching ``merges.txt``; default: packaged GPT-2.
            added_tokens: extra special tokens ``{text: id}`` (as in
                ``added_tokens.json``), split out of the text before BPE.
            eos_token: end-of-text token; default ``<|endoftext|>``.
        """
        if (vocab_file is None) != (merges_file is None):
            raise ValueError("pass both vocab_file and merges_file, or neither")
        vocab_path = Path(vocab_file) if vocab_file is not None else _DATA_DIR / _VOCAB_NAME
        merges_path = Path(merges_file) if merges_file is not None else _DATA_DIR / _MERGES_NAME
        for path in (vocab_path, merges_path):
            if not path.expanduser().is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        extra = tuple(sorted((str(k), int(v)) for k, v in (added_tokens or {}).items()))
        self._core = _load_core(_file_key(vocab_path), _file_key(merges_path), extra)
        self._eos_token = eos_token if eos_token is not None else DEFAULT_EOS_TOKEN
        core = self._core
        eos_id = core.special_tokens.get(self._eos_token, core.vocab.get(self._eos_token))
        if eos_id is None:
            raise ValueError(f"eos token {self._eos_token!r} is not in the vocabulary")
        self._eos_token_id = eos_id

    # -- construction ------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] | None = None) -> Tokenizer:
        """Load a tokenizer from a directory or Hub id, falling back to GPT-2.

        * a directory with ``vocab.json`` + ``merges.txt``: those files (plus
          ``added_tokens.json`` / ``tokenizer_config.json`` when present);
        * a directory without them (e.g. a checkpoint saved without its
          tokenizer), ``None``: the packaged GPT-2 files;
        * a Hub repo id: the Hub files if ``huggingface_hub`` can get them
          (local cache first; never waits long offline), else packaged GPT-2;
        * anything else that looks like a path (an existing file, or a name
          starting with ``/``, ``./``, ``../``, ``~``): ``FileNotFoundError``.
        """
        if name_or_path is None:
            return cls()
        name = os.fspath(name_or_path)
        path = local_dir(name_or_path, "tokenizer")
        if path is not None:
            if (path / _VOCAB_NAME).is_file() and (path / _MERGES_NAME).is_file():
                return cls._from_directory(path)
            logger.info("%s has no %s/%s; using the packaged GPT-2 tokenizer",
                        name, _VOCAB_NAME, _MERGES_NAME)  # fmt: skip
            return cls()
        if name in _GPT2_REPO_IDS:  # the packaged files are exactly these repos' files
            return cls()
        directory = _hub_download(name)
        if directory is not None:
            return cls._from_directory(directory)
        logger.warning("could not load the tokenizer of %r; using packaged GPT-2 files", name)
        return cls()

    @classmethod
    def _from_directory(cls, directory: Path) -> Tokenizer:
        added, eos = _read_directory_extras(directory)
        return cls(
            directory / _VOCAB_NAME, directory / _MERGES_NAME, added_tokens=added, eos_token=eos
        )

    # -- properties --------------------------------------------------------
    @property
    def eos_token(self) -> str:
        """End-of-text token string (``<|endoftext|>`` for GPT-2)."""
        return self._eos_token

    @property
    def eos_token_id(self) -> int:
        """End-of-text token id (50256 for GPT-2)."""
        return self._eos_token_id

    @property
    def n_vocab(self) -> int:
        """Number of token ids: one more than the largest id (50257 for GPT-2)."""
        return len(self._core.id_to_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special tokens ``{text: id}`` recognised literally inside text."""
        return dict(self._core.special_tokens)

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, eos_token_id={self.eos_token_id})"

    # -- encoding ----------------------------------------------------------
    def _split_special(self, text: str) -> list[str | int]:
        """Split text into ordinary segments (str) and special token ids (int)."""
        regex = self._core.special_regex
        if regex is None or not any(ch in text for ch in self._core.special_first_chars):
            return [text]
        parts = regex.split(text)  # capturing group: odd positions are specials
        out: list[str | int] = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append(self._core.special_tokens[part])
            elif part:
                out.append(part)
        return out

    def _ranks_to_ids(self, ranks: list[int]) -> list[int]:
        table = self._core.rank_to_id
        return ranks if table is None else [table[r] for r in ranks]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; identical to ``transformers.GPT2Tokenizer``.

        Special tokens such as ``<|endoftext|>`` written in the text become
        their single id (Hugging Face behaviour), everything else goes through
        GPT-2's regex pre-tokenization and byte-level BPE.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        enc = self._core.encoding
        for part in self._split_special(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._ranks_to_ids(enc.encode_ordinary(part)))
        return ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many texts; large batches are split over threads.

        tiktoken releases the GIL while encoding, so threads help on big
        batches; small ones are encoded in a plain loop (less overhead).
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, got {type(t).__name__}")
        if num_threads <= 1 or len(texts) < 2 or sum(map(len, texts)) < (1 << 16):
            return [self.encode(t) for t in texts]
        size = -(-len(texts) // (4 * num_threads))
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            parts = pool.map(lambda chunk: [self.encode(t) for t in chunk], chunks)
            return [ids for part in parts for ids in part]

    # -- decoding ----------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int] | Any) -> bytes:
        """Raw bytes of ``ids``; may end in an incomplete UTF-8 sequence.

        Streaming consumers should use this and hold back a trailing partial
        character until the next token completes it.
        """
        ids = _coerce_ids(ids)
        if not ids:
            return b""
        table = self._core.id_to_bytes
        try:
            lo, hi = min(ids), max(ids)
        except TypeError:
            raise TypeError(f"token ids must be integers, got {ids[:8]!r}...") from None
        if lo < 0 or hi >= len(table):
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for vocabulary size {len(table)}")
        try:
            return b"".join([table[i] for i in ids])  # type: ignore[misc]
        except TypeError:
            for i in ids:
                if not isinstance(i, int) and not hasattr(i, "__index__"):
                    raise TypeError(f"token ids must be integers, got {i!r}") from None
                if table[i] is None:
                    raise ValueError(
                        f"token id {i} is not in the vocabulary (size {len(table)})"
                    ) from None
            raise

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of ``ids``; invalid UTF-8 (split characters) becomes U+FFFD.

        Accepts a list/tuple of ints, a 1-D ``torch.Tensor`` or NumPy array.
        ``decode(encode(s)) == s`` for every string ``s``.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- saving ------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.

        The result loads with ``transformers.AutoTokenizer.from_pretrained``
        (and :meth:`from_pretrained`) and gives identical ids.  Each file is
        written to a temporary name and atomically renamed into place.
        """
        out_dir = Path(directory).expanduser()
        out_dir.mkdir(parents=True, exist_ok=True)
        core = self._core

        vocab_text = json.dumps(core.vocab, ensure_ascii=False)
        merges_text = "#version: 0.2\n" + "".join(m + "\n" for m in core.merges)

        with open(_DATA_DIR / _CONFIG_NAME, encoding="utf-8") as f:
            config = json.load(f)
        with open(_DATA_DIR / _SPECIAL_MAP_NAME, encoding="utf-8") as f:
            special_map = json.load(f)
        template = dict(config["added_tokens_decoder"][str(50256)])
        decoder: dict[str, dict[str, Any]] = {}
        for token, idx in sorted(core.special_tokens.items(), key=lambda kv: kv[1]):
            entry = dict(template)
            entry["content"] = token
            decoder[str(idx)] = entry
        config["added_tokens_decoder"] = decoder
        config["eos_token"] = self.eos_token
        special_map["eos_token"] = self.eos_token

        files = {
            _VOCAB_NAME: vocab_text,
            _MERGES_NAME: merges_text,
            _CONFIG_NAME: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            _SPECIAL_MAP_NAME: json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
        }
        extra = {t: i for t, i in core.special_tokens.items() if t not in core.vocab}
        if extra:
            files[_ADDED_TOKENS_NAME] = json.dumps(extra, ensure_ascii=False)
        for name, text in files.items():
            atomic_write(out_dir / name, text)

