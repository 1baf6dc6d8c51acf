"""``Tokenizer``: GPT-2's tokenizer (or any byte-level BPE fine-tune's) with transformers' ids.

``encode`` / ``decode`` are tiktoken's shape (text -> ids, ids -> text); the call
``tok(texts, padding=True, ...)`` is transformers' shape (a batch of ``input_ids`` and
``attention_mask``). Both give the ids transformers 5's tokenizer gives for the same files.
"""

from __future__ import annotations

import bisect
import functools
import os
import warnings
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..hub import HubRepo, local_dir
from . import batch as _batch
from .added_tokens import AddedToken, AddedVocabulary
from .bytelevel import decoded_bytes
from .files import (
    ADDED_TOKENS_JSON, CONFIG_JSON, MERGES_TXT, SPECIAL_TOKEN_NAMES, SPECIAL_TOKENS_MAP_JSON, TOKENIZER_FILES,
    TOKENIZER_JSON, VOCAB_JSON, TokenizerSpec, find_files, packaged_files, read_files, write_files,
)  # fmt: skip

__all__ = ["Tokenizer", "DEFAULT_EOS_TOKEN"]

DEFAULT_EOS_TOKEN = "<|endoftext|>"

# Hub repos whose tokenizer is exactly the packaged one: no download needed.
_GPT2_REPO_IDS = {
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
    "openai-community/gpt2", "openai-community/gpt2-medium", "openai-community/gpt2-large",
    "openai-community/gpt2-xl", "distilbert/distilgpt2",
}  # fmt: skip


@dataclass(frozen=True)
class _Tables:
    """Lookup tables derived from a spec (built once per spec, shared by its tokenizers)."""

    id_to_token: dict[int, str]  # vocabulary and added tokens
    token_to_id: dict[str, int]
    id_to_bytes: tuple[bytes | None, ...]  # what decode emits per id; None: no such id
    special_ids: frozenset[int]  # ids decode(skip_special_tokens=True) drops


@functools.lru_cache(maxsize=32)
def _tables(spec: TokenizerSpec) -> _Tables:
    id_to_token = {i: t for t, i in spec.bpe.vocab.items()}
    id_to_token.update({i: t.content for i, t in spec.added_tokens.items()})
    n = 1 + max(id_to_token)
    id_to_bytes: list[bytes | None] = [None] * n
    for i, token in id_to_token.items():
        id_to_bytes[i] = decoded_bytes(token)
    specials = {t.content for t in spec.added_tokens.values() if t.special}
    return _Tables(
        id_to_token=id_to_token,
        token_to_id={**spec.bpe.vocab, **{t.content: i for i, t in spec.added_tokens.items()}},
        id_to_bytes=tuple(id_to_bytes),
        special_ids=frozenset(i for i, t in id_to_token.items() if t in specials),
    )


def _coerce_ids(ids: Any) -> list[int]:
    """A list/tuple of ints, a 1-D tensor or NumPy array (or a 0-d one) as a list."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        if getattr(ids, "ndim", 1) > 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)} (use batch_decode)")
        ids = ids.tolist()
        return ids if isinstance(ids, list) else [ids]
    if isinstance(ids, int):
        raise TypeError("expected a sequence of token ids, not a single int (wrap it in a list)")
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}")
    return ids if isinstance(ids, list) else list(ids)


def _utf8_length(ch: str) -> int:
    cp = ord(ch)
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


class Tokenizer:
    """GPT-2's byte-level BPE tokenizer on tiktoken, with the ids of transformers 5's tokenizer.

    ``Tokenizer()`` is GPT-2's own tokenizer (files shipped in ``minigpt2/data``);
    :meth:`from_pretrained` reads any checkpoint's (a directory or a Hub repo):
    ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, with added tokens and their flags,
    named special tokens and ``add_prefix_space`` from ``tokenizer_config.json``.

    Args:
        vocab_file, merges_file: a ``vocab.json`` and ``merges.txt`` (both or neither; neither:
            GPT-2's own files), read as ``transformers.GPT2Tokenizer(vocab_file, merges_file)``
            reads them: ``<|endoftext|>`` is the unknown, begin and end token.
        added_tokens: tokens to add (``AddedToken`` or a string, a plain added token), as
            transformers' ``tokenizer.add_tokens``: an existing token keeps its id, a new one
            takes the next.
        eos_token, pad_token: the end-of-text and padding tokens (strings), overriding the files.
        add_prefix_space: put a space before each text (and each stretch between added tokens)
            that does not start with one, so the first word is tokenized like any other.

    Raises:
        FileNotFoundError: a named file does not exist.
        ValueError: one of the two files without the other, or files that are not a byte-level
            BPE vocabulary.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        merges_file: str | os.PathLike[str] | None = None,
        *,
        added_tokens: Iterable[AddedToken | str] = (),
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_prefix_space: bool | None = None,
    ) -> None:
        if (vocab_file is None) != (merges_file is None):
            raise ValueError("pass both vocab_file and merges_file, or neither")
        if vocab_file is None:
            files, source = packaged_files(), "gpt2 (packaged with minigpt2)"
        else:
            files = {VOCAB_JSON: Path(vocab_file).expanduser(), MERGES_TXT: Path(os.fspath(merges_file)).expanduser()}
            for path in files.values():
                if not path.is_file():
                    raise FileNotFoundError(f"tokenizer file not found: {path}")
            source = str(files[VOCAB_JSON].parent)
        tokens = tuple(t if isinstance(t, AddedToken) else AddedToken(str(t)) for t in added_tokens)
        self._init(read_files(files, source, add_prefix_space=add_prefix_space,
                              special_tokens=_overrides(eos_token, pad_token), added_tokens=tokens))  # fmt: skip

    def _init(self, spec: TokenizerSpec) -> None:
        self._spec = spec
        self._tables = _tables(spec)
        self._added = _added_vocabulary(spec)
        self._pad_token = spec.special_tokens_map.get("pad_token")
        #: Default side for padding ("right"; "left" for generate) and truncation, from the config.
        self.padding_side: str = spec.padding_side
        self.truncation_side: str = spec.truncation_side
        #: The longest input the model takes, from the config (transformers' 1e30 when unset).
        self.model_max_length: int = spec.model_max_length
        #: Where the files came from (a directory, a Hub id, or the packaged GPT-2).
        self.name_or_path: str = spec.source

    @classmethod
    def _from_spec(cls, spec: TokenizerSpec) -> Tokenizer:
        tok = cls.__new__(cls)
        tok._init(spec)
        return tok

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        revision: str | None = None,
        add_prefix_space: bool | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> Tokenizer:
        """The tokenizer of a checkpoint directory or Hub repo.

        * a directory: its tokenizer files (``tokenizer.json``, or ``vocab.json`` +
          ``merges.txt``; with ``tokenizer_config.json``, ``special_tokens_map.json``,
          ``added_tokens.json`` when present);
        * a Hub repo id: the same files through ``huggingface_hub`` (the local cache only with
          ``HF_HUB_OFFLINE=1`` or when the Hub does not answer); ``gpt2``, ``gpt2-medium``,
          ``gpt2-large``, ``gpt2-xl``, ``distilgpt2`` (and their ``openai-community/`` names)
          need no download, their files ship with minigpt2;
        * None: GPT-2's own tokenizer.

        A checkpoint with no tokenizer file at all gets GPT-2's tokenizer and a ``UserWarning``
        that says so. ``add_prefix_space``, ``eos_token`` and ``pad_token`` override the files.

        Raises:
            FileNotFoundError: a name that looks like a path (or an ``os.PathLike``) names no
                directory.
            ValueError: tokenizer files without a vocabulary (e.g. only tokenizer_config.json),
                files that are not a byte-level BPE tokenizer, or a Hub repo that cannot be read
                (unknown, private, not cached while offline), naming it.
        """
        overrides = _overrides(eos_token, pad_token)
        if name_or_path is None:
            return cls(add_prefix_space=add_prefix_space, eos_token=eos_token, pad_token=pad_token)
        name = os.fspath(name_or_path)
        path = local_dir(name_or_path, "tokenizer")
        if path is not None:
            files = find_files(path)
        elif revision is None and name in _GPT2_REPO_IDS:
            files = packaged_files()
        else:
            files = _hub_files(name, revision)
        if not files:
            warnings.warn(
                f"{name} has no tokenizer files ({TOKENIZER_JSON}, or {VOCAB_JSON} + {MERGES_TXT}); "
                "using GPT-2's tokenizer (packaged with minigpt2)",
                UserWarning,
                stacklevel=2,
            )
            return cls(add_prefix_space=add_prefix_space, eos_token=eos_token, pad_token=pad_token)
        return cls._from_spec(read_files(files, name, add_prefix_space=add_prefix_space, special_tokens=overrides))

    # -- vocabulary and special tokens -------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        """Number of token ids: one more than the largest id (50257 for GPT-2). A model's
        ``vocab_size`` must be at least this."""
        return len(self._tables.id_to_bytes)

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, eos_token_id={self.eos_token_id})"

    def _special(self, name: str) -> str | None:
        return self._pad_token if name == "pad_token" else self._spec.special_tokens_map.get(name)

    def _special_id(self, name: str) -> int | None:
        token = self._special(name)
        return None if token is None else self._tables.token_to_id.get(token)

    @property
    def eos_token(self) -> str | None:
        """End-of-text token (``<|endoftext|>`` for GPT-2), or None if the checkpoint has none."""
        return self._special("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        """End-of-text token id (50256 for GPT-2): where ``generate`` stops."""
        return self._special_id("eos_token")

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-text token (``<|endoftext|>`` for GPT-2)."""
        return self._special("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-text token id (50256 for GPT-2)."""
        return self._special_id("bos_token")

    @property
    def unk_token(self) -> str | None:
        """The token :meth:`convert_tokens_to_ids` gives for unknown strings (``<|endoftext|>``
        for GPT-2; byte-level BPE itself never needs one)."""
        return self._special("unk_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token(self) -> str | None:
        """Padding token the checkpoint declares, or None (GPT-2 declares none). Settable to any
        token of the vocabulary, as in transformers (``tok.pad_token = tok.eos_token``)."""
        return self._pad_token

    @pad_token.setter
    def pad_token(self, value: str | None) -> None:
        if value is not None and value not in self._tables.token_to_id:
            raise ValueError(f"pad_token {value!r} is not a token of this tokenizer's vocabulary")
        self._pad_token = value

    @property
    def pad_token_id(self) -> int | None:
        """Id of :attr:`pad_token`, or None. Padding without a pad token fills with
        :attr:`eos_token_id` (the attention mask marks those positions, so the id never matters)."""
        return self._special_id("pad_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens: ``{"bos_token": ..., "eos_token": ..., ...}`` (set ones)."""
        named = dict(self._spec.special_tokens_map)
        named.pop("pad_token", None)
        if self._pad_token is not None:
            named["pad_token"] = self._pad_token
        return named

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens and the additional ones, each once (transformers' order)."""
        out: list[str] = []
        named = self.special_tokens_map
        for name in [*SPECIAL_TOKEN_NAMES, *sorted(set(named) - set(SPECIAL_TOKEN_NAMES))]:
            if name in named and named[name] not in out:
                out.append(named[name])
        out += [t for t in self._spec.extra_special_tokens if t not in out]
        return out

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of :attr:`all_special_tokens`."""
        return [self._tables.token_to_id[t] for t in self.all_special_tokens if t in self._tables.token_to_id]

    @property
    def special_tokens(self) -> dict[str, int]:
        """The special added tokens ``{content: id}``: split out of the text before BPE (unless
        ``allowed_special`` says otherwise) and dropped by ``skip_special_tokens``."""
        return {t.content: i for i, t in self._spec.added_tokens.items() if t.special}

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        """Every added token ``{id: AddedToken}`` with its flags (special or not), as transformers'
        ``added_tokens_decoder``."""
        return dict(self._spec.added_tokens)

    @property
    def add_prefix_space(self) -> bool:
        """Whether a space is put before each text that does not start with one."""
        return self._spec.add_prefix_space

    def get_vocab(self) -> dict[str, int]:
        """``{token string: id}`` for the whole vocabulary and the added tokens. Token strings are
        spelled in the byte-level alphabet (``"Ġworld"`` is " world"), as in vocab.json."""
        return dict(self._tables.token_to_id)

    def convert_ids_to_tokens(self, ids: int | Sequence[int] | Any, skip_special_tokens: bool = False) -> str | list[str]:
        """Token strings of ids (byte-level spelling, added tokens as their content): one id gives
        a string, a sequence a list. ``skip_special_tokens`` drops :attr:`all_special_ids`.

        Raises:
            ValueError: an id outside the vocabulary. TypeError: an id that is not an integer.
        """
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._token_of(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._token_of(i) for i in self._check_ids(_coerce_ids(ids)) if i not in skip]

    def _token_of(self, idx: int) -> str:
        token = self._tables.id_to_token.get(idx)
        if token is None:
            raise ValueError(f"token id {idx} is not in the vocabulary (ids 0..{self.n_vocab - 1})")
        return token

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of token strings (byte-level spelling, as :meth:`convert_ids_to_tokens` gives):
        one string gives an id, a sequence a list. An unknown string gives :attr:`unk_token_id`
        (None when there is none), as in transformers."""
        if isinstance(tokens, str):
            return self._tables.token_to_id.get(tokens, self.unk_token_id)
        return [self._tables.token_to_id.get(t, self.unk_token_id) for t in tokens]

    # -- encoding ----------------------------------------------------------------------------
    def _skipped(self, text: str, allowed_special: Any, disallowed_special: Any) -> AbstractSet[str]:
        """Special tokens to read as plain text in ``text``; raises for disallowed ones present."""
        specials = self._added.special
        if allowed_special is None and not disallowed_special:
            return specials if self._spec.split_special_tokens else frozenset()
        if allowed_special is None:
            allowed = frozenset() if self._spec.split_special_tokens else specials
        elif allowed_special == "all":
            allowed = specials
        else:
            allowed = frozenset(self._check_special_names(allowed_special, "allowed_special"))
        if disallowed_special == "all":
            disallowed = specials - allowed
        else:
            disallowed = frozenset(self._check_special_names(disallowed_special or (), "disallowed_special"))
        for token in sorted(disallowed):
            if token in text:
                raise ValueError(
                    f"the text holds the special token {token!r}, which disallowed_special refuses; pass "
                    f"allowed_special={{{token!r}}} to encode it as the special token, or disallowed_special=() "
                    "to encode it as plain text"
                )
        return specials - allowed

    def _check_special_names(self, names: Any, what: str) -> AbstractSet[str]:
        if isinstance(names, str):
            raise ValueError(f"{what}={names!r} must be 'all' or a set of special token strings")
        names = set(names)
        unknown = names - self._added.special
        if unknown:
            raise ValueError(
                f"{what}: {sorted(unknown)!r} are not special tokens of this tokenizer (its special tokens: "
                f"{sorted(self._added.special)!r})"
            )
        return names

    def _encode_segment(self, segment: str) -> list[int]:
        if self._spec.add_prefix_space and not segment.startswith(" "):
            segment = " " + segment
        bpe = self._spec.bpe
        return bpe.encode_ordinary(segment) if self._spec.use_regex else bpe.encode_piece(segment)

    def encode(
        self, text: str, *, allowed_special: str | AbstractSet[str] | None = None, disallowed_special: str | AbstractSet[str] = ()
    ) -> list[int]:
        """Token ids of ``text``: those of transformers' ``tokenizer.encode(text,
        add_special_tokens=False)`` (no BOS/EOS template; the call ``tok(text)`` adds it).

        Added tokens in the text (``<|endoftext|>``, a fine-tune's ``<pad>``, ...) become their
        id, with their lstrip / rstrip / single_word flags; the rest goes through GPT-2's
        pre-tokenization and BPE. Any string encodes, whatever its length or runs (a lone
        surrogate, which is not Unicode and which transformers refuses, encodes as U+FFFD, as
        in tiktoken).

        Args:
            allowed_special: special tokens recognised in the text: ``"all"``, or a set of their
                strings (others are encoded as plain text). Default: all, as transformers does
                (none when the checkpoint sets ``split_special_tokens``). Non-special added
                tokens are always recognised.
            disallowed_special: special tokens that must not appear: ``"all"`` (every one not
                allowed), or a set. Default: none. tiktoken's choice, e.g. for user text:
                ``encode(text, allowed_special=set(), disallowed_special="all")`` refuses
                ``<|endoftext|>``; ``allowed_special=set()`` alone encodes it as plain text.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: a disallowed special token is in the text, or a name in
                ``allowed_special`` / ``disallowed_special`` is not a special token.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        skip = self._skipped(text, allowed_special, disallowed_special)
        ids: list[int] = []
        for part in self._added.split(text, skip):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._encode_segment(part))
        return ids

    def encode_batch(
        self,
        texts: Iterable[str],
        num_threads: int = 8,
        *,
        allowed_special: str | AbstractSet[str] | None = None,
        disallowed_special: str | AbstractSet[str] = (),
    ) -> list[list[int]]:
        """:meth:`encode` of each text; large batches are split over threads (tiktoken releases
        the GIL while it encodes)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, but texts[{i}] is {t!r:.40} (type {type(t).__name__})")

        def run(chunk: list[str]) -> list[list[int]]:
            return [self.encode(t, allowed_special=allowed_special, disallowed_special=disallowed_special) for t in chunk]

        if num_threads <= 1 or len(texts) < 2 or sum(map(len, texts)) < (1 << 16):
            return run(texts)
        size = -(-len(texts) // (4 * num_threads))
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            parts = pool.map(run, [texts[i : i + size] for i in range(0, len(texts), size)])
            return [ids for part in parts for ids in part]

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        allowed_special: str | AbstractSet[str] | None = None,
        disallowed_special: str | AbstractSet[str] = (),
    ) -> _batch.BatchEncoding:
        """Tokenize a text or a batch of texts as transformers' ``tokenizer(...)`` does.

        ``tok(["Hello", "Hi there"], padding=True, padding_side="left", return_tensors="pt")``
        gives ``input_ids`` and ``attention_mask``, int64 tensors [batch, seq], padding on the
        left with mask 0: ready for ``model.generate(**enc)``. One string gives unbatched lists
        (or [1, seq] tensors).

        Args:
            add_special_tokens: add the checkpoint's template tokens (a BOS some fine-tunes
                declare; none for GPT-2).
            padding: ``False`` / ``"do_not_pad"``, ``True`` / ``"longest"`` (to the longest row) or
                ``"max_length"`` (to ``max_length``, else :attr:`model_max_length`).
            truncation: ``True`` / ``"longest_first"`` / ``"only_first"`` cut rows to
                ``max_length`` tokens (template tokens included) on :attr:`truncation_side`;
                ``None`` truncates only when ``max_length`` is given without padding.
            max_length: the length for padding="max_length" and truncation.
            pad_to_multiple_of: round the padded length up to a multiple of this.
            padding_side: ``"left"`` or ``"right"`` (default :attr:`padding_side`, "right").
            return_tensors: ``"pt"`` (torch), ``"np"`` (NumPy) or None (Python lists).
            return_attention_mask: include ``attention_mask`` (1 real token, 0 padding).
            allowed_special, disallowed_special: as in :meth:`encode`.

        Padding fills with :attr:`pad_token_id`, or :attr:`eos_token_id` when the checkpoint has
        no pad token (transformers raises there; the mask makes the id irrelevant).

        Raises:
            TypeError: ``text`` is neither a str nor a sequence of str.
            ValueError: a bad padding / truncation / side / tensor type value, rows of different
                lengths with ``return_tensors`` and no padding, padding with neither a pad nor an
                EOS token, or what :meth:`encode` raises.
        """
        single = isinstance(text, str)
        if single:
            texts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts = list(text)
        elif isinstance(text, (list, tuple)):
            i, x = next((i, x) for i, x in enumerate(text) if not isinstance(x, str))
            hint = "; to turn token ids into text use decode / batch_decode" if isinstance(x, int) else ""
            raise TypeError(f"expected a str or a list of str, but text[{i}] is {x!r:.40} (type {type(x).__name__}){hint}")
        else:
            raise TypeError(f"expected a str or a list of str, got {text!r:.40} (type {type(text).__name__})")
        side = self.padding_side if padding_side is None else padding_side
        for name, value in (("padding_side", side), ("truncation_side", self.truncation_side)):
            if value not in ("left", "right"):
                raise ValueError(f"{name}={value!r} must be 'left' or 'right'")
        strategy, pad_to, truncate_to = _batch.strategies(padding, truncation, max_length, pad_to_multiple_of,
                                                          self.model_max_length)  # fmt: skip
        rows = self.encode_batch(texts, allowed_special=allowed_special, disallowed_special=disallowed_special)
        prefix, suffix = (list(self._spec.prefix_ids), list(self._spec.suffix_ids)) if add_special_tokens else ([], [])
        if truncate_to is not None:
            rows = _batch.truncate(rows, max(truncate_to - len(prefix) - len(suffix), 0), self.truncation_side)
        rows = [prefix + row + suffix for row in rows]
        pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        if strategy != "none" and pad_id is None:
            raise ValueError("padding needs a pad token and this tokenizer has neither a pad_token nor an eos_token")
        ids, masks = _batch.pad(rows, strategy, pad_to, pad_to_multiple_of, pad_id if pad_id is not None else 0, side)
        out = _batch.BatchEncoding()
        fields = {"input_ids": ids, "attention_mask": masks} if return_attention_mask else {"input_ids": ids}
        for key, value in fields.items():
            value = _batch.as_tensors(value, return_tensors, key)
            out[key] = value[0] if single and return_tensors is None else value
        return out

    # -- decoding ----------------------------------------------------------------------------
    def _check_ids(self, ids: list[Any]) -> list[int]:
        table = self._tables.id_to_bytes
        for i in ids:
            if not isinstance(i, int) and not hasattr(i, "__index__"):
                raise TypeError(f"token ids must be integers, got {i!r}")
        if ids:
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= len(table):
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for vocabulary size {len(table)}")
        return [int(i) for i in ids]

    def _pieces(self, ids: Any, skip_special_tokens: bool) -> list[bytes]:
        """The bytes each id decodes to (b"" for skipped special tokens)."""
        ids = _coerce_ids(ids)
        table = self._tables.id_to_bytes
        try:
            if ids and min(ids) < 0:  # a negative index would read from the end
                raise IndexError
            pieces = [table[i] for i in ids]
        except (TypeError, IndexError):
            self._check_ids(ids)  # raises the precise error
            raise
        if skip_special_tokens:
            special = self._tables.special_ids
            pieces = [b"" if i in special else p for i, p in zip(ids, pieces)]
        return pieces  # type: ignore[return-value]

    def _join(self, ids: Any, pieces: list[bytes]) -> bytes:
        try:
            return b"".join(pieces)
        except TypeError:  # a None: an id inside the range that no token has
            missing = next(i for i, p in zip(_coerce_ids(ids), pieces) if p is None)
            raise ValueError(f"token id {missing} is not in the vocabulary (size {self.n_vocab})") from None

    def decode_bytes(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> bytes:
        """Raw bytes of ``ids``; may end inside a UTF-8 character (a stream holds such a tail
        back until the next token completes it).

        Raises:
            ValueError: an id outside the vocabulary. TypeError: an id that is not an integer.
        """
        pieces = self._pieces(ids, skip_special_tokens)
        return self._join(ids, pieces)

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list/tuple of ints, a 1-D tensor or NumPy array): transformers'
        ``tokenizer.decode(ids, skip_special_tokens=...)``. Bytes that are not valid UTF-8 (a
        character split across tokens) become U+FFFD. ``skip_special_tokens`` drops the special
        added tokens (``<|endoftext|>``, a declared pad token, ...). No clean-up of spaces:
        transformers 5 skips it for BPE tokenizers. ``decode(encode(s)) == s`` unless ``s`` holds
        an added token whose text is not byte-level (transformers decodes those the same way).

        Raises:
            ValueError: an id outside the vocabulary, or a 2-D input (use :meth:`batch_decode`).
            TypeError: an id that is not an integer.
        """
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Iterable[Sequence[int]] | Any, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` of each row (a list of lists, or a 2-D tensor / array)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
            raise TypeError(f"batch_decode takes a list of rows of token ids, got {sequences!r:.40}; "
                            "use decode for one row")
        sequences = list(sequences)
        for i, row in enumerate(sequences):
            if isinstance(row, int):
                raise TypeError(f"batch_decode takes a list of rows of token ids, but row {i} is the single id {row}; "
                                "use decode for one row")
        return [self.decode(row, skip_special_tokens) for row in sequences]

    def decode_with_offsets(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> tuple[str, list[int]]:
        """``(text, offsets)``: :meth:`decode`'s text and, for each id, the character index in
        that text where the token's bytes start (OpenAI's ``logprobs.text_offset``, tiktoken's
        ``decode_with_offsets``). A token that starts inside a character another token began (a
        byte of a split emoji) gets that character's index; a skipped special token gets the
        index of what follows it. Offsets never decrease; ``len(offsets) == len(ids)``.

        Raises:
            ValueError / TypeError: as :meth:`decode`.
        """
        pieces = self._pieces(ids, skip_special_tokens)
        data = self._join(ids, pieces)
        text = data.decode("utf-8", errors="replace")
        # Byte offset where each character of ``text`` starts. A U+FFFD either was in the bytes
        # (EF BF BD) or replaced a maximal ill-formed subsequence, whose length the strict
        # decoder reports as the error's end.
        char_starts = []
        pos = 0
        for ch in text:
            char_starts.append(pos)
            if ch != "\ufffd" or data.startswith(b"\xef\xbf\xbd", pos):
                pos += _utf8_length(ch)
            else:
                try:
                    data[pos : pos + 4].decode("utf-8")
                    pos += 1  # pragma: no cover - the decoder replaced something here
                except UnicodeDecodeError as e:
                    pos += max(e.end, 1) if e.start == 0 else e.start
        offsets = []
        byte = 0
        for piece in pieces:
            offsets.append(bisect.bisect_right(char_starts, byte) - 1 if byte < len(data) else len(text))
            byte += len(piece)
        return text, offsets

    # -- saving ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> tuple[str, ...]:
        """Write the tokenizer files into ``directory`` (created if needed): tokenizer.json and
        tokenizer_config.json (what transformers 5 writes), vocab.json, merges.txt and
        special_tokens_map.json (+ added_tokens.json) for older readers. transformers'
        ``AutoTokenizer`` and :meth:`from_pretrained` load it with the same ids, added tokens,
        flags and special tokens. Each file is written under a temporary name and renamed.

        Returns:
            The paths written.
        """
        named = dict(self._spec.special_tokens_map)
        named.pop("pad_token", None)
        if self._pad_token is not None:
            named["pad_token"] = self._pad_token
        spec = replace(self._spec, special_tokens_map=named, padding_side=self.padding_side,
                       truncation_side=self.truncation_side, model_max_length=self.model_max_length)  # fmt: skip
        return tuple(str(p) for p in write_files(directory, spec))


@functools.lru_cache(maxsize=32)
def _added_vocabulary(spec: TokenizerSpec) -> AddedVocabulary:
    return AddedVocabulary(spec.added_tokens)


def _overrides(eos_token: str | None, pad_token: str | None) -> dict[str, str]:
    out = {}
    if eos_token is not None:
        out["eos_token"] = eos_token
    if pad_token is not None:
        out["pad_token"] = pad_token
    return out


def _hub_files(repo_id: str, revision: str | None) -> dict[str, Path]:
    """A Hub repo's tokenizer files, downloaded (or from the cache): ``{file name: path}``;
    empty when the repo has none.

    Raises:
        ValueError: the repo cannot be read (unknown, private, network error), or it is not in
            the cache while the Hub is out of reach, naming the repo.
    """
    repo = HubRepo(repo_id, revision, what="tokenizer")
    files: dict[str, Path] = {}
    for name in (CONFIG_JSON, TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, SPECIAL_TOKENS_MAP_JSON, ADDED_TOKENS_JSON):
        if name in (VOCAB_JSON, MERGES_TXT) and TOKENIZER_JSON in files:
            continue  # tokenizer.json holds the vocabulary
        path = repo.file(name)
        if path is not None:
            files[name] = path
    if not files and repo.not_cached:
        raise repo.error()
    assert set(files) <= set(TOKENIZER_FILES)
    return files

