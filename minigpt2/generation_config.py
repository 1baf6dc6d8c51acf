"""A checkpoint's generation settings: transformers' ``GenerationConfig``, as a dataclass.

``model.generation_config`` holds the defaults of ``generate``: read from the checkpoint's
``generation_config.json`` when it has one, else derived from its ``config.json`` (the
generation keys an old-style config.json carries, plus bos / eos / pad), exactly as
transformers does. It is an ordinary, editable dataclass; ``save_pretrained`` writes it
back. Field names, meanings and the defaults a field takes when nobody sets it are
transformers' (v5: ``GenerationConfig`` and ``_get_default_generation_params`` in
generation/configuration_utils.py).

How one ``generate`` call resolves its settings (transformers' ``_prepare_generation_config``):

    the generation_config argument (or an empty one)
      <- fields still None: model.generation_config
      <- fields still None: transformers' global defaults (DEFAULTS below)
      <- every keyword argument of the call, even an explicit None

So ``generate(ids)`` on a checkpoint that ships ``do_sample: true, top_p: 0.9`` samples with
top-p 0.9, ``generate(ids, top_p=1.0)`` turns it off, and ``generate(ids, top_k=None)``
turns top-k off as it does in transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hub import read_json

GENERATION_CONFIG_NAME = "generation_config.json"

#: Values a field takes when neither the call, the generation_config argument nor the
#: checkpoint sets it: transformers' ``GenerationConfig._get_default_generation_params()``
#: (the fields minigpt2 uses; every other field's default is None, "off").
DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "remove_invalid_values": False,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
}

#: transformers' fields that do not change which tokens come out (caches, compilation,
#: bookkeeping), or serve models GPT-2 is not (encoder-decoder starts, assistants with another
#: tokenizer): accepted, kept for a save round trip, and otherwise ignored.
IGNORED = frozenset({
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "prefill_chunk_size", "continuous_batching_config", "decoder_start_token_id", "is_assistant",
    "assistant_lookbehind", "target_lookbehind", "_from_model_config",
})  # fmt: skip

#: transformers' fields for strategies minigpt2 does not implement, with the value that means
#: "off". Any other value makes ``generate`` raise a ValueError naming the field, rather than
#: silently generating something else than transformers would.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "guidance_scale": (None, 1, 1.0),  # classifier-free guidance (needs a negative-prompt forward)
    "watermarking_config": (None,),
    "token_healing": (None, False),
    "output_attentions": (None, False),  # per-step attentions: use model.run_with_cache instead
    "output_hidden_states": (None, False),
    "use_mtp": (None, False),
    "assistant_ensemble_weight": (None,),
    "speculation_type": (None,),
    # moved out of transformers' core in v5 (Hub "custom_generate" recipes):
    "penalty_alpha": (None, 0, 0.0),  # contrastive search
    "dola_layers": (None,),
    "num_beam_groups": (None, 1),  # group (diverse) beam search
    "diversity_penalty": (None, 0, 0.0),
    "constraints": (None,),
    "force_words_ids": (None,),
    "low_memory": (None, False),
}

# Why an UNSUPPORTED option is refused, where the generic reason (below) is not the one.
_UNSUPPORTED_WHY = {
    "output_attentions": "is not a generate option in minigpt2: to read the attention patterns, run the "
    "prompt + generated ids through model.run_with_cache(ids) (the 'h.{i}.attn.pattern' activations)",
    "output_hidden_states": "is not a generate option in minigpt2: to read the hidden states, run the "
    "prompt + generated ids through model.run_with_cache(ids) (the 'h.{i}.resid_post' activations)",
}

_SCHEDULES = ("constant", "heuristic", "heuristic_transient")


@dataclass
class GenerationConfig:
    """The settings of ``generate``, with transformers' names (every field None = "not set").

    Unset fields take the checkpoint's value, then transformers' default (:data:`DEFAULTS`);
    see the module docstring for the order. Keys of a generation_config.json that are not
    fields here land in ``extra`` and are written back by :meth:`save_pretrained`.
    """

    # ---- length of the output
    max_length: int | None = None  # prompt + new tokens; max_new_tokens wins when both are set
    max_new_tokens: int | None = None  # new tokens at most (>= 1)
    min_length: int | None = None  # EOS banned while prompt + new tokens < this
    min_new_tokens: int | None = None  # EOS banned until this many new tokens
    early_stopping: bool | str | None = None  # beam search: True, False or "never"
    max_time: float | None = None  # seconds; the step running when it passes still finishes
    stop_strings: str | list[str] | None = None  # end a row once its text holds one (needs tokenizer)
    # ---- strategy
    do_sample: bool | None = None  # False: greedy / beam search; True: draw from softmax
    num_beams: int | None = None  # > 1: beam search (beam sampling with do_sample)
    # ---- logits processors, in the order generate applies them (see sampling.py)
    sequence_bias: Any = None  # {(token ids): bias} or [[[ids], bias], ...]: added to the last token's score
    encoder_repetition_penalty: float | None = None  # > 1 favours tokens of the prompt ("hallucination penalty")
    repetition_penalty: float | None = None  # CTRL's penalty on tokens already in the row (1.0 = off)
    no_repeat_ngram_size: int | None = None  # n > 0: no n-gram twice
    encoder_no_repeat_ngram_size: int | None = None  # n > 0: no n-gram of the prompt repeated
    bad_words_ids: list[list[int]] | None = None  # token sequences never completed
    forced_bos_token_id: int | None = None  # first token when the sequence so far is one token long
    forced_eos_token_id: int | list[int] | None = None  # last token when max_length is reached
    remove_invalid_values: bool | None = None  # nan -> 0, +-inf -> the largest finite values
    exponential_decay_length_penalty: tuple[int, float] | list | None = None  # (start, factor): EOS more likely after start
    suppress_tokens: list[int] | None = None  # never generated
    begin_suppress_tokens: list[int] | None = None  # not generated as the first new token
    # ---- warpers (sampling only), in order
    temperature: float | None = None  # logits / temperature
    top_h: float | None = None  # keep the top tokens whose entropy stays within top_h x the full entropy
    top_k: int | None = None  # keep the k most likely (0 or None = off)
    top_p: float | None = None  # nucleus: keep the smallest set with probability >= top_p
    min_p: float | None = None  # keep tokens with p >= min_p x p(top token) (Nguyen et al. 2024)
    typical_p: float | None = None  # locally typical sampling (Meister et al. 2023)
    epsilon_cutoff: float | None = None  # keep p >= epsilon (Hewitt et al. 2022)
    eta_cutoff: float | None = None  # keep p >= min(eta, sqrt(eta) exp(-entropy)) (Hewitt et al. 2022)
    renormalize_logits: bool | None = None  # log-softmax after every processor
    # ---- beam search
    length_penalty: float | None = None  # a finished beam's score is sum logp / length ** length_penalty
    # ---- output
    num_return_sequences: int | None = None  # rows per prompt
    output_scores: bool | None = None  # return the processed scores of every step
    output_logits: bool | None = None  # return the raw logits of every step
    return_dict_in_generate: bool | None = None  # return a GenerateOutput instead of the ids
    # ---- special tokens
    pad_token_id: int | None = None  # fills finished rows (default: the first EOS id)
    bos_token_id: int | None = None  # the prompt when there is none
    eos_token_id: int | list[int] | None = None  # a row ends when it makes one of these
    # ---- assisted decoding (assisted.py)
    num_assistant_tokens: int | None = None  # draft tokens per round
    num_assistant_tokens_schedule: str | None = None  # "constant", "heuristic" (+2 / -1) or "heuristic_transient"
    assistant_confidence_threshold: float | None = None  # the draft stops below this confidence
    prompt_lookup_num_tokens: int | None = None  # prompt lookup decoding: draft this many tokens
    max_matching_ngram_size: int | None = None  # prompt lookup: longest n-gram matched (default 2)
    assistant_early_exit: int | None = None  # the model's first N layers draft for it

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Keys of generation_config.json that are not fields above (kept for the round trip)."""

    # ------------------------------------------------------------------ building
    @classmethod
    def fields(cls) -> list[str]:
        """Every field name but ``extra``."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationConfig:
        """From a generation_config.json mapping; unknown keys go to ``extra``
        (``transformers_version`` is dropped: it describes the file, not the settings)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a generation config must be a JSON object, got {type(data).__name__}")
        known = set(cls.fields())
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.extra = {k: v for k, v in data.items() if k not in known and k != "transformers_version"}
        return config

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> GenerationConfig:
        """What transformers derives from a config.json that has no generation_config.json
        beside it: every generation key it sets (not null), bos / eos / pad included."""
        gc = cls.from_dict({k: v for k, v in config.items() if v is not None and (k in cls.fields())})
        gc.extra = {"_from_model_config": True}
        if gc.output_scores or gc.output_logits:
            gc.return_dict_in_generate = True  # as transformers: asking for scores implies the dict
        return gc

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> GenerationConfig:
        """Read a generation_config.json; FileNotFoundError / ValueError name the file."""
        data = read_json(path, what="generation config")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], revision: str | None = None) -> GenerationConfig:
        """A checkpoint's generation config: its generation_config.json, else the one derived
        from its config.json (a local directory or a Hub repo id, as ``GPT2.from_pretrained``)."""
        from .loading import read_generation_config

        return read_generation_config(name_or_path, revision)

    def copy(self) -> GenerationConfig:
        """A deep copy (lists and ``extra`` included), to edit without touching this one."""
        return copy.deepcopy(self)

    def update(self, **kwargs: Any) -> None:
        """Set fields by name (None included: it means "not set"). transformers' fields that
        minigpt2 ignores or does not implement are kept in ``extra``; any other name is a
        ValueError, so a misspelt argument never goes unnoticed."""
        known = set(self.fields())
        for key, value in kwargs.items():
            if key in known:
                setattr(self, key, value)
            elif key in IGNORED or key in UNSUPPORTED:
                self.extra[key] = value
            else:
                raise ValueError(f"unknown generation argument {key!r} (see minigpt2.GenerationConfig for the names)")

    def get(self, key: str, default: Any = None) -> Any:
        """A field's value (or an ``extra`` key's), or ``default`` when unset: the read
        ``model.generation_config`` offered when it was a plain dict, kept for code written then."""
        value = getattr(self, key) if key in self.fields() else self.extra.get(key)
        return default if value is None else value

    def fill_from(self, other: GenerationConfig | Mapping[str, Any]) -> None:
        """Set every field that is still None from ``other`` (a config or a mapping); ``extra``
        keys this config lacks are copied too."""
        values = other.to_dict() if isinstance(other, GenerationConfig) else dict(other)
        known = set(self.fields())
        for key, value in values.items():
            if key in known:
                if getattr(self, key) is None and value is not None:
                    setattr(self, key, copy.deepcopy(value))
            elif key not in self.extra:
                self.extra[key] = copy.deepcopy(value)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """Every field (None included) plus ``extra``."""
        out = {name: getattr(self, name) for name in self.fields()}
        out.update(self.extra)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What generation_config.json holds: the fields that are set, plus ``extra``, in
        JSON-friendly form (sequence_bias as [[ids], bias] pairs, as transformers reads it)."""
        out = {k: v for k, v in self.to_dict().items() if v is not None}
        if isinstance(out.get("sequence_bias"), Mapping):
            out["sequence_bias"] = [[list(ids), bias] for ids, bias in out["sequence_bias"].items()]
        if isinstance(out.get("exponential_decay_length_penalty"), tuple):
            out["exponential_decay_length_penalty"] = list(out["exponential_decay_length_penalty"])
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_diff_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``directory``/generation_config.json (validated first: a config that
        ``generate`` would refuse is not saved, as transformers refuses it)."""
        from .hub import atomic_write

        self.validate()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / GENERATION_CONFIG_NAME, self.to_json_string())

    # ------------------------------------------------------------------ checking
    def validate(self, vocab_size: int | None = None) -> None:
        """Raise a ValueError naming the first field whose value ``generate`` cannot run with.

        ``vocab_size``: when given, every token id (special tokens, bad words, sequence
        biases, suppressed tokens) must lie in [0, vocab_size).
        """
        for name in ("max_length", "max_new_tokens", "num_beams", "num_return_sequences", "num_assistant_tokens",
                     "prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_early_exit"):
            _count(name, getattr(self, name), low=1)
        for name in ("min_length", "min_new_tokens", "top_k", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
            _count(name, getattr(self, name), low=0)
        for name in ("do_sample", "renormalize_logits", "remove_invalid_values", "output_scores", "output_logits",
                     "return_dict_in_generate"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if self.early_stopping is not None and not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        _number("max_time", self.max_time, low=0.0)
        _number("length_penalty", self.length_penalty)
        _number("temperature", self.temperature, low=0.0)  # 0 is fine for greedy; sampling checks > 0
        _number("repetition_penalty", self.repetition_penalty, low=0.0, strict=True)
        _number("encoder_repetition_penalty", self.encoder_repetition_penalty, low=0.0, strict=True)
        _number("top_p", self.top_p, low=0.0, high=1.0)
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("top_h", self.top_h, low=0.0, high=1.0, strict=True)
        _number("typical_p", self.typical_p, low=0.0, high=1.0, strict=True)
        _number("epsilon_cutoff", self.epsilon_cutoff, low=0.0, high=1.0, open_high=True)
        _number("eta_cutoff", self.eta_cutoff, low=0.0, high=1.0, open_high=True)
        _number("assistant_confidence_threshold", self.assistant_confidence_threshold, low=0.0, high=1.0)
        if self.num_assistant_tokens_schedule not in (None, *_SCHEDULES):
            raise ValueError(
                f"num_assistant_tokens_schedule={self.num_assistant_tokens_schedule!r} must be one of {', '.join(_SCHEDULES)}"
            )
        for name in ("pad_token_id", "bos_token_id", "forced_bos_token_id"):
            value = getattr(self, name)
            if value is not None:
                _token(name, value, vocab_size)
        for name in ("eos_token_id", "forced_eos_token_id"):
            _token_list(name, getattr(self, name), vocab_size, allow_int=True)
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            _token_list(name, getattr(self, name), vocab_size, allow_int=False)
        stop = self.stop_strings
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, (list, tuple)) or not stops or not all(isinstance(s, str) and s for s in stops):
                raise ValueError(f"stop_strings must be a string or a list of non-empty strings, got {stop!r}")
        if self.bad_words_ids is not None:
            bad = self.bad_words_ids
            if not isinstance(bad, (list, tuple)) or not bad:
                raise ValueError(f"bad_words_ids must be a non-empty list of token-id lists, got {bad!r}")
            for seq in bad:
                if not isinstance(seq, (list, tuple)) or not seq:
                    raise ValueError(f"bad_words_ids holds {seq!r}: each entry must be a non-empty list of token ids")
                _token_list("bad_words_ids", list(seq), vocab_size, allow_int=False)
        if self.sequence_bias is not None:
            sequence_bias_items(self.sequence_bias, vocab_size)
        decay = self.exponential_decay_length_penalty
        if decay is not None:
            ok = isinstance(decay, (list, tuple)) and len(decay) == 2
            if not ok or not _is_int(decay[0]) or decay[0] < 0 or not _is_number(decay[1]):
                raise ValueError(
                    f"exponential_decay_length_penalty must be (start_index >= 0, decay_factor), got {decay!r}"
                )
        for name, off in UNSUPPORTED.items():
            value = self.extra.get(name)
            if value is not None and value not in off:
                why = _UNSUPPORTED_WHY.get(name)
                if why is not None:
                    raise ValueError(f"{name}={value!r} {why}")
                raise ValueError(
                    f"{name}={value!r} is not supported by minigpt2 (transformers moved this strategy out of its "
                    f"core or it needs a model other than GPT-2); unset it to generate"
                )

    def __repr__(self) -> str:
        return f"GenerationConfig({', '.join(f'{k}={v!r}' for k, v in self.to_diff_dict().items())})"


# --------------------------------------------------------------------------- checks
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _count(name: str, x: Any, low: int) -> None:
    if x is not None and (not _is_int(x) or x < low):
        raise ValueError(f"{name} must be an integer >= {low}, got {x!r}")


def _number(
    name: str, x: Any, low: float | None = None, high: float | None = None, strict: bool = False,
    open_high: bool = False,
) -> None:
    """None, or a number within [low, high] (``strict``: low excluded; ``open_high``: high excluded)."""
    if x is None:
        return
    lo = "(" if strict else "["
    hi = ")" if open_high else "]"
    span = f"{lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"
    bounded = low is not None or high is not None
    if not _is_number(x) or math.isinf(x) and bounded:
        kind = "a finite number" if bounded or isinstance(x, float) else "a number"
        raise ValueError(f"{name} must be {kind}{f' in {span}' if bounded else ''}, got {x!r}")
    below = low is not None and (x <= low if strict else x < low)
    above = high is not None and (x >= high if open_high else x > high)
    if below or above:
        raise ValueError(f"{name}={x!r} must be in {span}")


def _token(name: str, x: Any, vocab_size: int | None) -> None:
    if not _is_int(x):
        raise ValueError(f"{name} must be a token id (an int), got {x!r}")
    if x < 0 or (vocab_size is not None and x >= vocab_size):
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name}={x} is outside the vocabulary {limit}")


def _token_list(name: str, x: Any, vocab_size: int | None, allow_int: bool) -> None:
    if x is None:
        return
    if allow_int and _is_int(x):
        _token(name, x, vocab_size)
        return
    if not isinstance(x, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids{' or one id' if allow_int else ''}, got {x!r}")
    for t in x:
        if not _is_int(t):
            raise ValueError(f"{name} must hold token ids (ints), got {t!r} in {x!r}")
        _token(name, t, vocab_size)


def sequence_bias_items(bias: Any, vocab_size: int | None = None) -> list[tuple[tuple[int, ...], float]]:
    """``sequence_bias`` in either of transformers' spellings -> [(token ids, bias)], checked.

    A dict {tuple of ids: bias} or a list [[list of ids, bias], ...]; each sequence non-empty,
    each id in the vocabulary, each bias a number (-inf allowed: that bans the sequence).
    """
    if isinstance(bias, Mapping):
        pairs = list(bias.items())
    elif isinstance(bias, (list, tuple)):
        pairs = []
        for entry in bias:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"sequence_bias entries must be [token ids, bias] pairs, got {entry!r}")
            pairs.append((entry[0], entry[1]))
    else:
        raise ValueError(f"sequence_bias must be a dict {{(ids): bias}} or a list of [ids, bias] pairs, got {bias!r}")
    if not pairs:
        raise ValueError("sequence_bias is empty: give at least one (token ids, bias) pair")
    out: dict[tuple[int, ...], float] = {}  # a sequence given twice: the last bias wins, as in transformers
    for ids, b in pairs:
        if _is_int(ids):
            ids = (ids,)
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"sequence_bias key {ids!r} must be a non-empty sequence of token ids")
        _token_list("sequence_bias", list(ids), vocab_size, allow_int=False)
        if not isinstance(b, (int, float)) or isinstance(b, bool) or math.isnan(b) or b == math.inf:
            # +inf would make the score +inf and softmax NaN; -inf is a ban, as transformers reads it
            raise ValueError(f"sequence_bias value for {tuple(ids)} must be a finite number or -inf, got {b!r}")
        out[tuple(ids)] = float(b)
    return list(out.items())
