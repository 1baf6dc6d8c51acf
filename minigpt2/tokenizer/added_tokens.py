"""Added tokens: strings matched in the raw text before BPE, each becoming one id.

A fine-tune declares them in tokenizer.json's ``added_tokens`` (or tokenizer_config.json's
``added_tokens_decoder``), each with the flags of the ``tokenizers`` library's ``AddedToken``.
The matching here is that library's (``AddedVocabulary::extract_and_normalize`` in
``tokenizers/src/tokenizer/added_vocabulary.rs``), which transformers 5 runs for GPT-2:

* two passes: first the tokens with ``normalized=False`` are found in the whole text, then the
  ``normalized=True`` ones in each stretch between those matches (GPT-2 has no normalizer, so the
  flag only decides the pass);
* within a pass, leftmost-longest: the match that starts first, and of those the longest;
* ``single_word``: a match counts only with no word character (``\\w``) right before or after it;
* ``lstrip`` / ``rstrip``: the match swallows the whitespace on its left (not past the previous
  match) / on its right, so that whitespace never becomes tokens of its own;
* ``special`` changes nothing in matching (unless the caller asks for special tokens to be read
  as plain text); ``decode(skip_special_tokens=True)`` drops special tokens.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .bytelevel import WHITESPACE

__all__ = ["AddedToken", "AddedVocabulary"]


@dataclass(frozen=True)
class AddedToken:
    """One added token and its flags (the fields and defaults of ``tokenizers.AddedToken``).

    Attributes:
        content: the token's text, matched literally.
        single_word: match only where it is not part of a longer word.
        lstrip: also take the whitespace on the left of a match.
        rstrip: also take the whitespace on the right of a match.
        normalized: matched in the second pass (after the text's normalizer, which GPT-2 lacks).
        special: a special token: skipped by ``skip_special_tokens``, and read as plain text by
            ``encode(..., allowed_special=set())``.
    """

    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    special: bool = False

    @classmethod
    def from_json(cls, value: Any, *, special: bool | None = None, where: str = "added token") -> AddedToken:
        """From a tokenizer file's entry: a string, or a dict with ``content`` and optional flags
        (a missing ``normalized`` defaults to ``not special``, as in transformers). ``special``
        overrides the entry's own flag when given.

        Raises:
            ValueError: neither a string nor a dict with a string ``content`` (naming ``where``).
        """
        if isinstance(value, str):
            is_special = bool(special)
            return cls(value, normalized=not is_special, special=is_special)
        if not isinstance(value, dict) or not isinstance(value.get("content"), str):
            raise ValueError(f"{where}: expected a string or an object with a string 'content', got {value!r}")
        is_special = bool(value.get("special", False)) if special is None else special
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip") if k in value}
        return cls(value["content"], normalized=bool(value.get("normalized", not is_special)), special=is_special, **flags)

    def to_json(self) -> dict[str, Any]:
        """The dict tokenizer.json and tokenizer_config.json store (same keys as transformers)."""
        return asdict(self)


def _is_word_char(ch: str) -> bool:
    """Rust regex's Unicode ``\\w``: Alphabetic, marks, decimal digits, connector punctuation,
    join controls (the circled letters are the Alphabetic symbols Python's categories miss)."""
    category = unicodedata.category(ch)
    if category[0] in "LM" or category in ("Nd", "Nl", "Pc") or ch in "\u200c\u200d":
        return True
    cp = ord(ch)
    return 0x24B6 <= cp <= 0x24E9 or 0x1F130 <= cp <= 0x1F149 or 0x1F150 <= cp <= 0x1F169 or 0x1F170 <= cp <= 0x1F189


def _trie_pattern(strings: Collection[str]) -> re.Pattern[str] | None:
    """A regex matching the longest of ``strings`` at a position, in time linear in the text.

    An alternation of many literals costs Python's ``re`` one try per literal per position; a
    trie shares prefixes, so each position costs at most the longest token's length. At each
    node the longer continuations come first and the node's own end is the fallback (``(?:...)?``
    is greedy), which is leftmost-longest since at most one child fits the next character.
    """
    if not strings:
        return None
    trie: dict[str, Any] = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = True

    def build(node: dict[str, Any]) -> str:
        branches = []
        for ch, child in sorted(node.items()):
            if not ch:
                continue
            literal = re.escape(ch)
            while len(child) == 1 and "" not in child:  # a chain without branches: one literal
                ((ch, child),) = child.items()
                literal += re.escape(ch)
            branches.append(literal + build(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a token ends here: the continuation is optional
            return f"(?:{body})?"
        return body

    return re.compile(build(trie))


class AddedVocabulary:
    """The added tokens of a tokenizer ``{id: AddedToken}`` and the splitting they make.

    Raises:
        ValueError: two tokens with the same content, or a token with empty content.
    """

    def __init__(self, tokens: Mapping[int, AddedToken]) -> None:
        self.tokens: dict[int, AddedToken] = dict(sorted(tokens.items()))
        self.ids: dict[str, int] = {}
        for idx, token in self.tokens.items():
            if not token.content:
                raise ValueError(f"added token {idx} has empty content")
            if token.content in self.ids:
                raise ValueError(f"added token {token.content!r} has two ids: {self.ids[token.content]} and {idx}")
            self.ids[token.content] = idx
        self.special = frozenset(t.content for t in self.tokens.values() if t.special)
        raw = [t.content for t in self.tokens.values() if not t.normalized]
        normalized = [t.content for t in self.tokens.values() if t.normalized]
        self._passes = [p for p in (_trie_pattern(raw), _trie_pattern(normalized)) if p is not None]
        # Texts holding none of these characters hold no added token (the common case): skip the
        # regex. Only worth it for a few characters (each is a scan of the text).
        first = {t.content[0] for t in self.tokens.values()}
        self._first_chars = frozenset(first) if len(first) <= 8 else None

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def _matches(self, text: str, pattern: re.Pattern[str], skip: Collection[str]) -> Iterator[tuple[int | None, int, int]]:
        """``(id or None, start, stop)`` splits of ``text`` for one pass (tokenizers'
        ``find_matches``, flags included)."""
        offset = 0
        for m in pattern.finditer(text):
            start, stop = m.span()
            if start == stop:
                continue
            token = self.tokens[self.ids[m.group()]]
            if token.content in skip:
                continue
            if token.single_word:
                if (start > 0 and _is_word_char(text[start - 1])) or (stop < len(text) and _is_word_char(text[stop])):
                    continue
            if token.lstrip:
                new_start = start
                while new_start > 0 and text[new_start - 1] in WHITESPACE:
                    new_start -= 1
                start = max(new_start, offset)
            if token.rstrip:
                while stop < len(text) and text[stop] in WHITESPACE:
                    stop += 1
            if offset < start:
                yield None, offset, start
            yield self.ids[token.content], start, stop
            offset = stop
        if offset < len(text):
            yield None, offset, len(text)

    def split(self, text: str, skip: Collection[str] = ()) -> list[str | int]:
        """Cut ``text`` into plain segments (``str``, never empty) and added-token ids (``int``),
        in order. Tokens whose content is in ``skip`` are not matched (read as plain text)."""
        if not self._passes or (self._first_chars is not None and not any(c in text for c in self._first_chars)):
            return [text] if text else []
        pieces: list[str | int] = [text]
        for pattern in self._passes:
            out: list[str | int] = []
            for piece in pieces:
                if isinstance(piece, int):
                    out.append(piece)
                    continue
                for idx, start, stop in self._matches(piece, pattern, skip):
                    out.append(idx if idx is not None else piece[start:stop])
            pieces = out
        return [p for p in pieces if p != ""]
