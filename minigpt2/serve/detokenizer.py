"""Token ids to the text a completion returns, as it becomes final.

Three jobs, per sequence, on the engine thread:

- text: bytes of each new token through an incremental UTF-8 decoder, so a character split
  across tokens comes out whole with the token that completes it (and invalid bytes become
  U+FFFD, as ``bytes.decode(errors="replace")`` of the whole would give);
- stop strings: the text ends before the first stop string (OpenAI: "The returned text will
  not contain the stop sequence"), and while streaming, a tail that could still grow into a
  stop string is held back until it cannot;
- the log-prob fields: each token's string (OpenAI's legacy spelling: its text, or
  ``bytes:\\xe2\\x80`` for bytes that are not whole UTF-8 characters) and its ``text_offset``,
  the character where it starts in the choice's text.

The offsets are the tokenizer's own ``Tokenizer.decode_with_offsets`` (tiktoken's rule: a
token that starts inside a character points at that character). While streaming, each new
token's offset comes from that call on the few tokens since the text last ended on a whole
character (UTF-8 decoding starts afresh there), so it equals the call on the whole text.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from ..tokenizer import Tokenizer


class TokenStrings:
    """Token id -> the bytes it stands for and the string OpenAI's log-prob fields show."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._strings: dict[int, str] = {}

    def bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.decode_bytes([token])
        except ValueError:  # an id the model has but the tokenizer lacks (a padded vocabulary)
            return b""

    def string(self, token: int) -> str:
        s = self._strings.get(token)
        if s is None:
            data = self.bytes(token)
            try:
                s = data.decode("utf-8") if data else f"token_id:{token}"
            except UnicodeDecodeError:  # part of a character: OpenAI's "bytes:" spelling
                s = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self._strings[token] = s
        return s

    def with_offsets(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """``Tokenizer.decode_with_offsets`` of ``ids``, where an id without bytes (one the
        tokenizer lacks) adds no text and gets the offset of what follows it."""
        known = [t for t in ids if self.bytes(t)]
        text, known_offsets = self.tokenizer.decode_with_offsets(known)
        offsets, it = [], iter(known_offsets)
        for t in ids:
            offsets.append(next(it) if self.bytes(t) else None)
        following = len(text)
        for i in range(len(offsets) - 1, -1, -1):
            if offsets[i] is None:
                offsets[i] = following
            following = offsets[i]
        return text, offsets

    def prompt(self, ids: Sequence[int]) -> tuple[str, list[str], list[int]]:
        """(text, token strings, text offsets) of a prompt shown by ``echo``."""
        text, offsets = self.with_offsets(ids)
        return text, [self.string(t) for t in ids], offsets


class Detokenizer:
    """The growing text of one completion.

    ``offset_start``: characters before the completion in the choice's text (the prompt's,
    with ``echo``). ``eos_ids`` add no text (as ``stream`` in generation.py).
    """

    def __init__(
        self, strings: TokenStrings, stop: Sequence[str] = (), eos_ids: Iterable[int] = (), offset_start: int = 0
    ) -> None:
        self.strings = strings
        self.stop = tuple(stop)
        self.eos_ids = frozenset(eos_ids)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # the completion's text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of it already released
        # text_offset: characters before the tokens whose bytes may still end inside a
        # character (``pending``), which a second decoder (fed even after a stop) tracks.
        self.base = offset_start
        self.pending: list[int] = []
        self.offset_utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that cut the text (vLLM's stop_reason)

    def add(self, token: int, check_stop: bool = True) -> int:
        """Take the next token; return its text offset. Sets ``stopped`` on a stop string
        that ends in this token's text (``check_stop=False``: none yet, vLLM's min_tokens)."""
        data = b"" if token in self.eos_ids else self.strings.bytes(token)
        offset = self._offset(token, data)
        if self.stopped:
            return offset
        before = len(self.text)
        self.text += self.utf8.decode(data)
        if self.stop and check_stop:
            longest = max(len(s) for s in self.stop)
            window = max(0, before - longest + 1)  # a match must end in the new text
            hits = [(i, s) for i, s in ((self.text.find(s, window), s) for s in self.stop) if i >= 0]
            if hits:
                cut, self.stop_reason = min(hits)
                self.text = self.text[:cut]
                self.stopped = True
        return offset

    @property
    def chars(self) -> int:
        """Characters in the choice's text so far (a cut-off character counted as its U+FFFD),
        which is the text_offset of anything that follows."""
        return self.base + len(self.strings.tokenizer.decode(self.pending)) if self.pending else self.base

    def _offset(self, token: int, data: bytes) -> int:
        if not data:  # EOS or an id the tokenizer lacks: no text, the offset of what follows
            return self.chars
        base, window = self.base, [*self.pending, token]
        text, offsets = self.strings.tokenizer.decode_with_offsets(window)
        self.offset_utf8.decode(data)
        if self.offset_utf8.getstate()[0]:  # bytes of an unfinished character wait
            self.pending = window
        else:  # a whole-character boundary: what follows decodes independently of the window
            self.base += len(text)
            self.pending = []
        return base + offsets[-1]

    def release(self, final: bool = False) -> str:
        """The text that is now certain and not yet released (all of it when ``final``)."""
        if final:
            if not self.stopped:
                self.text += self.utf8.decode(b"", final=True)  # a cut-off character -> U+FFFD
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Characters at the end that begin some stop string (it may still complete)."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held
