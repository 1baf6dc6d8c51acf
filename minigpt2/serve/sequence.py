"""What the engine schedules: one request's settings, its sequences, and what they emit.

The shape of nano-vllm's ``sequence.py``, for completions:

    SamplingParams   what one completion asks for (checked here, whoever builds it)
    Sequence         one completion being made: prompt, tokens so far, KV slot, RNG, status
    Request          the sequences of one call (prompts x best_of) and where their outputs go
    PromptOutput, TokenOutput, ErrorOutput
                     what a request's ``emit`` receives from the engine thread

Nothing here knows HTTP or tensors beyond a sequence's own RNG and penalty state.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

#: finish_reason values: OpenAI's "stop" (EOS or a stop string) and "length" (max_tokens),
#: and vLLM's "abort" for a sequence the server ended (shutdown) before either happened.
STOP, LENGTH, ABORT = "stop", "length", "abort"

#: Temperatures below this are greedy, as in vLLM (its _SAMPLING_EPS): dividing the scores by
#: a subnormal temperature overflows them to inf, and softmax of inf is NaN (a failed draw).
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """The settings of one completion, in OpenAI's (and vLLM's) names and meanings.

    max_tokens: new tokens at most (0: none; with ``echo`` that scores the prompt only).
    temperature: below ``SAMPLING_EPS`` (1e-5; 0 included) is greedy (argmax after the
        penalties); otherwise samples from softmax(scores / t).
    top_p, top_k, min_p: nucleus (1.0 = off), top-k (0 = off), min-p (0.0 = off) filters.
    repetition_penalty: CTRL's multiplicative penalty on prompt and output tokens (1.0 = off).
    presence_penalty, frequency_penalty: OpenAI's additive penalties on output tokens.
    logit_bias: (token id, bias) pairs added to the logits.
    min_tokens: EOS is banned until this many tokens are made; ignore_eos: EOS never ends it.
    stop: strings that end the completion; the text stops before the first one.
    logprobs: None for no log-probs, else k >= 0 alternatives per token besides the chosen one.
    echo: emit the prompt first (its text, and with ``logprobs`` its per-token log-probs).
    seed: the sequence's own ``torch.Generator`` seed; None draws one from the OS.

    Raises ValueError naming the field and its limit.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _count("max_tokens", self.max_tokens)
        _count("min_tokens", self.min_tokens)
        _count("top_k", self.top_k)
        if self.logprobs is not None:
            _count("logprobs", self.logprobs)
        _number("temperature", self.temperature, low=0.0)
        _number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _number("presence_penalty", self.presence_penalty)
        _number("frequency_penalty", self.frequency_penalty)
        for token, bias in self.logit_bias:
            _count("logit_bias token id", token)
            _number(f"logit_bias[{token}]", bias)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def needs_logprobs(self) -> bool:
        return self.logprobs is not None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _count(name: str, x: Any) -> None:
    if not _is_int(x) or x < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {x!r}")


def _number(
    name: str, x: Any, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False
) -> None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    ok = ok and (x > low if low_open else x >= low) and x <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name}={x!r} must be a finite number in {bounds}")


class Status(enum.Enum):
    WAITING = "waiting"  # in the scheduler's queue, no KV slot yet
    RUNNING = "running"  # holds a KV slot; one token per engine step
    FINISHED = "finished"  # slot freed


_ids = itertools.count()


class Sequence:
    """One completion: the prompt, the tokens made so far, and the state its next token needs.

    ``slot`` is the row of the engine's KV memory it occupies while running (scheduler.py);
    ``length`` how many of its positions are in the cache. The RNG is the sequence's own, so
    its draws never depend on what else runs.
    """

    def __init__(self, request: Request, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        self.id = next(_ids)
        self.request = request
        self.index = index  # the choice's index in the response
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.slot = -1
        self.length = 0  # positions in the KV cache
        self.finish_reason: str | None = None
        self.cumulative_logprob = 0.0  # sum of the chosen tokens' log-probs (best_of ranks by it)
        # Made by the engine when the sequence is admitted (they live on the model's device).
        self.generator: torch.Generator | None = None
        self.ids: torch.Tensor | None = None  # [1, prompt + max_tokens]: the ids the processors read
        self.processors: Any = None  # sampling.Processors before OpenAI's additive penalties
        self.warpers: Any = None  # sampling.Processors after them (None: greedy)
        self.counts: torch.Tensor | None = None  # [V] output-token counts for presence / frequency
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids [k], values [k])
        self.detokenizer: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.id}, index={self.index}, prompt={len(self.prompt_ids)}, "
            f"output={len(self.output_ids)}, status={self.status.value}, slot={self.slot})"
        )


# ----------------------------------------------------------------------------- outputs
@dataclass
class PromptOutput:
    """The echoed prompt of choice ``index``: its text, and per-token log-probs if asked for.

    ``token_logprobs[0]`` and ``top_logprobs[0]`` are None: the first token has no context.
    """

    index: int
    text: str
    tokens: list[str]
    text_offset: list[int]
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


@dataclass
class TokenOutput:
    """One new token of choice ``index``, and the text it released.

    ``text`` can be "" (an incomplete UTF-8 character, a possible start of a stop string held
    back, an EOS); it holds the rest of the text when ``finish_reason`` is set. ``token`` is the
    token as OpenAI spells it (see detokenizer.py); log-probs are None unless asked for.
    ``stop_reason``: the stop string that cut the text, on the last output (vLLM's field).
    """

    index: int
    token_id: int
    token: str
    text: str
    text_offset: int
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass
class ErrorOutput:
    """The engine failed this request (an exception in a step it was part of)."""

    message: str


Output = PromptOutput | TokenOutput | ErrorOutput


@dataclass(eq=False)
class Request:
    """One call to the engine: ``prompts`` x ``best_of`` sequences with the same settings.

    ``emit`` receives, on the engine thread, the list of outputs each step produced for this
    request; it must not block (the app hands them to its event loop). Choice i * best_of + j
    is prompt i's j-th sequence; the sequence with seed s uses seed s + j.
    """

    prompts: Seq[list[int]]
    params: SamplingParams
    emit: Callable[[list[Output]], None]
    best_of: int = 1
    arrival: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    aborted: bool = False  # set by Engine.abort (any thread); acted on at the next step
    finished: bool = False  # every sequence ended, or the request failed (engine thread)
    done: bool = False  # finished, and every output handed to ``emit``

    def __post_init__(self) -> None:
        if not _is_int(self.best_of) or self.best_of < 1:
            raise ValueError(f"best_of must be an integer >= 1, got {self.best_of!r}")
        if not self.prompts:
            raise ValueError("a request needs at least one prompt")
        for i, prompt in enumerate(self.prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; give at least one token")
        self.sequences = [
            Sequence(self, i * self.best_of + j, list(prompt), self.params)
            for i, prompt in enumerate(self.prompts)
            for j in range(self.best_of)
        ]
