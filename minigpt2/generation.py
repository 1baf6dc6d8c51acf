"""Text generation: prefill, one token per step through the KV cache, sampling and beam search.

The shape of gpt-fast's generate.py: a few small functions, each of which can be read,
timed or swapped alone.

    prefill(model, ids, positions, mask, cache)          -> logits of the last prompt position
    decode_one_token(model, token, position, mask, cache) -> logits of the next position
    decode_n_tokens(...)                                  -> yields one Step (token per row) per step
    beam_search(...)                                      -> the best beams, as transformers
    generate(model, input_ids, ...)                       -> prompt + new tokens [B, T + n]
    stream(model, tokenizer, prompt, ...)                 -> the same, step by step, with text
    compute_transition_scores(...)                        -> each chosen token's score

Every model call goes through ``_forward_last`` (or ``_forward_all``, which assisted
decoding uses to score several draft tokens at once): the transformer on the new tokens,
then the unembedding of the positions needed only (the whole [B, T, V] logits of a long
prompt are never built). That is also where the fast path (fast.py) comes in.

The arguments, defaults and results are those of transformers' ``generate`` (v5): the
settings resolve through ``model.generation_config`` (generation_config.py), the logits
processors run in its order (sampling.py), a token is drawn with softmax +
``torch.multinomial`` from the same RNG, finished rows are padded with ``pad_token_id``
(default: the EOS id), and generation ends when every row has finished, so the same seed
gives the same tokens. Position ids follow the attention mask as transformers 5 sets them
(cumsum(mask) - 1, padding at 0, new tokens continuing from the prompt's last position),
so each row of a left-padded batch produces what it produces alone, and a right-padded
prompt generates what transformers 5 generates for it.
"""

from __future__ import annotations

import codecs
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import fast, sampling
from .generation_config import DEFAULTS, GenerationConfig
from .sampling import Processors

if TYPE_CHECKING:  # model.py imports this module; a runtime import would be circular
    from .model import GPT2
    from .tokenizer import Tokenizer


# --------------------------------------------------------------------------- the forward
def _forward_last(
    model: GPT2,
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    cache: Any,
    dec: fast.Decoder | None = None,
) -> torch.Tensor:
    """The one place generation runs the model: fp32 logits of the last position [B, V].

    ids, positions: [B, T] (positions [1, T] when every row has the same ones); mask:
    [B, past + T] with 0 at padding, or None when there is none; the cache is appended to.
    ``dec`` is the fast path (fast.py: the same arithmetic with the host's fastest matrix
    kernels and less overhead per token); it steps aside for the plain model whenever
    gradients, hooks or training mode call for it.
    """
    if dec is not None and dec.ready():
        return dec(ids, positions, mask, cache)
    h = model.transformer(ids, mask, positions, cache)  # (B, T, C)
    return model.lm_head(h[:, -1]).float()  # (B, V): only the last position is unembedded


def _forward_all(
    model: GPT2,
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    cache: Any,
    dec: fast.Decoder | None = None,
) -> torch.Tensor:
    """``_forward_last`` for every new position: fp32 logits [B, T, V] (assisted decoding
    checks T draft tokens in one forward)."""
    if dec is not None and dec.ready():
        return dec(ids, positions, mask, cache, last_only=False)
    h = model.transformer(ids, mask, positions, cache)  # (B, T, C)
    return model.lm_head(h).float()


def prefill(
    model: GPT2, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Any,
    dec: fast.Decoder | None = None,
) -> torch.Tensor:
    """Run the whole prompt once, filling the cache; logits for the first new token [B, V]."""
    return _forward_last(model, ids, positions, mask, cache, dec)


def decode_one_token(
    model: GPT2, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, cache: Any,
    dec: fast.Decoder | None = None,
) -> torch.Tensor:
    """One new token per row ([B, 1]) at ``position`` ([B, 1]) against the cache; logits [B, V]."""
    return _forward_last(model, token, position, mask, cache, dec)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """One call's resolved and checked settings (see ``generate`` for their meaning)."""

    config: GenerationConfig  # the resolved generation config (transformers' defaults filled in)
    max_new_tokens: int  # max_length - prompt length
    processors: Processors
    do_sample: bool
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    eos_ids: tuple[int, ...] | None
    pad_token_id: int | None
    stop: tuple[str, ...]
    max_time: float | None  # seconds from the start of the call
    output_scores: bool
    output_logits: bool
    return_dict: bool
    assisted: bool  # assistant_model, prompt_lookup_num_tokens or assistant_early_exit set (and no beams)


def resolve_generation_config(
    model: GPT2,
    generation_config: GenerationConfig | Mapping[str, Any] | None,
    kwargs: Mapping[str, Any],
    assistant_model: GPT2 | None = None,
) -> tuple[GenerationConfig, bool]:
    """transformers' ``_prepare_generation_config``: (resolved config, max_length was defaulted).

    The ``generation_config`` argument (or an empty one), its unset fields filled from
    ``model.generation_config``, then (the draft settings only) from the assistant's, then
    from transformers' defaults; then every keyword argument set on top (an explicit None
    included, as there). Unknown names raise a ValueError.
    """
    if generation_config is None:
        base = GenerationConfig()
    elif isinstance(generation_config, GenerationConfig):
        base = generation_config.copy()
    elif isinstance(generation_config, Mapping):
        base = GenerationConfig.from_dict(generation_config)
    elif callable(getattr(generation_config, "to_dict", None)):  # e.g. transformers' GenerationConfig
        base = GenerationConfig.from_dict(generation_config.to_dict())
    else:
        raise ValueError(f"generation_config must be a GenerationConfig or a dict, got {type(generation_config).__name__}")
    own = getattr(model, "generation_config", None)
    if isinstance(own, Mapping):  # set to a plain dict by hand (what it was before it became a GenerationConfig)
        own = GenerationConfig.from_dict(own)
    elif not isinstance(own, GenerationConfig):
        own = GenerationConfig.from_model_config(model.config.to_dict())
    default_max_length = kwargs.get("max_length") is None and base.max_length is None and own.max_length is None
    base.fill_from(own)
    if assistant_model is not None and isinstance(getattr(assistant_model, "generation_config", None), GenerationConfig):
        from .assisted import ASSISTANT_FIELDS

        base.fill_from({k: getattr(assistant_model.generation_config, k) for k in ASSISTANT_FIELDS})
    base.fill_from(DEFAULTS)
    base.update(**kwargs)
    return base, default_max_length


def _token_ids(x: Any) -> tuple[int, ...] | None:
    """An int, a list of ints (a tensor) or None -> a tuple of ints (or None); checked by validate()."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    ids = (x,) if isinstance(x, int) else tuple(x)
    return ids or None


def _check_settings(
    model: GPT2,
    gc: GenerationConfig,
    prompt_len: int,
    default_max_length: bool,
    *,
    tokenizer: Any,
    generator: Any,
    assistant_model: Any = None,
) -> Settings:
    """Every setting checked before any work, as transformers' generate checks them; a
    ValueError names the bad one. Lengths resolve as in ``_prepare_generated_length``."""
    c = model.config
    gc.validate(vocab_size=c.vocab_size)
    T = prompt_len
    if gc.max_new_tokens is not None:
        max_length = gc.max_new_tokens + T
    elif default_max_length or gc.max_length is None:  # by default 20 new tokens, within the position table
        max_length = min((gc.max_length if gc.max_length is not None else DEFAULTS["max_length"]) + T, c.n_positions)
    else:
        max_length = gc.max_length
    if T >= max_length:
        raise ValueError(
            f"input_ids has {T} tokens but max_length={max_length}: nothing is left to generate; "
            f"set max_new_tokens (or a larger max_length)"
        )
    max_new = max_length - T
    if max_length > c.n_positions:
        raise ValueError(f"prompt of {T} tokens + max_new_tokens={max_new} exceeds n_positions={c.n_positions}")
    if gc.min_new_tokens is not None:
        gc.min_length = gc.min_new_tokens + T  # as transformers: min_new_tokens wins over min_length

    do_sample = bool(gc.do_sample)
    if do_sample and gc.temperature is not None and not gc.temperature > 0:
        raise ValueError(f"temperature={gc.temperature!r} must be > 0 when sampling (use do_sample=False for greedy)")
    num_beams, n_return = gc.num_beams or 1, gc.num_return_sequences or 1
    if n_return > 1 and num_beams == 1 and not do_sample:
        raise ValueError(f"num_return_sequences={n_return} needs do_sample=True or num_beams > 1 (greedy rows would be equal)")
    if num_beams > 1 and n_return > num_beams:
        raise ValueError(f"num_return_sequences={n_return} must be <= num_beams={num_beams}")

    eos_ids = _token_ids(gc.eos_token_id)
    pad = gc.pad_token_id
    if pad is None and eos_ids is not None:
        pad = eos_ids[0]  # transformers' default: pad finished rows with the (first) EOS
    if gc.exponential_decay_length_penalty is not None and eos_ids is None:
        raise ValueError("exponential_decay_length_penalty needs an eos_token_id to make more likely")

    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != model.device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {model.device}")

    stop = gc.stop_strings
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer: pass tokenizer=Tokenizer.from_pretrained(...)")
    if stop and not callable(getattr(tokenizer, "decode_bytes", None)):
        raise ValueError(f"tokenizer must be a minigpt2.Tokenizer (it reads token bytes), got {type(tokenizer).__name__}")

    assisted = assistant_model is not None or gc.prompt_lookup_num_tokens is not None or gc.assistant_early_exit is not None
    if assisted and num_beams > 1:
        warnings.warn(
            f"assisted decoding works with greedy search and sampling only; num_beams={num_beams}: the assistant "
            "settings are ignored (as transformers does)", UserWarning, stacklevel=3,
        )
        assisted = False
    if assisted:
        from . import assisted as _assisted

        _assisted.check(model, gc, assistant_model, n_return)

    processors = Processors.from_generation_config(gc, eos_ids=eos_ids, max_length=max_length)
    return Settings(
        config=gc, max_new_tokens=max_new, processors=processors, do_sample=do_sample, num_beams=num_beams,
        length_penalty=1.0 if gc.length_penalty is None else float(gc.length_penalty),
        early_stopping=bool(gc.early_stopping) if gc.early_stopping != "never" else "never", num_return_sequences=n_return,
        eos_ids=eos_ids, pad_token_id=pad, stop=stop, max_time=gc.max_time,
        output_scores=bool(gc.output_scores), output_logits=bool(gc.output_logits),
        return_dict=bool(gc.return_dict_in_generate), assisted=assisted,
    )  # fmt: skip


def _first_non_id(rows: Any, name: str = "input_ids") -> str | None:
    """Where a (nested) list of token ids holds something else: "input_ids[0] is 'Hi' (a str)"; None if all are ints."""
    if not isinstance(rows, (list, tuple)):
        return None
    for i, x in enumerate(rows):
        if isinstance(x, (list, tuple)):
            inner = _first_non_id(x, f"{name}[{i}]")
            if inner is not None:
                return inner
        elif isinstance(x, bool) or not isinstance(x, int) and not (isinstance(x, torch.Tensor) and x.dim() == 0
                                                                    and not x.is_floating_point()):
            return f"{name}[{i}] is {x!r:.40} (type {type(x).__name__})"
    return None


def _check_prompt(
    model: GPT2, input_ids: Any, attention_mask: Any, bos_token_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids as a LongTensor [B, T] on the model's device, and the mask (None: no padding).

    No input_ids: one row holding ``bos_token_id``, as transformers starts then.
    """
    if input_ids is None:
        if bos_token_id is None:
            raise ValueError("no input_ids and no bos_token_id to start from: pass a prompt")
        input_ids = [[bos_token_id]]
    if isinstance(input_ids, str):
        raise ValueError("input_ids is a string; encode it first (tokenizer.encode) or use stream(model, tokenizer, text)")
    if not isinstance(input_ids, torch.Tensor):
        rows = input_ids
        if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], (list, tuple)):
            if len({len(r) for r in rows}) > 1:
                raise ValueError("input_ids rows have different lengths; left-pad them and pass attention_mask")
        where = _first_non_id(rows)
        if where is not None:
            raise ValueError(f"input_ids must hold integer token ids, but {where}; encode text first "
                             "(tokenizer.encode, or tokenizer(texts, padding=True) for a batch)")
        try:
            input_ids = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"input_ids must be token ids in a list, a list of rows or a LongTensor, got {rows!r:.80}") from None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq] (or one row), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is an empty prompt (shape {tuple(input_ids.shape)}); give at least one token")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    V = model.config.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token id {lo if lo < 0 else hi} in input_ids is outside the vocabulary [0, {V})")
    input_ids = input_ids.to(device=model.device, dtype=torch.long)

    if attention_mask is None:
        return input_ids, None
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask[None]
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {(B, T)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.to(device=model.device, dtype=torch.long)
    empty = (mask.sum(1) == 0).nonzero()
    if len(empty):
        raise ValueError(f"row {int(empty[0])} of attention_mask is all padding (an empty prompt)")
    return input_ids, (None if bool(mask.all()) else mask)


def _infer_mask(ids: torch.Tensor, s: Settings) -> torch.Tensor | None:
    """transformers' rule without an attention_mask: pad tokens are padding, unless pad is an EOS."""
    pad = s.pad_token_id
    if pad is None or (s.eos_ids is not None and pad in s.eos_ids) or not bool((ids == pad).any()):
        return None
    mask = (ids != pad).long()
    return None if bool(mask.all()) or bool((mask.sum(1) == 0).any()) else mask


def _prompt_positions(mask: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """Position ids of the prompt, as transformers 5 sets them: 0..T-1, or counted over the
    real tokens (cumsum(mask) - 1) with every padding position at 0 [B, T]."""
    if mask is None:
        return torch.arange(T, device=device)[None]  # (1, T)
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)  # (B, T)


def _next_positions(mask: torch.Tensor | None, T: int, device: torch.device, rows: int) -> torch.Tensor:
    """Position of the first new token of each row [rows, 1]: the prompt's last position + 1
    (transformers 5). Left padding: the real tokens' count; right padding: 1, since the last
    prompt position is padding at position 0 (v4 continued from the count instead)."""
    if mask is None:
        return torch.full((rows, 1), T, device=device)
    return _prompt_positions(mask, T, device)[:, -1:] + 1


# --------------------------------------------------------------------------- stop strings
class StopStrings:
    """Ends a row when its text (prompt included) holds a stop string that overlaps the
    newest token: the same rule as transformers' StopStringCriteria, on bytes."""

    def __init__(self, stops: Sequence[str], tokenizer: Tokenizer) -> None:
        self.stops = [s.encode("utf-8") for s in stops]
        self.longest = max(len(s) for s in self.stops)
        self.tokenizer = tokenizer

    def hit(self, row: Sequence[int]) -> bool:
        """row: the token ids so far (real ones), newest last."""
        last = _token_bytes(self.tokenizer, row[-1])
        need = len(last) + self.longest - 1  # bytes that can hold a match touching the newest token
        tail, i = last, len(row) - 2
        while len(tail) < need and i >= 0:
            tail = _token_bytes(self.tokenizer, row[i]) + tail
            i -= 1
        before = len(tail) - len(last)  # where the newest token starts in tail
        return any(s in tail[max(0, before - len(s) + 1) :] for s in self.stops)


def _token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    try:
        return tokenizer.decode_bytes([token])
    except ValueError:  # an id the model has but the tokenizer lacks (a padded vocabulary)
        return b""


class Deadline:
    """max_time: generation stops once this many seconds have passed since the call began
    (transformers' MaxTimeCriteria; the step running at that moment still finishes)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


# --------------------------------------------------------------------------- sampling loop
@dataclass
class Step:
    """What one decoding step made (tensors may be inference tensors: read, do not edit)."""

    token: torch.Tensor  # [B] the id each row made (pad_token_id for rows finished before)
    finished: torch.Tensor  # [B] bool: the row has ended (at this step or before)
    logits: torch.Tensor  # [B, V] fp32, the model's raw next-token logits
    scores: torch.Tensor  # [B, V] fp32, after the logits processors (what was drawn from)


def decode_n_tokens(
    model: GPT2,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None = None,
    tokenizer: Tokenizer | None = None,
    prompt_ids: torch.Tensor | None = None,
    check_each_step: bool = True,
) -> Iterator[Step]:
    """Greedy or sampled decoding; yields one ``Step`` per generated position.

    Prefill once, then one token per step through a cache preallocated for prompt +
    max_new_tokens. Each step: processors -> argmax or multinomial -> finished rows get
    pad_token_id -> a row finishes on EOS, a stop string, the length limit or max_time;
    stop when all have. The model runs under inference mode only between yields, so the
    caller's grad mode is untouched. ``prompt_ids``: the prompt as given, before
    num_return_sequences expanded it (the encoder_* processors read it, as transformers).
    ``check_each_step=False``: the caller runs no code between steps (generate() only collects
    them), so the fast path checks hooks, modes and weights once, at the prompt, not before
    every step (fast.Decoder.ready); with stop strings the tokenizer runs between steps too.
    """
    B, T = ids.shape
    L = T + s.max_new_tokens
    dev = ids.device
    p = s.processors
    eos = torch.tensor(s.eos_ids, device=dev) if s.eos_ids is not None else None
    stop = StopStrings(s.stop, tokenizer) if s.stop else None
    deadline = Deadline(s.max_time)
    with torch.inference_mode():
        seq = torch.empty(B, L, dtype=torch.long, device=dev)  # prompt + tokens so far
        seq[:, :T] = ids
        full_mask = None if mask is None else torch.cat([mask, mask.new_ones(B, s.max_new_tokens)], dim=1)
        prompt_start = None if mask is None else (mask != 0).int().argmax(dim=1)  # left padding per row
        next_pos = _next_positions(mask, T, dev, B)  # (B, 1)
        unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        cache = model.make_cache(B, L)
        dec = fast.decoder(model, B, check_each_step)
        logits = prefill(model, ids, _prompt_positions(mask, T, dev), mask, cache, dec)
    prompt_ids = ids if prompt_ids is None else prompt_ids
    rows = None  # with stop strings: each row's real token ids so far, on the CPU
    if stop is not None:
        rows = ids.tolist() if mask is None else [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
    for step in range(s.max_new_tokens):
        with torch.inference_mode(), fast.between_steps(dec):
            cur = T + step
            scores = sampling.process(p, seq[:, :cur], logits, n_new=step, eos_ids=eos, prompt_start=prompt_start,
                                      prompt_ids=prompt_ids)
            if s.do_sample:
                token = sampling.sample(scores, generator)
                empty = None
            else:  # argmax of an all -inf row is token 0: flag it, read with the step's one sync below
                best, token = fast.max_last(scores, dec)
                empty = (best == float("-inf")) & unfinished
            if eos is not None:  # as transformers: finished rows are padded only when EOS can end them
                token = token.masked_fill(~unfinished, s.pad_token_id)
            seq[:, cur] = token
            done = torch.isin(token, eos) if eos is not None else torch.zeros_like(unfinished)
            if stop is not None:
                for b, t in enumerate(token.tolist()):
                    rows[b].append(t)
                    if stop.hit(rows[b]):
                        done[b] = True
            if step == s.max_new_tokens - 1 or deadline.passed():
                done = torch.ones_like(done)
            unfinished = unfinished & ~done
            if empty is None:
                alive, no_token = bool(unfinished.any()), False
            else:  # one host sync per step, as before, carrying both flags
                alive, no_token = torch.stack((unfinished.any(), empty.any())).tolist()
        if no_token:
            raise sampling.no_token_left(scores, empty)
        yield Step(token.clone(), ~unfinished, logits, scores)  # token cloned outside inference mode
        if not alive:
            return
        with torch.inference_mode(), fast.between_steps(dec):
            m = None if full_mask is None else full_mask[:, : cur + 1]
            logits = decode_one_token(model, token[:, None], next_pos + step, m, cache, dec)


# --------------------------------------------------------------------------- beam search
@dataclass
class BeamResult:
    """beam_search's result: the best beams, with what transformers returns beside them."""

    sequences: torch.Tensor  # [B * n, T + new]
    sequences_scores: torch.Tensor  # [B * n] sum of log-probs / new tokens ** length_penalty
    beam_indices: torch.Tensor  # [B * n, new] int32: the beam (batch * num_beams + beam) of each token, -1 after the end
    scores: tuple[torch.Tensor, ...]  # per step [B * num_beams, V]: processed log-probs (with output_scores)
    logits: tuple[torch.Tensor, ...]  # per step [B * num_beams, V]: raw logits (with output_logits)


def beam_search(
    model: GPT2,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None = None,
    tokenizer: Tokenizer | None = None,
) -> BeamResult:
    """Beam search (or beam sampling), step for step as transformers' ``_beam_search`` (v5).

    Per prompt, ``num_beams`` live hypotheses. Each step scores every (beam, token) pair by
    the beam's summed log-probability plus log p(token), keeps the best K = (n_eos + 1 or 2)
    x num_beams candidates (so that num_beams can go on even if the best all end in EOS), and
    then: candidates that hit EOS, a stop string, the length limit or max_time, among the
    top num_beams, enter the finished pool with score sum / (new tokens ** length_penalty);
    the best num_beams that did not finish live on. A batch item stops when no live beam can
    beat its worst finished one (with early_stopping=True: as soon as num_beams have
    finished). The -1e9 "impossible" scores are added exactly as transformers adds them, so
    even ties resolve the same way. Returns the best ``num_return_sequences`` per prompt.
    """
    B, T = ids.shape
    nb, L, V = s.num_beams, T + s.max_new_tokens, model.config.vocab_size
    dev = ids.device
    p, lp, early = s.processors, s.length_penalty, s.early_stopping
    eos = torch.tensor(s.eos_ids, device=dev) if s.eos_ids is not None else None
    K = max(2, 1 + (len(s.eos_ids) if s.eos_ids else 0)) * nb  # candidates kept per step
    fill = (s.pad_token_id or s.eos_ids[0]) if s.eos_ids is not None else -1  # as transformers
    top_nb = torch.arange(K, device=dev) < nb  # the first num_beams candidates may finish
    stop = StopStrings(s.stop, tokenizer) if s.stop else None
    deadline = Deadline(s.max_time)
    n_pad = [0] * B if mask is None else (mask == 0).sum(1).tolist()  # left padding per prompt
    prompt_ids = ids

    flat_ids = ids.repeat_interleave(nb, dim=0)  # (B * nb, T): each prompt once per beam
    mask = None if mask is None else mask.repeat_interleave(nb, dim=0)
    full_mask = None if mask is None else torch.cat([mask, mask.new_ones(B * nb, s.max_new_tokens)], dim=1)
    prompt_start = None if mask is None else (mask != 0).int().argmax(dim=1)
    next_pos = _next_positions(mask, T, dev, B * nb)

    running = torch.full((B, nb, L), fill, dtype=torch.long, device=dev)
    running[:, :, :T] = flat_ids.view(B, nb, T)
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand at step 0
    running_beams = torch.full((B, nb, s.max_new_tokens), -1, dtype=torch.int32, device=dev)
    finished = running.clone()
    finished_scores = torch.full((B, nb), -1e9, device=dev)
    finished_beams = running_beams.clone()
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    batch_offset = torch.arange(B, device=dev)[:, None] * nb  # (B, 1)
    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []

    cache = model.make_cache(B * nb, L)
    dec = fast.decoder(model, B * nb)
    logits = prefill(model, flat_ids, _prompt_positions(mask, T, dev), mask, cache, dec)
    for step in range(s.max_new_tokens):
        cur = T + step
        if step > 0:
            m = None if full_mask is None else full_mask[:, : cur]
            last = running[:, :, cur - 1].reshape(B * nb, 1)
            logits = decode_one_token(model, last, next_pos + step - 1, m, cache, dec)
        logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = sampling.process(
            p, running[:, :, :cur].reshape(B * nb, cur), logprobs, n_new=step, eos_ids=eos, prompt_start=prompt_start,
            prompt_ids=prompt_ids,
        )
        if s.output_logits:
            all_logits.append(logits.clone())
        if s.output_scores:
            all_scores.append(logprobs.clone())
        total = (logprobs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)  # (B, nb * V)

        # The K best continuations over all beams (or K drawn without replacement, best first).
        if s.do_sample:
            try:
                pick = torch.multinomial(torch.softmax(total, dim=-1), K, generator=generator)
            except RuntimeError as e:  # checked only when the draw failed
                raise sampling.no_token_left(total) from e
            top = total.gather(1, pick)
            top, order = top.sort(dim=-1, descending=True)
            pick = pick.gather(1, order)
        else:
            top, pick = torch.topk(total, K)  # (B, K)
        empty = top[:, 0] == float("-inf")  # every token removed in every beam: read at the step's sync below
        src_beam, token = pick // V, pick % V
        cand = running.gather(1, src_beam[:, :, None].expand(B, K, L)).clone()  # (B, K, L)
        cand[:, :, cur] = token
        cand_beams = running_beams.gather(1, src_beam[:, :, None].expand(B, K, s.max_new_tokens)).clone()
        cand_beams[:, :, step] = (src_beam + batch_offset).int()
        ends = torch.isin(token, eos) if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        ends = ends | (cur + 1 >= L) | deadline.passed()
        if stop is not None:  # a candidate whose text now holds a stop string ends too
            hits = [[stop.hit(row[n_pad[b] :]) for row in rows] for b, rows in enumerate(cand[:, :, : cur + 1].tolist())]
            ends = ends | torch.tensor(hits, device=dev)

        # Live beams: the best num_beams candidates that did not just finish.
        live_scores = top + ends.float() * -1.0e9
        keep = torch.topk(live_scores, nb)[1]  # (B, nb)
        running = cand.gather(1, keep[:, :, None].expand(B, nb, L))
        running_beams = cand_beams.gather(1, keep[:, :, None].expand(B, nb, s.max_new_tokens))
        running_scores = live_scores.gather(1, keep)
        cache.reorder((src_beam.gather(1, keep) + batch_offset).reshape(-1))

        # Finished pool: merge the newly finished (length-penalised) with the old, keep the best.
        just = ends & top_nb[None, :]
        score = top / ((cur + 1 - T) ** lp)
        score = score + (is_finished.all(dim=-1, keepdim=True) & (early is True)).float() * -1.0e9
        score = score + (~can_improve).float() * -1.0e9
        score = score + (~just) * -1.0e9
        merged_scores = torch.cat([finished_scores, score], dim=1)  # (B, nb + K)
        best = torch.topk(merged_scores, nb)[1]
        finished = torch.cat([finished, cand], dim=1).gather(1, best[:, :, None].expand(B, nb, L))
        finished_beams = torch.cat([finished_beams, cand_beams], dim=1).gather(
            1, best[:, :, None].expand(B, nb, s.max_new_tokens)
        )
        finished_scores = merged_scores.gather(1, best)
        is_finished = torch.cat([is_finished, just], dim=1).gather(1, best)

        # Can a live beam still beat the worst finished one? (transformers' heuristic)
        new_len = cur + 1 - T
        best_len = s.max_new_tokens if (early == "never" and lp > 0.0) else new_len
        best_possible = running_scores[:, :1] / (best_len**lp)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & (best_possible > worst).any(dim=-1, keepdim=True)
        # one host sync for the step's four flags
        full, improve, all_end, no_token = torch.stack(
            (is_finished.all(), can_improve.any(), ends.all(), empty.any())
        ).tolist()
        if no_token:
            raise sampling.no_token_left(total.view(B, nb * V), empty)
        if not improve or (full and early is True) or all_end:
            break

    n = s.num_return_sequences
    beams = finished_beams[:, :n].reshape(B * n, s.max_new_tokens)
    new = int((beams >= 0).sum(dim=1).max())  # the longest returned beam's new tokens
    return BeamResult(
        sequences=finished[:, :n].reshape(B * n, L)[:, : T + new],
        sequences_scores=finished_scores[:, :n].reshape(B * n),
        beam_indices=beams[:, :new],
        scores=tuple(all_scores),
        logits=tuple(all_logits),
    )


# --------------------------------------------------------------------------- entry points
@dataclass
class GenerateOutput:
    """``generate(..., return_dict_in_generate=True)``: transformers' GenerateDecoderOnlyOutput
    (greedy, sampling, assisted) and GenerateBeamDecoderOnlyOutput (beam search) in one.

    Every tensor is a normal one (not an inference tensor); fields that do not apply are None.
    """

    sequences: torch.Tensor  # [B * num_return_sequences, T + n] prompt + new tokens
    scores: tuple[torch.Tensor, ...] | None = None  # output_scores: per new position, processed scores [rows, V]
    logits: tuple[torch.Tensor, ...] | None = None  # output_logits: per new position, raw logits [rows, V]
    sequences_scores: torch.Tensor | None = None  # beam search with output_scores: [B * n] final beam scores
    beam_indices: torch.Tensor | None = None  # beam search: [B * n, n_new] beam of each token, -1 past the end


def generate(
    model: GPT2,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
    tokenizer: Tokenizer | None = None,
    assistant_model: GPT2 | None = None,
    stop: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateOutput:
    """Continue each prompt; returns prompt + new tokens, a LongTensor [B, T + n] (or a
    ``GenerateOutput`` with ``return_dict_in_generate=True``).

    The arguments are transformers' ``generate`` arguments with the same defaults and
    meanings, so code ports over unchanged and gives the same tokens. Every field of
    ``GenerationConfig`` is a keyword argument (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``epsilon_cutoff``,
    ``eta_cutoff``, ``top_h``, ``repetition_penalty``, ``no_repeat_ngram_size``,
    ``bad_words_ids``, ``sequence_bias``, ``suppress_tokens``, ``begin_suppress_tokens``,
    ``forced_bos_token_id``, ``forced_eos_token_id``, ``min_length``, ``min_new_tokens``,
    ``exponential_decay_length_penalty``, ``renormalize_logits``, ``max_time``,
    ``stop_strings``, ``num_beams``, ``length_penalty``, ``early_stopping``,
    ``num_return_sequences``, ``eos_token_id``, ``pad_token_id``, ``output_scores``, ...);
    what the call does not set comes from ``generation_config``, then from
    ``model.generation_config`` (the checkpoint's), then from transformers' defaults
    (generation_config.py). An unknown name is a ValueError.

    input_ids: [B, T] (a 1-D tensor or a list is one prompt; None starts from
        ``bos_token_id``). Pad a batch on the left and pass attention_mask [B, T]
        (0 = padding); positions then follow the mask.
    max_new_tokens: at most this many new tokens (>= 1; fewer when every row has finished:
        the result is then shorter, as in transformers). Unset: max_length (prompt + new;
        20 new tokens by default, within n_positions).
    do_sample: False = greedy (or beam search); True = draw from softmax(processed scores)
        with torch.multinomial, after temperature, top_k (50 by default, as transformers)
        and the other warpers (sampling.py gives the order).
    generator: a torch.Generator for sampling, for reproducible draws that leave the
        global RNG alone. Without it, ``torch.manual_seed(s)`` before the call reproduces
        transformers' ``generate(do_sample=True)`` with the same seed.
    tokenizer: needed for stop strings (``stop`` is minigpt2's name for ``stop_strings``).
    assistant_model: a smaller GPT-2 with the same vocabulary drafts tokens that this model
        checks in one forward (assisted.py); with ``prompt_lookup_num_tokens`` the drafts
        come from the prompt's n-grams, with ``assistant_early_exit=N`` from this model's
        first N layers. Greedy output is unchanged; sampled output keeps this model's
        distribution (speculative sampling).
    return_dict_in_generate: return a ``GenerateOutput`` (``output_scores``,
        ``output_logits`` fill its scores / logits; beam search adds ``sequences_scores``
        and ``beam_indices``), equal to transformers'.

    Raises:
        ValueError: naming the argument, for any bad value (before any work).
    """
    if stop is not None:
        if kwargs.get("stop_strings") is not None and kwargs["stop_strings"] != stop:
            raise ValueError("pass stop strings once: stop (minigpt2's name) or stop_strings (transformers'), not both")
        kwargs["stop_strings"] = stop
    if "inputs" in kwargs:  # transformers' name for the prompt
        if input_ids is not None:
            raise ValueError("pass the prompt once: input_ids or inputs, not both")
        input_ids = kwargs.pop("inputs")
    gc, default_max_length = resolve_generation_config(model, generation_config, kwargs, assistant_model)
    input_ids, attention_mask = _check_prompt(model, input_ids, attention_mask, gc.bos_token_id)
    s = _check_settings(
        model, gc, input_ids.shape[1], default_max_length, tokenizer=tokenizer, generator=generator,
        assistant_model=assistant_model,
    )
    if attention_mask is None:
        attention_mask = _infer_mask(input_ids, s)
    if s.num_beams > 1:
        with torch.inference_mode():
            r = beam_search(model, input_ids, attention_mask, s, generator, tokenizer)
        if not s.return_dict:
            return r.sequences.clone()  # a normal tensor again, usable with autograd
        return GenerateOutput(
            sequences=r.sequences.clone(),
            scores=tuple(t.clone() for t in r.scores) if s.output_scores else None,
            logits=tuple(t.clone() for t in r.logits) if s.output_logits else None,
            sequences_scores=r.sequences_scores.clone() if s.output_scores else None,
            beam_indices=r.beam_indices.clone(),
        )
    prompt_ids = input_ids
    if s.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(s.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(s.num_return_sequences, dim=0)
    # Nothing runs between greedy or sampled steps but this loop's bookkeeping (the processors
    # are built in), so the fast path's per-step checks can run once (decode_n_tokens); not
    # where stop strings call a tokenizer other than minigpt2's own, whose code runs per step.
    from .tokenizer import Tokenizer

    own_code_only = not s.stop or type(tokenizer) is Tokenizer
    steps = _steps(model, input_ids, attention_mask, s, generator, tokenizer, assistant_model, prompt_ids,
                   check_each_step=not own_code_only)
    new, scores, logits = [], [], []
    for st in steps:
        new.append(st.token)
        if s.return_dict and s.output_scores:
            scores.append(st.scores.clone())
        if s.return_dict and s.output_logits:
            logits.append(st.logits.clone())
    sequences = torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
    if not s.return_dict:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(scores) if s.output_scores else None,
        logits=tuple(logits) if s.output_logits else None,
    )


def _steps(
    model: GPT2,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None,
    tokenizer: Tokenizer | None,
    assistant_model: GPT2 | None,
    prompt_ids: torch.Tensor,
    check_each_step: bool = True,
) -> Iterator[Step]:
    """The decoding loop for greedy and sampling: plain, or assisted (assisted.py);
    ``check_each_step`` as decode_n_tokens'."""
    if s.assisted:
        from . import assisted

        return assisted.decode(model, ids, mask, s, generator, tokenizer, assistant_model)
    return decode_n_tokens(model, ids, mask, s, generator, tokenizer, prompt_ids, check_each_step)


def compute_transition_scores(
    model: GPT2,
    sequences: torch.Tensor,
    scores: Sequence[torch.Tensor],
    beam_indices: torch.Tensor | None = None,
    normalize_logits: bool = False,
) -> torch.Tensor:
    """The score of each generated token, [B * n, new]: transformers' compute_transition_scores.

    sequences: ``GenerateOutput.sequences``; scores: its ``scores`` (one [rows, V] tensor
    per step); beam_indices: its ``beam_indices`` after beam search (None otherwise: row
    i's token came from row i). ``normalize_logits``: log-softmax each step's scores first
    (use it for greedy / sampling scores, which are not log-probabilities). Positions past
    a beam's end are 0. With beam search and normalize_logits=False, summing a row and
    dividing by its length ** length_penalty gives its sequences_scores.
    """
    if not scores:
        raise ValueError("scores is empty: generate with return_dict_in_generate=True, output_scores=True")
    V = scores[0].shape[-1]
    if beam_indices is None:
        beam_indices = torch.arange(scores[0].shape[0], device=sequences.device).view(-1, 1).expand(-1, len(scores))
    stacked = torch.stack(list(scores)).reshape(len(scores), -1).transpose(0, 1)  # (rows * V, steps)
    if normalize_logits:
        stacked = stacked.reshape(-1, V, stacked.shape[-1]).log_softmax(dim=1).reshape(-1, stacked.shape[-1])
    ended = beam_indices < 0
    length = int((~ended).long().sum(-1).max())
    beam_indices = beam_indices.clone()[:, :length]
    ended = ended[:, :length]
    beam_indices[ended] = 0
    indices = sequences[:, sequences.shape[-1] - length :] + beam_indices * V  # rows of ``stacked``
    out = stacked.gather(0, indices)
    out[ended] = 0
    return out


# --------------------------------------------------------------------------- streaming
@dataclass
class StreamStep:
    """One step of ``stream``: the token each row made, and the text that became complete.

    ``texts[b]`` is "" while row b's newest bytes are an incomplete UTF-8 character (they
    come with a later step), after the row has finished, and for its EOS token. ``token``
    and ``text`` are row 0's, for the common one-prompt case.

    With ``stream(..., logprobs=k)``: ``logprobs[b]`` is the log-probability of the token
    row b made and ``top_ids[b]`` / ``top_logprobs[b]`` the k most likely tokens with
    theirs (most likely first), all of the distribution ``logprobs_mode`` names; for a row
    that finished before this step they are NaN / -1.
    """

    tokens: torch.Tensor  # [B] the id made at this step (pad_token_id for finished rows)
    texts: list[str]  # [B] new complete text per row ("" without a tokenizer)
    finished: torch.Tensor  # [B] bool: the row has ended (at this step or before)
    logprobs: torch.Tensor | None = None  # [B] float32: log p(tokens[b])
    top_ids: torch.Tensor | None = None  # [B, k] the k most likely tokens
    top_logprobs: torch.Tensor | None = None  # [B, k] their log-probabilities

    @property
    def token(self) -> int:
        return int(self.tokens[0])

    @property
    def text(self) -> str:
        return self.texts[0]


LOGPROBS_MODES = ("raw", "processed")


def stream(
    model: GPT2,
    tokenizer: Tokenizer | None,
    input_ids: str | torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    logprobs: int | None = None,
    logprobs_mode: str = "raw",
    generator: torch.Generator | None = None,
    assistant_model: GPT2 | None = None,
    stop: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> Iterator[StreamStep]:
    """``generate`` one step at a time: yields a ``StreamStep`` as each token is made.

    Takes generate's arguments (beam search excepted: its best beam is only known at the
    end; num_return_sequences too: repeat the prompt in the batch). A string prompt is
    encoded with ``tokenizer``. The tokens equal generate's; each row's texts joined equal
    ``tokenizer.decode`` of its new tokens up to (not including) an EOS that ended it.
    Arguments are checked here, before the first step.

    logprobs: k >= 0: each step also carries the chosen token's log-probability and the k
        most likely alternatives (k = 0: the chosen token's only).
    logprobs_mode: "raw" (default): log-softmax of the model's logits, before any
        processor: what the model believes, the same whatever the sampling settings (as
        OpenAI's and vLLM's logprobs by default). "processed": log-softmax of the scores
        the token was drawn from (after repetition penalty, temperature, top-k/top-p, ...;
        tokens cut by a warper have -inf).

        for step in minigpt2.stream(model, tok, "Once upon a time", max_new_tokens=50):
            print(step.text, end="", flush=True)
    """
    if tokenizer is not None and not hasattr(tokenizer, "decode_bytes"):  # model.stream(ids): a common slip
        raise ValueError(
            f"stream takes the tokenizer (or None) before the prompt, got a {type(tokenizer).__name__} there: "
            f"model.stream(tokenizer, input_ids, ...) or minigpt2.stream(model, tokenizer, input_ids, ...)"
        )
    if isinstance(input_ids, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs the tokenizer (pass tokenizer=...)")
        input_ids = tokenizer.encode(input_ids)
    if "tokenizer" in kwargs:
        raise ValueError("pass the tokenizer as stream's second argument")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
        raise ValueError(f"logprobs must be an integer >= 0 (alternatives per token) or None, got {logprobs!r}")
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode={logprobs_mode!r} must be one of {', '.join(LOGPROBS_MODES)}")
    if logprobs is not None and logprobs > model.config.vocab_size:
        raise ValueError(f"logprobs={logprobs} exceeds the vocabulary size {model.config.vocab_size}")
    if stop is not None:
        kwargs["stop_strings"] = stop
    gc, default_max_length = resolve_generation_config(model, generation_config, kwargs, assistant_model)
    ids, mask = _check_prompt(model, input_ids, attention_mask, gc.bos_token_id)
    s = _check_settings(
        model, gc, ids.shape[1], default_max_length, tokenizer=tokenizer, generator=generator,
        assistant_model=assistant_model,
    )
    if s.num_beams != 1:
        raise ValueError(f"num_beams={s.num_beams}: beam search cannot stream; use generate")
    if s.num_return_sequences != 1:
        raise ValueError("num_return_sequences cannot stream; repeat the prompt in the batch instead")
    if mask is None:
        mask = _infer_mask(ids, s)
    steps = _steps(model, ids, mask, s, generator, tokenizer, assistant_model, ids)
    return _stream_steps(tokenizer, ids.shape[0], steps, s, logprobs, logprobs_mode)


def _stream_steps(
    tokenizer: Tokenizer | None,
    B: int,
    steps: Iterator[Step],
    s: Settings,
    logprobs: int | None,
    logprobs_mode: str,
) -> Iterator[StreamStep]:
    """The generator behind ``stream``: decode, and turn each row's bytes into text as they complete."""
    # An incremental UTF-8 decoder per row holds back a character split across tokens and
    # replaces invalid bytes with U+FFFD, exactly as bytes.decode(errors="replace") would.
    utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(B)]
    done_before = torch.zeros(B, dtype=torch.bool)
    eos = set(s.eos_ids or ())
    for st in steps:
        token, finished = st.token, st.finished
        texts = [""] * B
        if tokenizer is not None:
            fin = finished.cpu()
            for b, t in enumerate(token.tolist()):
                if done_before[b]:
                    continue
                data = b"" if t in eos else _token_bytes(tokenizer, t)
                texts[b] = utf8[b].decode(data, final=bool(fin[b]))
        out = StreamStep(tokens=token, texts=texts, finished=finished)
        if logprobs is not None:
            out.logprobs, out.top_ids, out.top_logprobs = _logprobs(st, token, logprobs, logprobs_mode, done_before)
        done_before = finished.cpu()
        yield out


def _logprobs(
    st: Step, token: torch.Tensor, k: int, mode: str, done_before: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of the chosen token [B], top-k ids [B, k], their log p [B, k]) of one step."""
    with torch.inference_mode():
        logp = torch.log_softmax(st.logits if mode == "raw" else st.scores, dim=-1)  # (B, V)
        chosen = logp.gather(1, token.to(logp.device)[:, None])[:, 0]
        top_lp, top_ids = torch.topk(logp, k, dim=-1)
    gone = done_before.to(logp.device)
    chosen = chosen.clone().masked_fill(gone, math.nan)
    top_lp = top_lp.clone().masked_fill(gone[:, None], math.nan)
    top_ids = top_ids.clone().masked_fill(gone[:, None], -1)
    return chosen, top_ids, top_lp
