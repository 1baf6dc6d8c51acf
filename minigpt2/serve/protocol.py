"""OpenAI's legacy Completions API: the request body (validated by pydantic) and the response
shapes (https://platform.openai.com/docs/api-reference/completions).

The request accepts OpenAI's fields with their defaults and limits, and vLLM's extras
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``); any other
field is refused, as OpenAI refuses it. ``sampling_params`` maps a request onto the engine's
``SamplingParams``; the README's table says how each field maps onto minigpt2's processors.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .sequence import PromptOutput, SamplingParams, TokenOutput

MAX_STOP = 4  # OpenAI: "Up to 4 sequences where the API will stop generating"
INT64 = 2**63


PROMPT_FORMS = "a prompt is a string, a list of strings, a list of token ids (integers), or a list of such lists"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _json_kind(x: Any) -> str:
    """``x`` as a client wrote it, and its JSON type: '5 (a number)', 'true (a boolean)'."""
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "an object"), (type(None), "null")]  # fmt: skip
    kind = next((k for t, k in kinds if isinstance(x, t)), type(x).__name__)
    text = json.dumps(x) if kind != type(x).__name__ else repr(x)
    return kind if x is None else f"{text[:40]}{'...' if len(text) > 40 else ''} ({kind})"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # a last chunk with the usage and no choices


class CompletionRequest(BaseModel):
    """POST /v1/completions. Nullable fields mean their default when null, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    prompt: Any  # str | list[str] | list[int] | list[list[int]]; normalised to a list below
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=20)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)
    user: str | None = None
    suffix: str | None = None  # refused with a clear message when given (see app.py)
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=1e6)
    min_tokens: int | None = Field(0, ge=0)
    ignore_eos: bool | None = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """A string, a list of strings, a list of token ids, or a list of lists of token ids;
        a ValueError names the first element that is none of these."""
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list):
            raise ValueError(f"prompt is {_json_kind(v)}: {PROMPT_FORMS}")
        if not v:
            raise ValueError(f"prompt is an empty list: {PROMPT_FORMS}")
        first = v[0]
        if isinstance(first, str):
            kind, ok = "a list of strings", lambda x: isinstance(x, str)
        elif _is_int(first):
            kind, ok = "a list of token ids", _is_int
        elif isinstance(first, list):
            kind, ok = "a list of lists of token ids", lambda x: isinstance(x, list)
        else:
            raise ValueError(f"prompt[0] is {_json_kind(first)}: {PROMPT_FORMS}")
        for i, x in enumerate(v):
            if not ok(x):
                raise ValueError(f"prompt[{i}] is {_json_kind(x)} in what began as {kind}: {PROMPT_FORMS}")
        if _is_int(first):
            return [v]
        if isinstance(first, list):
            for i, ids in enumerate(v):
                if not ids:
                    raise ValueError(f"prompt[{i}] is an empty list of token ids")
                for j, t in enumerate(ids):
                    if not _is_int(t):
                        raise ValueError(f"prompt[{i}][{j}] is {_json_kind(t)}: a token id is an integer")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> str | list[str] | None:
        """A string or a list of up to MAX_STOP non-empty strings (checked here, not by the
        union type, whose errors would name its branch: ``stop.str``)."""
        if v is None or isinstance(v, str):
            stops = [] if v is None else [v]
        elif isinstance(v, list):
            stops = v
            for i, s in enumerate(v):
                if not isinstance(s, str):
                    raise ValueError(f"stop[{i}] is {_json_kind(s)}: a stop sequence is a string")
        else:
            raise ValueError(f"stop is {_json_kind(v)}: stop must be a string or a list of up to {MAX_STOP} strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence is an empty string")
        return v

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{key}]={bias} is outside [-100, 100]")
        return v


def sampling_params(r: CompletionRequest) -> SamplingParams:
    """The engine's settings for one request (nulls take OpenAI's defaults)."""
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    return SamplingParams(
        max_tokens=16 if r.max_tokens is None else r.max_tokens,
        temperature=1.0 if r.temperature is None else float(r.temperature),
        top_p=1.0 if r.top_p is None else float(r.top_p),
        top_k=0 if r.top_k in (None, -1) else r.top_k,
        min_p=0.0 if r.min_p is None else float(r.min_p),
        repetition_penalty=1.0 if r.repetition_penalty is None else float(r.repetition_penalty),
        presence_penalty=float(r.presence_penalty or 0.0),
        frequency_penalty=float(r.frequency_penalty or 0.0),
        logit_bias=tuple((int(k), float(b)) for k, b in (r.logit_bias or {}).items()),
        min_tokens=r.min_tokens or 0,
        ignore_eos=bool(r.ignore_eos),
        stop=stop,
        logprobs=r.logprobs,
        echo=bool(r.echo),
        seed=r.seed,
    )


# ----------------------------------------------------------------------------- errors
def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(e: ValidationError | Any) -> tuple[str, str | None]:
    """(message, param) of the first problem in a pydantic / FastAPI validation error."""
    errors = e.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return (f"{param} is required", param) if param else ("the body must be a JSON object", None)
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return "the body must be a JSON object", None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {msg}" if param else msg, param


# ----------------------------------------------------------------------------- responses
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Choice:
    """One choice being assembled from the engine's outputs (text, log-probs, finish_reason).

    The log-probs follow the text: a token's entry goes out once the text where it starts
    has (its ``text_offset`` is below the characters released), so a token whose text is
    held back (it may begin a stop string) waits. When a stop string cuts the text, the
    tokens that start at or after the cut are dropped and the one that holds the cut is
    kept: every ``text_offset`` points into the returned text, and the tokens cover it.
    """

    def __init__(self, index: int, logprobs: bool) -> None:
        self.index = index
        self.text: list[str] = []
        self.chars = 0  # characters of the text so far
        self.pending: list[tuple[str, float | None, dict | None, int]] = []  # entries not yet out
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if logprobs else None
        self.finish_reason: str | None = None
        self.num_tokens = 0
        self.sum_logprob = 0.0

    def add(self, o: PromptOutput | TokenOutput) -> dict | None:
        """Take one output; return its log-prob fields (for a stream chunk), or None."""
        self.text.append(o.text)
        self.chars += len(o.text)
        if isinstance(o, PromptOutput):
            if self.logprobs is None:
                return None
            part = {
                "tokens": o.tokens,
                "token_logprobs": o.token_logprobs or [None] * len(o.tokens),
                "top_logprobs": o.top_logprobs or [None] * len(o.tokens),
                "text_offset": o.text_offset,
            }
        else:
            self.finish_reason = o.finish_reason
            if o.token_id is not None:
                self.num_tokens += 1
                self.sum_logprob += o.logprob or 0.0
            if self.logprobs is None:
                return None
            if o.token_id is not None:
                self.pending.append((o.token, o.logprob, o.top_logprobs, o.text_offset))
            ready = 0
            while ready < len(self.pending) and self.pending[ready][3] < self.chars:
                ready += 1
            out = self.pending[:ready]
            if o.finish_reason is not None and o.stop_reason is None:
                out = self.pending  # EOS or length: nothing was cut, every token counts
            self.pending = [] if o.finish_reason is not None else self.pending[ready:]
            if not out:
                return None
            part = {"tokens": [e[0] for e in out], "token_logprobs": [e[1] for e in out],
                    "top_logprobs": [e[2] for e in out], "text_offset": [e[3] for e in out]}  # fmt: skip
        for key, values in part.items():
            self.logprobs[key].extend(values)
        return part

    @property
    def mean_logprob(self) -> float:
        """best_of ranks by log-probability per token (OpenAI's best_of)."""
        return self.sum_logprob / max(1, self.num_tokens)

    def json(self, index: int | None = None) -> dict:
        return {
            "text": "".join(self.text),
            "index": self.index if index is None else index,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(id: str, created: int, model: str, choices: list[dict], usage: dict | None, with_usage: bool = True) -> dict:
    """A ``text_completion`` object: the whole response, or one stream chunk (whose ``usage``
    is null until the last chunk when the client asked for it, and absent otherwise)."""
    body = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None or with_usage:
        body["usage"] = usage
    return body
