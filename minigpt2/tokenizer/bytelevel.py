"""GPT-2's byte-level BPE on tiktoken: the byte alphabet, the merge table, and pre-tokenization
that stays fast on runs of one character class of any length.

GPT-2 (OpenAI's ``encoder.py``; transformers' ``GPT2Tokenizer``; the ``tokenizers`` library's
``ByteLevel`` pre-tokenizer + ``BPE`` model) tokenizes a text in three steps:

1. *pre-tokenization*: :data:`GPT2_PATTERN` cuts the text into pieces (a word with its leading
   space, a run of digits, of punctuation, of whitespace), and no merge ever crosses a piece;
2. each piece's UTF-8 bytes are spelled in the *byte-level alphabet* (one printable character
   per byte, :func:`bytes_to_unicode`), the spelling vocab.json and merges.txt use;
3. *BPE*: the adjacent pair with the best merges.txt rank is merged until none is left.

tiktoken runs steps 1 and 3 in Rust. It wants ``{token bytes: rank}``, and merges the adjacent
pair whose *concatenation* has the lowest rank; with ranks in merges.txt order that is the same
BPE as transformers' pair ranks on vocabularies a BPE trainer produced (the tests hold it against
transformers on GPT-2's vocabulary, every one of its token strings, and a freshly trained one).

One thing tiktoken cannot do is a long run of whitespace: its regex engine (fancy-regex)
backtracks through ``\\s+(?!\\S)`` one character at a time on a stack that overflows near 10^6
characters, and the overflow is a Rust panic (``pyo3_runtime.PanicException``, a BaseException).
:meth:`ByteLevelBPE.encode_ordinary` therefore cuts every whitespace run of :data:`LONG_RUN` or
more characters out of the text before tiktoken sees it, and BPE-encodes the run as the piece the
regex would have made of it (see the method for why the cut is exact). Long runs of letters,
digits or punctuation are single pieces that tiktoken (>= 0.13, a heap-based merge for long
pieces) encodes in O(n log n).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tiktoken

__all__ = [
    "GPT2_PATTERN", "LONG_RUN", "WHITESPACE", "ByteLevelBPE", "bytes_to_unicode", "decoded_bytes",
    "token_to_bytes", "bytes_to_token",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: GPT-2's pre-tokenization regex (the ``tokenizers`` ByteLevel pre-tokenizer's, with the
#: contractions grouped): contractions, letter runs, digit runs and punctuation runs (each with
#: at most one leading space), then whitespace. ``\s+(?!\S)`` leaves the last whitespace
#: character of a run to start the next piece, so " world" keeps its space.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: The characters ``\s`` matches in GPT-2's regex, in tiktoken (Rust ``regex``: the Unicode
#: White_Space property) and in transformers (Oniguruma) alike: Python's ``str.isspace`` less the
#: four information separators U+001C..U+001F. The tests check it against tiktoken's ``\s`` for
#: every code point.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"

#: Whitespace runs at least this long are encoded without tiktoken's regex (far below the
#: ~10^6 characters where its backtracking stack overflows; far above any run in normal text).
LONG_RUN = 1024

_LONG_WHITESPACE = re.compile(f"[{re.escape(WHITESPACE)}]{{{LONG_RUN},}}")


def _may_hold_a_long_run(text: str) -> bool:
    """False when ``text`` surely has no whitespace run of LONG_RUN characters.

    Such a run covers a whole block ``text[k : k + LONG_RUN // 2]`` with ``k`` a multiple of
    LONG_RUN // 2, and ``str.isspace`` accepts every WHITESPACE character: looking at those
    blocks costs a few hundred C-level checks per MB, where the exact regex scan costs a Python
    ``re`` attempt at every whitespace character (~10% of the encoding time of ordinary text).
    """
    half = LONG_RUN // 2
    return any(text[k : k + half].isspace() for k in range(0, len(text) - half + 1, half))


# ---------------------------------------------------------------------------------------------
# GPT-2's byte <-> printable-unicode alphabet
# ---------------------------------------------------------------------------------------------
@functools.cache
def bytes_to_unicode() -> tuple[str, ...]:
    """The character GPT-2 spells each byte value 0..255 with (``bytes_to_unicode`` in OpenAI's
    ``encoder.py`` and transformers).

    The 188 bytes that are printable, non-space Latin-1 characters (``!``..``~`` 33..126,
    ``¡``..``¬`` 161..172, ``®``..``ÿ`` 174..255) are spelled by the code point with the same
    number; the other 68 (controls, space, DEL, NBSP, soft hyphen) by 256, 257, ... in byte
    order. So the space 0x20 is ``Ġ`` (U+0120) and the newline 0x0A is ``Ċ`` (U+010A).
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = []
    extra = 256
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(extra))
            extra += 1
    return tuple(table)


@functools.cache
def _to_latin1() -> dict[int, int]:
    """``str.translate`` table: each alphabet character to the Latin-1 character of its byte, and
    the Latin-1 characters that are *not* in the alphabet (space, controls) to U+0100, which
    ``encode("latin-1")`` refuses, so a token that is not byte-level fails as a whole."""
    table = {ord(ch): b for b, ch in enumerate(bytes_to_unicode())}
    for c in range(256):
        table.setdefault(c, 0x100)
    return table


def token_to_bytes(token: str) -> bytes | None:
    """The bytes a token string spells in the byte-level alphabet, or None if it is not one."""
    try:
        return token.translate(_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        return None


def decoded_bytes(token: str) -> bytes:
    """The bytes decoding emits for a token string, as the ``tokenizers`` ByteLevel decoder does:
    the spelled bytes when every character is in the byte-level alphabet, else the token's own
    UTF-8 (an added token such as ``" <pad>"``). Per token, not per character: an added token
    ``"café"`` decodes to ``b"caf\\xe9"`` (invalid UTF-8, shown as U+FFFD), as in transformers.
    """
    data = token_to_bytes(token)
    return data if data is not None else token.encode("utf-8", errors="surrogatepass")


def bytes_to_token(data: bytes) -> str:
    """Spell raw bytes in the byte-level alphabet."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


# ---------------------------------------------------------------------------------------------
# The BPE engine
# ---------------------------------------------------------------------------------------------
def _check_vocab(vocab: Mapping[str, Any], source: str) -> None:
    if not vocab:
        raise ValueError(f"{source}: the vocabulary is empty")
    ids = list(vocab.values())
    for token, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError(f"{source}: vocabulary id of {token!r} must be a non-negative integer, got {idx!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: the vocabulary maps several tokens to the same id")


class ByteLevelBPE:
    """A byte-level BPE vocabulary (vocab + merges) as a tiktoken engine with token ids.

    Args:
        vocab: ``{token string in the byte-level alphabet: id}`` (vocab.json, or tokenizer.json's
            ``model.vocab``).
        merges: the merges, best first, as ``(left, right)`` token strings.
        source: where they came from, for error messages.

    Raises:
        ValueError: an empty vocabulary, ids that are not distinct non-negative integers, or a
            vocabulary without the 256 single-byte tokens (not byte-level).
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], source: str) -> None:
        _check_vocab(vocab, source)
        self.vocab: dict[str, int] = dict(vocab)
        self.merges: tuple[tuple[str, str], ...] = tuple(merges)
        self.source = source

        # 1. The 256 single bytes: every BPE starts from them.
        token_bytes_to_id: dict[bytes, int] = {}
        for b, ch in enumerate(bytes_to_unicode()):
            if ch not in self.vocab:
                raise ValueError(
                    f"{source}: the vocabulary has no token for byte {b} (spelled {ch!r}); not a byte-level BPE vocabulary"
                )
            token_bytes_to_id[bytes([b])] = self.vocab[ch]

        # 2. Merge results in priority order. Merges that use tokens missing from the vocabulary
        #    or repeat an earlier result cannot be expressed as tiktoken ranks: skip them, loudly.
        merge_order: list[bytes] = []
        problems: list[str] = []
        for left, right in self.merges:
            merged = left + right
            if left not in self.vocab or right not in self.vocab or merged not in self.vocab:
                problems.append(f"merge {left!r} {right!r} uses tokens missing from the vocabulary")
                continue
            data = token_to_bytes(merged)
            if data is None:
                problems.append(f"merge {left!r} {right!r} is not byte-level")
                continue
            if data in token_bytes_to_id:
                problems.append(f"merge {left!r} {right!r} repeats an existing token")
                continue
            token_bytes_to_id[data] = self.vocab[merged]
            merge_order.append(data)
        if problems:
            logger.warning("%s: ignored %d inconsistent merge(s), e.g. %s", source, len(problems), problems[0])

        # 3. Ranks. When ids grow with merge order (GPT-2 and most fine-tunes) tiktoken can return
        #    the ids themselves (only multi-byte ranks order merges); otherwise it works on merge
        #    order and ranks are translated.
        merge_ids = [token_bytes_to_id[data] for data in merge_order]
        if all(a < b for a, b in zip(merge_ids, merge_ids[1:])):
            self._ranks = dict(token_bytes_to_id)
            self._rank_to_id: tuple[int, ...] | None = None
        else:
            self._ranks = {bytes([b]): b for b in range(256)}
            for i, data in enumerate(merge_order):
                self._ranks[data] = 256 + i
            translation = [0] * len(self._ranks)
            for data, rank in self._ranks.items():
                translation[rank] = token_bytes_to_id[data]
            self._rank_to_id = tuple(translation)
        #: ids BPE can produce (single bytes and merge results); other vocabulary entries only decode.
        self.reachable_ids = frozenset(token_bytes_to_id.values())
        self.encoding = tiktoken.Encoding(
            name=f"minigpt2-bpe-{len(self._ranks)}", pat_str=GPT2_PATTERN, mergeable_ranks=self._ranks, special_tokens={}
        )

    @functools.cached_property
    def _piece_encoding(self) -> tiktoken.Encoding:
        """The same ranks with a pattern that makes the whole input one piece: BPE without the
        pre-tokenization regex (a plain regex, so no backtracking whatever the length)."""
        return tiktoken.Encoding(
            name=f"minigpt2-bpe-piece-{len(self._ranks)}", pat_str=r"[\s\S]+", mergeable_ranks=self._ranks, special_tokens={}
        )

    def _ids(self, ranks: list[int]) -> list[int]:
        table = self._rank_to_id
        return ranks if table is None else [table[r] for r in ranks]

    def encode_piece(self, text: str) -> list[int]:
        """BPE of ``text`` as one piece, without pre-tokenization (a ByteLevel pre-tokenizer
        with ``use_regex: false``)."""
        return self._ids(self._piece_encoding.encode_ordinary(text)) if text else []

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text``: GPT-2's pre-tokenization and BPE, with no special tokens.

        Linear in the text whatever its runs. Whitespace runs of :data:`LONG_RUN` or more
        characters never reach tiktoken's regex. The cut around such a run [s, e) is exact:

        * nothing before s depends on the run: every alternative of :data:`GPT2_PATTERN` stops
          at whitespace, and the lookahead ``(?!\\S)`` only looks one character past a
          whitespace run, so the pieces of ``text[:s]`` (whose last character is not whitespace)
          are the whole text's pieces up to s;
        * at s the letter / digit / punctuation alternatives fail (a space followed by more
          whitespace), and ``\\s+(?!\\S)`` takes the run less its last character when a non-space
          follows (``text[s:e-1]``), or all of it at the end of the text;
        * what follows (``text[e-1:]`` or nothing) starts a piece, and the regex has no
          lookbehind, so it is tokenized as if the text began there.
        """
        if len(text) < LONG_RUN or not _may_hold_a_long_run(text) or (run := _LONG_WHITESPACE.search(text)) is None:
            return self._ids(self.encoding.encode_ordinary(text))
        ids: list[int] = []
        pos = 0
        while run is not None:
            start, end = run.span()
            if start > pos:
                ids.extend(self._ids(self.encoding.encode_ordinary(text[pos:start])))
            stop = end if end == len(text) else end - 1
            ids.extend(self.encode_piece(text[start:stop]))
            pos = stop
            run = _LONG_WHITESPACE.search(text, end)
        if pos < len(text):
            ids.extend(self._ids(self.encoding.encode_ordinary(text[pos:])))
        return ids
