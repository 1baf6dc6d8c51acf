"""Assisted decoding (speculative decoding): a cheap draft proposes tokens, the model checks them all at once.

Decoding one token costs the model a pass over all its weights; checking k proposed tokens
in one forward costs about the same (the weights are read once for all k positions). So
if something cheap can guess the next tokens, every guess the model agrees with is a
token for free. Where the drafts come from (transformers' "candidate generators"):

- ``assistant_model``: a smaller GPT-2 with the same vocabulary (distilgpt2 or gpt2 for
  gpt2-xl) decodes ``num_assistant_tokens`` tokens with the same processors, greedy or
  sampled, stopping early at EOS or when its own confidence in a token falls below
  ``assistant_confidence_threshold``;
- ``prompt_lookup_num_tokens``: no second model: the tokens that followed the leftmost
  earlier occurrence of the sequence's last n-gram (n from ``max_matching_ngram_size``,
  default 2, down to 1) in the text so far (Saxena 2023, "prompt lookup decoding"): free,
  and good when the output quotes the prompt;
- ``assistant_early_exit=N``: the model's own first N blocks, then its ln_f and head
  (LayerSkip's self-speculation; GPT-2 was not trained for it, so its drafts are poor; with
  N = n_layer the draft is the model itself, which shows the machinery's own overhead).

One round, for the sequence x so far (one row):

1. draft c_1..c_k (and, from a model, the distributions q_1..q_k they were drawn from);
2. run the model on [last token, c_1..c_k] in one forward: logits for k + 1 positions,
   each processed by the same logits processors plain decoding uses (sampling.py), giving
   the distributions p_1..p_{k+1};
3. greedy: keep the drafts while c_i = argmax p_i, then add argmax p at the first
   disagreement (or p_{k+1} if all agreed): exactly the tokens plain greedy decoding makes.
   Sampling with q (Leviathan et al. 2023, algorithm 1; Chen et al. 2023): keep c_i with
   probability min(1, p_i(c_i) / q_i(c_i)); at the first rejection draw from
   norm(max(0, p_i - q_i)), else from p_{k+1}: every token is distributed exactly as the
   model alone would draw it. Sampling without q (prompt lookup): draw from each p_i and
   keep the drafts while they equal the draws;
4. stop at EOS, a stop string, max_time or the length limit inside the accepted tokens;
   roll both KV caches back *by length* to the accepted prefix (KVCache.crop): the keys
   and values of rejected drafts are simply overwritten by the next forward.

Each model keeps its own KV cache. As in transformers, one prompt at a time (batch size 1)
and one returned sequence. ``num_assistant_tokens_schedule="heuristic"`` grows the draft
by 2 after a round where every draft was accepted and shrinks it by 1 otherwise, and keeps
the value on the assistant's generation_config for the next call ("heuristic_transient":
not kept); transformers' adaptive confidence threshold (fitted with scikit-learn) is not
reproduced: the threshold stays as given.

Speed: with acceptance rate a (the share of drafts kept) and k drafts per round, a round
makes E = (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al., eq. 1) for one model forward of
k + 1 positions plus k draft steps. With c = (draft step time) / (model step time) and the
model's (k+1)-position forward taking about one step's time, the speed-up over plain
decoding is about E / (1 + k c).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import fast, sampling
from .generation import (
    Deadline,
    Settings,
    Step,
    StopStrings,
    _forward_all,
    _forward_last,
    _next_positions,
    _prompt_positions,
)
from .generation_config import GenerationConfig

if TYPE_CHECKING:
    from .model import GPT2
    from .tokenizer import Tokenizer

#: The generation fields an assistant model's own generation_config may supply (after the
#: call and the main model's, before transformers' defaults).
ASSISTANT_FIELDS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


@dataclass
class AssistedStats:
    """What a run of assisted decoding did (``generate_with_stats``)."""

    rounds: int = 0  # the model's checking forwards (one per round)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the model kept
    tokens: int = 0  # tokens generated

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (nan when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else math.nan


# --------------------------------------------------------------------------- checks
def check(model: GPT2, gc: GenerationConfig, assistant_model: Any, num_return_sequences: int) -> None:
    """The settings of assisted decoding, checked before any work (ValueError names the problem)."""
    from .model import GPT2

    sources = [name for name, on in (
        ("assistant_model", assistant_model is not None),
        ("prompt_lookup_num_tokens", gc.prompt_lookup_num_tokens is not None),
        ("assistant_early_exit", gc.assistant_early_exit is not None),
    ) if on]  # fmt: skip
    if len(sources) > 1:
        raise ValueError(f"assisted decoding takes one source of drafts; got {' and '.join(sources)}")
    if num_return_sequences != 1:
        raise ValueError(f"num_return_sequences={num_return_sequences}: assisted decoding returns one sequence per prompt")
    if assistant_model is not None:
        if not isinstance(assistant_model, GPT2):
            raise ValueError(f"assistant_model must be a minigpt2 GPT2, got {type(assistant_model).__name__}")
        if assistant_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"assistant_model has vocab_size={assistant_model.config.vocab_size}, the model "
                f"{model.config.vocab_size}: the assistant must share the model's tokenizer"
            )
        if assistant_model.device != model.device:
            raise ValueError(f"assistant_model is on {assistant_model.device}, the model on {model.device}")
    if gc.assistant_early_exit is not None and gc.assistant_early_exit > model.config.n_layer:
        raise ValueError(f"assistant_early_exit={gc.assistant_early_exit} exceeds the model's n_layer={model.config.n_layer}")


# --------------------------------------------------------------------------- drafts
class _ModelDraft:
    """Drafts from a model (the assistant, or the model's first layers) with its own KV cache."""

    def __init__(self, draft: GPT2, s: Settings, positions: torch.Tensor, mask: torch.Tensor | None, L: int,
                 T: int, eos: torch.Tensor | None, generator: torch.Generator | None, prompt_ids: torch.Tensor,
                 prompt_start: torch.Tensor | None) -> None:
        if L > draft.config.n_positions:
            raise ValueError(f"the assistant's n_positions={draft.config.n_positions} is shorter than the "
                             f"{L} tokens this call can reach")
        self.model, self.s, self.positions, self.mask, self.T = draft, s, positions, mask, T
        self.eos, self.generator, self.prompt_ids, self.prompt_start = eos, generator, prompt_ids, prompt_start
        self.cache = draft.make_cache(1, L)
        self.dec = fast.decoder(draft, 1)
        gc = s.config
        self.k = int(gc.num_assistant_tokens)
        self.schedule = gc.num_assistant_tokens_schedule
        self.threshold = float(gc.assistant_confidence_threshold or 0.0)

    def propose(self, seq: torch.Tensor, cur: int, budget: int) -> tuple[int, torch.Tensor | None]:
        """Write up to min(k, budget) drafts into seq[:, cur:]; (how many, their q [n, V] or None)."""
        n_max = min(self.k, budget)
        if n_max <= 0:
            return 0, None
        start = self.cache.length  # positions this model has not seen yet: seq[start:cur]
        m = None if self.mask is None else self.mask[:, :cur]
        logits = _forward_last(self.model, seq[:, start:cur], self.positions[:, start:cur], m, self.cache, self.dec)
        qs = []
        for j in range(n_max):
            at = cur + j
            scores = sampling.process(self.s.processors, seq[:, :at], logits, n_new=at - self.T, eos_ids=self.eos,
                                      prompt_start=self.prompt_start, prompt_ids=self.prompt_ids)
            token = sampling.sample(scores, self.generator) if self.s.do_sample else sampling.greedy(scores)
            seq[:, at] = token
            qs.append(scores[0])
            if self.eos is not None and bool(torch.isin(token, self.eos).any()):
                break
            if self.threshold > 0 and float(torch.softmax(scores[0], -1)[token[0]]) < self.threshold:
                break  # transformers' ConfidenceCriteria: the draft is unsure, let the model take over
            if j == n_max - 1:
                break
            m = None if self.mask is None else self.mask[:, : at + 1]
            logits = _forward_last(self.model, token[:, None], self.positions[:, at : at + 1], m, self.cache, self.dec)
        return len(qs), torch.stack(qs)

    def adapt(self, n_drafted: int, n_matches: int) -> None:
        """num_assistant_tokens_schedule: +2 after a round the model accepted whole, else -1."""
        if self.schedule in ("heuristic", "heuristic_transient"):
            self.k = self.k + 2 if n_matches == n_drafted else max(1, self.k - 1)

    def crop(self, valid_len: int) -> None:
        """Forget what the model rejected: keep the first ``valid_len`` positions (by length)."""
        self.cache.crop(min(self.cache.length, valid_len))


class _PromptLookup:
    """Drafts from the text so far: what followed the leftmost earlier occurrence of its last
    n-gram (transformers' PromptLookupCandidateGenerator, rule for rule)."""

    def __init__(self, s: Settings, T: int, eos: torch.Tensor | None, prompt_ids: torch.Tensor,
                 prompt_start: torch.Tensor | None, max_length: int, vocab_size: int) -> None:
        gc = s.config
        self.s, self.T, self.eos, self.prompt_ids, self.prompt_start = s, T, eos, prompt_ids, prompt_start
        self.vocab_size = vocab_size
        self.k = int(gc.prompt_lookup_num_tokens)
        self.ngram = int(gc.max_matching_ngram_size or 2)
        self.max_length = max_length

    def propose(self, seq: torch.Tensor, cur: int, budget: int) -> tuple[int, None]:
        if self.max_length == cur + 1:  # the model makes the one token left itself
            return 0, None
        ids = seq[:, :cur]
        for n in range(min(self.ngram, cur - 1), 0, -1):
            windows = ids.unfold(1, n, 1)  # (1, cur - n + 1, n)
            hits = (windows == ids[0, -n:]).all(dim=2).nonzero(as_tuple=True)[1].tolist()
            for i in hits:
                # (drafts past the length limit could only be cut again: ``budget`` keeps them in the buffers)
                start, end = i + n, min(i + n + min(self.k, budget), cur, self.max_length)
                if start >= end:
                    continue
                chosen = ids[0, start:end].tolist()
                chosen = chosen[: self._allowed(seq, cur, chosen)]
                if not chosen:
                    continue
                if self.eos is not None:  # a draft never carries EOS: the model must make it itself
                    eos = set(self.eos.tolist())
                    chosen = next((chosen[:j] for j, t in enumerate(chosen) if t in eos), chosen)
                if not chosen:
                    return 0, None
                seq[0, cur : cur + len(chosen)] = torch.tensor(chosen, device=seq.device)
                return len(chosen), None
        return 0, None

    def _allowed(self, seq: torch.Tensor, cur: int, chosen: list[int]) -> int:
        """How many of ``chosen`` the processors allow in turn (scored on uniform logits, as
        transformers checks them: a token they send to -inf ends the draft there)."""
        probe = seq[:, :cur]
        ones = torch.ones(1, self.vocab_size, device=seq.device)
        for j, t in enumerate(chosen):
            out = sampling.process(self.s.processors, probe, ones, n_new=probe.shape[1] - self.T, eos_ids=self.eos,
                                   prompt_start=self.prompt_start, prompt_ids=self.prompt_ids)
            if float(out[0, t]) in (-math.inf, torch.finfo(out.dtype).min):
                return j
            probe = torch.cat([seq[:, :cur], torch.tensor([chosen[: j + 1]], device=seq.device)], dim=1)
        return len(chosen)

    def adapt(self, n_drafted: int, n_matches: int) -> None:
        pass

    def crop(self, valid_len: int) -> None:
        pass


# --------------------------------------------------------------------------- the loop
def decode(
    model: GPT2,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None = None,
    tokenizer: Tokenizer | None = None,
    assistant_model: GPT2 | None = None,
    stats: AssistedStats | None = None,
) -> Iterator[Step]:
    """Assisted greedy or sampled decoding of one prompt ([1, T]); yields one ``Step`` per
    generated token, as ``generation.decode_n_tokens`` does (same tokens under greedy)."""
    B, T = ids.shape
    if B != 1:
        raise ValueError(f"assisted decoding runs one prompt at a time (batch size 1, as in transformers); got {B}")
    return _decode(model, ids, mask, s, generator, tokenizer, assistant_model, stats or AssistedStats())


def _decode(
    model: GPT2,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    s: Settings,
    generator: torch.Generator | None,
    tokenizer: Tokenizer | None,
    assistant_model: GPT2 | None,
    stats: AssistedStats,
) -> Iterator[Step]:
    T = ids.shape[1]
    L = T + s.max_new_tokens
    dev = ids.device
    p = s.processors
    eos = torch.tensor(s.eos_ids, device=dev) if s.eos_ids is not None else None
    eos_set = set(s.eos_ids or ())
    stop = StopStrings(s.stop, tokenizer) if s.stop else None
    deadline = Deadline(s.max_time)
    gc = s.config
    with torch.inference_mode():
        seq = torch.empty(1, L, dtype=torch.long, device=dev)
        seq[:, :T] = ids
        full_mask = None if mask is None else torch.cat([mask, mask.new_ones(1, s.max_new_tokens)], dim=1)
        # Every position id this call can use, prompt then new tokens (transformers 5's rule).
        positions = torch.cat([
            _prompt_positions(mask, T, dev).expand(1, T),
            _next_positions(mask, T, dev, 1) + torch.arange(s.max_new_tokens, device=dev)[None],
        ], dim=1)  # fmt: skip
        prompt_start = None if mask is None else (mask != 0).int().argmax(dim=1)
        if gc.prompt_lookup_num_tokens is not None:
            drafts: Any = _PromptLookup(s, T, eos, ids, prompt_start, L, model.config.vocab_size)
        else:
            draft_model = assistant_model if assistant_model is not None else early_exit_model(model, gc.assistant_early_exit)
            drafts = _ModelDraft(draft_model, s, positions, full_mask, L, T, eos, generator, ids, prompt_start)
        cache = model.make_cache(1, L)
        # The target only ever checks 1 + k drafts at once: kernels chosen for that many rows.
        # Those chosen for one row (a GEMV, numpy's on some hosts) ran a 5-row check of
        # gpt2-large's shape at 3-4x the time of one step; these run it at about one step's.
        # A model drafting for itself keeps one-row kernels: a model has one set of prepared
        # weights, which two row counts would rebuild in turn.
        own = isinstance(drafts, _ModelDraft) and drafts.model is model
        dec = fast.decoder(model, 1 if own else 1 + drafts.k)
        if T > 1:  # the prompt but its last token; each round feeds that token and the drafts
            _forward_last(model, ids[:, :-1], positions[:, : T - 1], None if mask is None else mask[:, :-1], cache, dec)
    rows = None if stop is None else [ids[0][mask[0].bool()].tolist() if mask is not None else ids[0].tolist()]
    cur = T
    try:
        while cur < L:
            with torch.inference_mode():
                n_draft, q = drafts.propose(seq, cur, L - cur - 1)
                start = cache.length
                m = None if full_mask is None else full_mask[:, : cur + n_draft]
                logits = _forward_all(model, seq[:, start : cur + n_draft], positions[:, start : cur + n_draft], m,
                                      cache, dec)
                logits = logits[0, -(n_draft + 1) :]  # (n_draft + 1, V): the next-token logits at cur - 1, cur, ...
                scores = torch.stack([
                    sampling.process(p, seq[:, : cur + i], logits[i : i + 1], n_new=cur + i - T, eos_ids=eos,
                                     prompt_start=prompt_start, prompt_ids=ids)[0]
                    for i in range(n_draft + 1)
                ])  # fmt: skip
                drafted = seq[0, cur : cur + n_draft]
                if s.do_sample and q is not None:
                    valid, n_matches = _speculative_sampling(drafted, q, scores, generator)
                elif s.do_sample:  # sampling without draft distributions: keep the drafts the model makes too
                    chosen = sampling.sample(scores, generator)
                    n_matches = int((chosen[:n_draft] == drafted).int().cumprod(0).sum())
                    valid = chosen[: n_matches + 1]
                else:  # greedy; argmax of an all -inf row is token 0: flag it, read with the same sync
                    best, chosen = fast.max_last(scores, dec)
                    matches = (chosen[:n_draft] == drafted).int().cumprod(0)
                    empty = (best == float("-inf")).int().cumsum(0)  # (n_draft + 1,): empty rows up to i
                    n_matches, n_empty = torch.stack((matches.sum(), empty[matches.sum()])).tolist()
                    if n_empty:
                        raise sampling.no_token_left(scores[: n_matches + 1])
                    valid = chosen[: n_matches + 1]
                drafts.adapt(n_draft, n_matches)
                stats.rounds += 1
                stats.drafted += n_draft
                stats.accepted += n_matches
            # The accepted tokens, one Step each; the row ends at EOS, a stop string, the length
            # limit or max_time, and nothing after that token counts.
            valid_list = valid.tolist()
            for i, t in enumerate(valid_list):
                at = cur + i
                with torch.inference_mode():
                    seq[0, at] = t
                done = t in eos_set or at + 1 >= L
                if stop is not None:
                    rows[0].append(t)
                    done = done or stop.hit(rows[0])
                done = done or (i == len(valid_list) - 1 and deadline.passed())
                stats.tokens += 1
                yield Step(torch.tensor([t], device=dev), torch.tensor([done], device=dev), logits[i : i + 1],
                           scores[i : i + 1])
                if done:
                    return
            cur += len(valid_list)
            with torch.inference_mode():
                cache.crop(cur - 1)  # the model has seen every accepted token but the newest
                drafts.crop(cur - 1)
    finally:
        if assistant_model is not None and getattr(drafts, "schedule", None) == "heuristic":
            assistant_model.generation_config.num_assistant_tokens = drafts.k  # kept for the next call, as transformers


def _speculative_sampling(
    drafted: torch.Tensor, q: torch.Tensor, scores: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, int]:
    """Leviathan et al. (2023), algorithm 1, as transformers' ``_speculative_sampling``.

    drafted: [k] the draft tokens; q: [k, V] the draft's processed scores they were drawn
    from; scores: [k + 1, V] the model's processed scores at the same positions (and one
    more). Returns (accepted drafts + one more token [n + 1], n).
    """
    k = drafted.shape[0]
    q_probs = q.softmax(dim=-1)
    p_probs = scores.softmax(dim=-1)
    idx = torch.arange(k, device=q.device)
    ratio = p_probs[idx, drafted] / q_probs[idx, drafted]  # p_i(c_i) / q_i(c_i)
    r = torch.rand(k, generator=generator, device=q.device)
    n = int(((~(r <= ratio)).cumsum(0) < 1).sum())  # drafts kept before the first rejection
    if n < k:
        residual = (p_probs[n] - q_probs[n]).clamp(min=0)  # norm(max(0, p - q)): what q under-sampled
        total = residual.sum()
        dist = residual / total if float(total) > 0 else p_probs[n]  # p == q exactly: nothing to correct
    else:
        dist = p_probs[k]
    try:
        t = torch.multinomial(dist, 1, generator=generator)
    except RuntimeError as e:  # checked only when the draw failed
        raise sampling.no_token_left(scores[n : n + 1]) from e
    return torch.cat([drafted[:n], t]), n


# --------------------------------------------------------------------------- early exit
_early_exit_models: weakref.WeakKeyDictionary[GPT2, dict[int, GPT2]] = weakref.WeakKeyDictionary()


def early_exit_model(model: GPT2, n_layer: int) -> GPT2:
    """The model's first ``n_layer`` blocks with its final LayerNorm and head, as a GPT2 that
    shares (does not copy) those modules: the draft of ``assistant_early_exit``. Kept per
    model and depth, so the fast path prepares its weights once."""
    from .model import GPT2

    made = _early_exit_models.setdefault(model, {})
    if n_layer not in made:
        config = dataclasses.replace(model.config, n_layer=n_layer, extra=dict(model.config.extra))
        with torch.device("meta"):
            shell = GPT2(config)
        t, src = shell.transformer, model.transformer
        t.wte, t.wpe, t.drop, t.ln_f = src.wte, src.wpe, src.drop, src.ln_f
        t.h = torch.nn.ModuleList(list(src.h[:n_layer]))
        shell.lm_head = model.lm_head
        made[n_layer] = shell
    shell = made[n_layer]
    shell.train(model.training)
    return shell


# --------------------------------------------------------------------------- measuring
def generate_with_stats(
    model: GPT2, input_ids: Any, assistant_model: GPT2 | None = None, **kwargs: Any
) -> tuple[torch.Tensor, AssistedStats]:
    """``model.generate(input_ids, assistant_model=..., **kwargs)`` for one prompt, and what
    the drafts did (rounds, drafted, accepted, acceptance rate): for benchmarks."""
    from .generation import _check_prompt, _check_settings, _infer_mask, resolve_generation_config

    stats = AssistedStats()
    gc, default_max = resolve_generation_config(model, kwargs.pop("generation_config", None), kwargs,
                                                assistant_model=assistant_model)
    ids, mask = _check_prompt(model, input_ids, kwargs.pop("attention_mask", None), gc.bos_token_id)
    s = _check_settings(model, gc, ids.shape[1], default_max, tokenizer=None, generator=None,
                        assistant_model=assistant_model)
    if not s.assisted:
        raise ValueError("generate_with_stats needs assistant_model, prompt_lookup_num_tokens or assistant_early_exit")
    mask = mask if mask is not None else _infer_mask(ids, s)
    new = [st.token for st in decode(model, ids, mask, s, None, None, assistant_model, stats)]
    return torch.cat([ids, torch.stack(new, dim=1)], dim=1), stats
