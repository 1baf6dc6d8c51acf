"""Text generation: prefill, one token per step through the KV cache, sampling and beam search.

The shape of gpt-fast's generate.py: a few small functions, each of which can be read,
timed or swapped alone.

    prefill(model, ids, positions, mask, cache)          -> logits of the last prompt position
    decode_one_token(model, token, position, mask, cache) -> logits of the next position
    decode_n_tokens(...)                                  -> yields one token per row per step
    beam_search(...)                                      -> the best beams, as transformers
    generate(model, input_ids, ...)                       -> prompt + new tokens [B, T + n]
    stream(model, tokenizer, prompt, ...)                 -> the same, step by step, with text

Every model call goes through ``_forward_last``: the transformer on the new tokens, then
the unembedding of the last position only (the whole [B, T, V] logits of a long prompt
are never built). That function is also where the fast path (fast.py) comes in.

The arguments, defaults and results are those of transformers' ``generate`` (v5): the
logits processors run in its order (sampling.py), a token is drawn with softmax +
``torch.multinomial`` from the same RNG, finished rows are padded with ``pad_token_id``
(default: the EOS id), and generation ends when every row has finished, so the same seed
gives the same tokens. Position ids follow the attention mask, so each row of a
left-padded batch produces what it produces alone.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import fast, sampling
from .sampling import Processors

if TYPE_CHECKING:  # model.py imports this module; a runtime import would be circular
    from .model import GPT2
    from .tokenizer import Tokenizer


class _FromConfig:
    """Default of ``eos_token_id``: the checkpoint's (generation_config.json, else config.json)."""

    def __repr__(self) -> str:
        return "<from config>"


FROM_CONFIG: Any = _FromConfig()


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
    """Validated generation arguments (see ``generate`` for their meaning)."""

    max_new_tokens: int
    processors: Processors
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    eos_ids: tuple[int, ...] | None
    pad_token_id: int | None
    stop: tuple[str, ...]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_float(name: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        raise ValueError(f"{name} must be a number, got {x!r}")
    return float(x)


def _count(name: str, x: Any, low: int = 0) -> int:
    if not _is_int(x) or x < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {x!r}")
    return x


def _token_ids(name: str, x: Any) -> tuple[int, ...] | None:
    """An int, a list of ints or None -> tuple of ints (or None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    ids = [x] if _is_int(x) else list(x) if isinstance(x, (list, tuple)) else None
    if ids is None or not all(_is_int(i) for i in ids):
        raise ValueError(f"{name} must be an int, a list of ints or None, got {x!r}")
    if any(i < 0 for i in ids):
        raise ValueError(f"{name}={x!r} holds a negative token id")
    return tuple(ids) if ids else None


def _check_settings(model: GPT2, prompt_len: int, *, tokenizer: Any, **a: Any) -> Settings:
    """Every argument checked before any work; a ValueError names the bad one."""
    c = model.config
    max_new = _count("max_new_tokens", a["max_new_tokens"])
    min_new = _count("min_new_tokens", a["min_new_tokens"])
    if prompt_len + max_new > c.n_positions:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new} exceeds n_positions={c.n_positions}"
        )
    do_sample = a["do_sample"]
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = 1.0 if a["temperature"] is None else _as_float("temperature", a["temperature"])
    if do_sample and not (0 < temperature < math.inf):
        raise ValueError(f"temperature={a['temperature']!r} must be > 0 when sampling (use do_sample=False for greedy)")
    top_k = a["top_k"]
    top_k = 0 if top_k is None else _count("top_k", top_k)
    top_p = 1.0 if a["top_p"] is None else _as_float("top_p", a["top_p"])
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={a['top_p']!r} must be in (0, 1]")
    penalty = 1.0 if a["repetition_penalty"] is None else _as_float("repetition_penalty", a["repetition_penalty"])
    if not 0 < penalty < math.inf:
        raise ValueError(f"repetition_penalty={a['repetition_penalty']!r} must be > 0 (1.0 = no penalty)")
    ngram = _count("no_repeat_ngram_size", a["no_repeat_ngram_size"])
    num_beams = _count("num_beams", a["num_beams"], low=1)
    length_penalty = _as_float("length_penalty", a["length_penalty"])
    early_stopping = a["early_stopping"]
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    n_return = _count("num_return_sequences", a["num_return_sequences"], low=1)
    if num_beams > 1 and n_return > num_beams:
        raise ValueError(f"num_return_sequences={n_return} must be <= num_beams={num_beams}")

    if n_return > 1 and num_beams == 1 and not do_sample:
        raise ValueError(f"num_return_sequences={n_return} needs do_sample=True or num_beams > 1 (greedy rows would be equal)")

    # EOS and pad: the arguments, else the checkpoint's generation_config.json, else (no such
    # file, as transformers' GenerationConfig.from_model_config) its config.json.
    defaults = model.generation_config or {"eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    eos = a["eos_token_id"]
    if eos is FROM_CONFIG:
        eos = defaults.get("eos_token_id")
    eos_ids = _token_ids("eos_token_id", eos)
    pad = a["pad_token_id"]
    if pad is None:
        pad = defaults.get("pad_token_id")
    if pad is None and eos_ids is not None:
        pad = eos_ids[0]  # transformers' default: pad finished rows with the (first) EOS
    if pad is not None:
        if not _is_int(pad):
            raise ValueError(f"pad_token_id must be an int, got {pad!r}")
        if not 0 <= pad < c.vocab_size:
            raise ValueError(f"pad_token_id={pad} is outside the vocabulary [0, {c.vocab_size})")

    gen = a["generator"]
    if gen is not None:
        if not isinstance(gen, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(gen).__name__}")
        if gen.device.type != model.device.type:
            raise ValueError(f"generator is on {gen.device} but the model is on {model.device}")

    stop = a["stop"]
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if stop:
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {a['stop']!r}")
        if tokenizer is None:
            raise ValueError("stop strings need the tokenizer: pass tokenizer=Tokenizer.from_pretrained(...)")

    # Beam sampling keeps one more token than there are EOS ids, so one beam can go on.
    keep = (len(eos_ids) + 1 if eos_ids else 2) if num_beams > 1 else 1
    processors = Processors(
        repetition_penalty=penalty,
        no_repeat_ngram_size=ngram,
        min_new_tokens=min_new,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_tokens_to_keep=keep,
    )
    return Settings(max_new, processors, num_beams, length_penalty, early_stopping, n_return, eos_ids, pad, stop)


def _check_prompt(model: GPT2, input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids as a LongTensor [B, T] on the model's device, and the mask (None: no padding)."""
    if isinstance(input_ids, str):
        raise ValueError("input_ids is a string; encode it first (tokenizer.encode) or use stream(model, tokenizer, text)")
    if not isinstance(input_ids, torch.Tensor):
        rows = input_ids
        if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], (list, tuple)):
            if len({len(r) for r in rows}) > 1:
                raise ValueError("input_ids rows have different lengths; left-pad them and pass attention_mask")
        try:
            input_ids = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"input_ids must be token ids (a list or LongTensor), got {type(rows).__name__}") from None
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
    """Position ids of the prompt: 0..T-1, or counted over real tokens (padding at 1) [B, T]."""
    if mask is None:
        return torch.arange(T, device=device)[None]  # (1, T)
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # (B, T)


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


# --------------------------------------------------------------------------- sampling loop
def decode_n_tokens(
    model: GPT2,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None = None,
    tokenizer: Tokenizer | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding; yields (tokens [B], finished [B] bool) once per step.

    Prefill once, then one token per step through a cache preallocated for prompt +
    max_new_tokens. Each step: processors -> argmax or multinomial -> finished rows get
    pad_token_id -> a row finishes on EOS or a stop string; stop when all have. The model
    runs under inference mode only between yields, so the caller's grad mode is untouched.
    """
    B, T = ids.shape
    L = T + s.max_new_tokens
    dev = ids.device
    p = s.processors
    eos = torch.tensor(s.eos_ids, device=dev) if s.eos_ids is not None else None
    stop = StopStrings(s.stop, tokenizer) if s.stop else None
    with torch.inference_mode():
        seq = torch.empty(B, L, dtype=torch.long, device=dev)  # prompt + tokens so far
        seq[:, :T] = ids
        full_mask = None if mask is None else torch.cat([mask, mask.new_ones(B, s.max_new_tokens)], dim=1)
        prompt_start = None if mask is None else (mask != 0).int().argmax(dim=1)  # left padding per row
        next_pos = (mask.sum(1) if mask is not None else torch.full((B,), T, device=dev))[:, None]  # (B, 1)
        unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        cache = model.make_cache(B, L)
        dec = fast.decoder(model, B)
        logits = prefill(model, ids, _prompt_positions(mask, T, dev), mask, cache, dec)
    rows = None  # with stop strings: each row's real token ids so far, on the CPU
    if stop is not None:
        rows = ids.tolist() if mask is None else [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
    for step in range(s.max_new_tokens):
        with torch.inference_mode(), fast.between_steps(dec):
            cur = T + step
            scores = sampling.process(p, seq[:, :cur], logits, n_new=step, eos_ids=eos, prompt_start=prompt_start)
            token = sampling.sample(scores, generator) if p.do_sample else sampling.greedy(scores)
            if s.pad_token_id is not None:
                token = token.masked_fill(~unfinished, s.pad_token_id)  # finished rows: pad
            seq[:, cur] = token
            done = torch.isin(token, eos) if eos is not None else torch.zeros_like(unfinished)
            if stop is not None:
                for b, t in enumerate(token.tolist()):
                    rows[b].append(t)
                    if stop.hit(rows[b]):
                        done[b] = True
            if step == s.max_new_tokens - 1:
                done = torch.ones_like(done)
            unfinished = unfinished & ~done
        yield token.clone(), ~unfinished  # cloned outside inference mode: normal tensors
        if not bool(unfinished.any()):
            return
        with torch.inference_mode(), fast.between_steps(dec):
            m = None if full_mask is None else full_mask[:, : cur + 1]
            logits = decode_one_token(model, token[:, None], next_pos + step, m, cache, dec)


# --------------------------------------------------------------------------- beam search
def beam_search(
    model: GPT2,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None = None,
    tokenizer: Tokenizer | None = None,
) -> torch.Tensor:
    """Beam search (or beam sampling), step for step as transformers' ``_beam_search`` (v5).

    Per prompt, ``num_beams`` live hypotheses. Each step scores every (beam, token) pair by
    the beam's summed log-probability plus log p(token), keeps the best K = (n_eos + 1 or 2)
    x num_beams candidates (so that num_beams can go on even if the best all end in EOS), and
    then: candidates that hit EOS or the length limit, among the top num_beams, enter the
    finished pool with score sum / (new tokens ** length_penalty); the best num_beams that
    did not finish live on. A batch item stops when no live beam can beat its worst finished
    one (with early_stopping=True: as soon as num_beams have finished). The -1e9 "impossible"
    scores are added exactly as transformers adds them, so even ties resolve the same way.
    Returns the best ``num_return_sequences`` per prompt: [B * num_return_sequences, T + n].
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
    n_pad = [0] * B if mask is None else (mask == 0).sum(1).tolist()  # left padding per prompt

    flat_ids = ids.repeat_interleave(nb, dim=0)  # (B * nb, T): each prompt once per beam
    mask = None if mask is None else mask.repeat_interleave(nb, dim=0)
    full_mask = None if mask is None else torch.cat([mask, mask.new_ones(B * nb, s.max_new_tokens)], dim=1)
    prompt_start = None if mask is None else (mask != 0).int().argmax(dim=1)
    next_pos = (mask.sum(1) if mask is not None else torch.full((B * nb,), T, device=dev))[:, None]

    running = torch.full((B, nb, L), fill, dtype=torch.long, device=dev)
    running[:, :, :T] = flat_ids.view(B, nb, T)
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand at step 0
    finished = running.clone()
    finished_scores = torch.full((B, nb), -1e9, device=dev)
    finished_len = torch.zeros(B, nb, dtype=torch.long, device=dev)  # new tokens of each
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    batch_offset = torch.arange(B, device=dev)[:, None] * nb  # (B, 1)

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
            p, running[:, :, :cur].reshape(B * nb, cur), logprobs, n_new=step, eos_ids=eos, prompt_start=prompt_start
        )
        total = (logprobs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)  # (B, nb * V)

        # The K best continuations over all beams (or K drawn without replacement, best first).
        if p.do_sample:
            pick = torch.multinomial(torch.softmax(total, dim=-1), K, generator=generator)
            top = total.gather(1, pick)
            top, order = top.sort(dim=-1, descending=True)
            pick = pick.gather(1, order)
        else:
            top, pick = torch.topk(total, K)  # (B, K)
        src_beam, token = pick // V, pick % V
        cand = running.gather(1, src_beam[:, :, None].expand(B, K, L)).clone()  # (B, K, L)
        cand[:, :, cur] = token
        ends = torch.isin(token, eos) if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        ends = ends | (cur + 1 >= L)
        if stop is not None:  # a candidate whose text now holds a stop string ends too
            hits = [[stop.hit(row[n_pad[b] :]) for row in rows] for b, rows in enumerate(cand[:, :, : cur + 1].tolist())]
            ends = ends | torch.tensor(hits, device=dev)

        # Live beams: the best num_beams candidates that did not just finish.
        live_scores = top + ends.float() * -1.0e9
        keep = torch.topk(live_scores, nb)[1]  # (B, nb)
        running = cand.gather(1, keep[:, :, None].expand(B, nb, L))
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
        finished_scores = merged_scores.gather(1, best)
        finished_len = torch.cat([finished_len, torch.full_like(token, step + 1)], dim=1).gather(1, best)
        is_finished = torch.cat([is_finished, just], dim=1).gather(1, best)

        # Can a live beam still beat the worst finished one? (transformers' heuristic)
        new_len = cur + 1 - T
        best_len = s.max_new_tokens if (early == "never" and lp > 0.0) else new_len
        best_possible = running_scores[:, :1] / (best_len**lp)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & (best_possible > worst).any(dim=-1, keepdim=True)
        all_full = bool(is_finished.all()) and early is True
        if not bool(can_improve.any()) or all_full or bool(ends.all()):
            break

    n = s.num_return_sequences
    out = finished[:, :n].reshape(B * n, L)
    return out[:, : T + int(finished_len[:, :n].max())]


# --------------------------------------------------------------------------- entry points
def generate(
    model: GPT2,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = FROM_CONFIG,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Tokenizer | None = None,
) -> torch.Tensor:
    """Continue each prompt; returns prompt + new tokens, a LongTensor [B, T + n].

    The arguments are transformers' ``generate`` arguments with the same defaults and
    meanings, so code ports over unchanged and gives the same tokens:

    input_ids: [B, T] (a 1-D tensor or a list is one prompt). Pad a batch on the left and
        pass attention_mask [B, T] (0 = padding); positions then follow the mask.
    max_new_tokens: at most this many new tokens; fewer when every row has finished
        (the result is then shorter, as in transformers). 0 returns the prompt.
    min_new_tokens: EOS is banned until this many tokens are made.
    do_sample: False = greedy (or beam search); True = draw from softmax(processed logits)
        with torch.multinomial, after temperature, top_k (0 = off; 50 by default, as
        transformers) and top_p (1.0 = off), in that order.
    repetition_penalty: > 1 discourages tokens already in the row (CTRL's penalty).
    no_repeat_ngram_size: n > 0 forbids any n-gram to occur twice.
    num_beams > 1: beam search; length_penalty is the exponent of the length that divides
        a finished beam's log-probability; early_stopping True / False / "never" as there.
    num_return_sequences: rows per prompt (beam search: the best ones; sampling: draws).
    eos_token_id: int or list; by default the checkpoint's. None: never stop early.
    pad_token_id: fills finished rows; default the checkpoint's, else the (first) EOS id.
    generator: a torch.Generator for sampling, for reproducible draws that leave the
        global RNG alone. Without it, ``torch.manual_seed(s)`` before the call reproduces
        transformers' ``generate(do_sample=True)`` with the same seed.
    stop: strings that end a row once its text contains one (needs ``tokenizer``).
    """
    input_ids, attention_mask = _check_prompt(model, input_ids, attention_mask)
    s = _check_settings(
        model, input_ids.shape[1], tokenizer=tokenizer, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator, stop=stop,
    )  # fmt: skip
    if attention_mask is None:
        attention_mask = _infer_mask(input_ids, s)
    if s.max_new_tokens == 0:
        return input_ids.repeat_interleave(s.num_return_sequences, dim=0)
    if s.num_beams > 1:
        with torch.inference_mode():
            out = beam_search(model, input_ids, attention_mask, s, generator, tokenizer)
        return out.clone()  # a normal tensor again, usable with autograd
    if s.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(s.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(s.num_return_sequences, dim=0)
    new = [token for token, _ in decode_n_tokens(model, input_ids, attention_mask, s, generator, tokenizer)]
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


@dataclass
class StreamStep:
    """One step of ``stream``: the token each row made, and the text that became complete.

    ``texts[b]`` is "" while row b's newest bytes are an incomplete UTF-8 character (they
    come with a later step), after the row has finished, and for its EOS token. ``token``
    and ``text`` are row 0's, for the common one-prompt case.
    """

    tokens: torch.Tensor  # [B] the id made at this step (pad_token_id for finished rows)
    texts: list[str]  # [B] new complete text per row ("" without a tokenizer)
    finished: torch.Tensor  # [B] bool: the row has ended (at this step or before)

    @property
    def token(self) -> int:
        return int(self.tokens[0])

    @property
    def text(self) -> str:
        return self.texts[0]


def stream(
    model: GPT2,
    tokenizer: Tokenizer | None,
    input_ids: str | torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> Iterator[StreamStep]:
    """``generate`` one step at a time: yields a ``StreamStep`` as each token is made.

    Takes generate's keyword arguments (beam search excepted: its best beam is only known
    at the end). A string prompt is encoded with ``tokenizer``. The tokens equal
    generate's; each row's texts joined equal ``tokenizer.decode`` of its new tokens up to
    (not including) an EOS that ended it. Arguments are checked here, before the first step.

        for step in minigpt2.stream(model, tok, "Once upon a time", max_new_tokens=50):
            print(step.text, end="", flush=True)
    """
    if isinstance(input_ids, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs the tokenizer (pass tokenizer=...)")
        input_ids = tokenizer.encode(input_ids)
    if kwargs.get("num_beams", 1) != 1:
        raise ValueError(f"num_beams={kwargs['num_beams']!r}: beam search cannot stream; use generate")
    if kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("num_return_sequences cannot stream; repeat the prompt in the batch instead")
    if "tokenizer" in kwargs:
        raise ValueError("pass the tokenizer as stream's second argument")
    generator = kwargs.pop("generator", None)
    ids, mask = _check_prompt(model, input_ids, attention_mask)
    defaults = {
        "max_new_tokens": None, "min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_k": 50,
        "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1, "length_penalty": 1.0,
        "early_stopping": False, "num_return_sequences": 1, "eos_token_id": FROM_CONFIG, "pad_token_id": None,
        "stop": None,
    }  # fmt: skip
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise ValueError(f"unknown argument(s) for stream: {', '.join(sorted(unknown))}")
    if "max_new_tokens" not in kwargs:
        raise ValueError("max_new_tokens is required")
    s = _check_settings(model, ids.shape[1], tokenizer=tokenizer, generator=generator, **{**defaults, **kwargs})
    if mask is None:
        mask = _infer_mask(ids, s)
    return _stream_steps(model, tokenizer, ids, mask, s, generator)


def _stream_steps(
    model: GPT2,
    tokenizer: Tokenizer | None,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None,
) -> Iterator[StreamStep]:
    """The generator behind ``stream``: decode, and turn each row's bytes into text as they complete."""
    B = ids.shape[0]
    # An incremental UTF-8 decoder per row holds back a character split across tokens and
    # replaces invalid bytes with U+FFFD, exactly as bytes.decode(errors="replace") would.
    utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(B)]
    done_before = torch.zeros(B, dtype=torch.bool)
    eos = set(s.eos_ids or ())
    for token, finished in decode_n_tokens(model, ids, mask, s, generator, tokenizer):
        texts = [""] * B
        if tokenizer is not None:
            fin = finished.cpu()
            for b, t in enumerate(token.tolist()):
                if done_before[b]:
                    continue
                data = b"" if t in eos else _token_bytes(tokenizer, t)
                texts[b] = utf8[b].decode(data, final=bool(fin[b]))
        done_before = finished.cpu()
        yield StreamStep(tokens=token, texts=texts, finished=finished)
