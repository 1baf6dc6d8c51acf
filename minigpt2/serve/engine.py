"""The engine: one thread owns the model and runs continuous batching (Orca, OSDI '22).

Each iteration of the engine thread:

    1. runs the functions handed to ``call`` (the only way other code touches the model);
    2. drops the requests whose client went away (their slots are free for this step);
    3. admits waiting sequences into free KV slots and prefills their prompts, one prompt at
       a time (scheduler.py, model_runner.py), each making its first token;
    4. runs one decode step for every running sequence together, and gives every sequence
       its next token with its own processors, penalties and RNG (processors.py);
    5. hands each request the outputs of this step (new text, log-probs, finish reasons),
       and frees the slots of the sequences that finished.

Nothing here knows HTTP: a request comes with an ``emit`` callback that receives its outputs
(app.py hands them to its event loop). Bad input raises ``RequestError`` (a ValueError) at
``submit``; a full queue raises ``QueueFull``; an exception inside a step fails only the
requests that were part of it (they get an ``ErrorOutput``), and the engine goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence as Seq
from typing import TYPE_CHECKING, Any

import torch

from . import processors
from .detokenizer import Detokenizer, TokenStrings
from .model_runner import ModelRunner
from .scheduler import QueueFull, Scheduler
from .sequence import (
    ABORT, LENGTH, STOP, ErrorOutput, Output, PromptOutput, Request, SamplingParams, Sequence, TokenOutput,
)  # fmt: skip

if TYPE_CHECKING:
    from ..model import GPT2
    from ..tokenizer import Tokenizer

logger = logging.getLogger("minigpt2.serve")

__all__ = ["Engine", "EngineClosed", "QueueFull", "RequestError"]


class RequestError(ValueError):
    """A request the engine cannot run; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineClosed(RuntimeError):
    """The engine has stopped (or is stopping) and takes no more work."""


class Engine:
    """Continuous batching over one model, on one thread.

    model, tokenizer: what every request runs on (fixed for the engine's life).
    max_batch_size: KV slots, i.e. sequences decoded together.
    max_queue: sequences that may wait for a slot; ``submit`` raises QueueFull beyond it.
    max_prefill_tokens: prompt tokens prefilled per step (default: n_positions).
    batch_invariant: decode each sequence alone, so that every output is bit-identical to
        ``model.generate`` of its prompt alone whatever else runs (model_runner.py); by
        default the running sequences share one batched step (fast; see the README for
        how far that moves the logits).
    name: the name the model is served under (the explorer page shows it).

    Use ``start()`` / ``shutdown()`` or ``with Engine(...) as engine:``.
    """

    def __init__(
        self,
        model: GPT2,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_prefill_tokens: int | None = None,
        batch_invariant: bool = False,
        name: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.tokenizer = tokenizer
        self.config = model.config
        self.runner = ModelRunner(model, max_batch_size, batch_invariant)
        self.scheduler = Scheduler(max_batch_size, max_queue, max_prefill_tokens or self.config.n_positions)
        self.strings = TokenStrings(tokenizer)
        eos = (model.generation_config or {}).get("eos_token_id", self.config.eos_token_id)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids: tuple[int, ...] = tuple(eos)  # as model.generate's default
        self._eos = torch.tensor(self.eos_ids, device=model.device) if self.eos_ids else None
        self._lock = threading.Condition()
        self._requests: list[Request] = []  # admitted and not done
        self._calls: list[tuple[Callable[[Any, Any], Any], concurrent.futures.Future]] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # engine iterations that ran a forward

    # ------------------------------------------------------------------ lifecycle
    def start(self, warmup: bool = True) -> Engine:
        """Start the engine thread (after a warm-up forward at batch 1 and the largest batch)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        if warmup:
            self.runner.warmup()
        self._thread = threading.Thread(target=self._loop, name="minigpt2-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop admitting; end every waiting and running sequence with finish_reason "abort"
        (its request gets a final output), then stop the thread. Safe to call twice."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def __enter__(self) -> Engine:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def num_waiting(self) -> int:
        """Sequences in the queue (the queue depth)."""
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        """Sequences holding a KV slot (the running batch size)."""
        return self.scheduler.num_running

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams,
        emit: Callable[[list[Output]], None],
        *,
        best_of: int = 1,
    ) -> Request:
        """Queue ``best_of`` completions of each prompt (token ids); returns the Request.

        ``emit(outputs)`` is called on the engine thread with each step's outputs for this
        request (PromptOutput first with ``echo``, then TokenOutputs; the last output of each
        sequence has a finish_reason), or once with an ErrorOutput. Raises RequestError (bad
        ids, prompt + max_tokens over n_positions), QueueFull, or EngineClosed.
        """
        V, n_pos = self.config.vocab_size, self.config.n_positions
        for i, prompt in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not prompt:
                raise RequestError(f"{name} is empty; give at least one token", "prompt")
            bad = [t for t in prompt if not 0 <= t < V]
            if bad:
                raise RequestError(f"{name} holds token id {bad[0]}, outside the vocabulary [0, {V})", "prompt")
            if len(prompt) > n_pos:
                raise RequestError(f"{name} of {len(prompt)} tokens exceeds the model's context of n_positions={n_pos} "
                                   "tokens", "prompt")  # fmt: skip
            if len(prompt) + params.max_tokens > n_pos:
                raise RequestError(
                    f"{name} of {len(prompt)} tokens + max_tokens={params.max_tokens} exceeds the model's "
                    f"context of n_positions={n_pos} tokens",
                    "max_tokens",
                )
        for token, _ in params.logit_bias:
            if token >= V:
                raise RequestError(f"logit_bias names token id {token}, outside the vocabulary [0, {V})", "logit_bias")
        try:
            request = Request([list(p) for p in prompts], params, emit, best_of=best_of)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if len(request.sequences) > self.scheduler.max_queue:
            if best_of == 1:
                message, param = f"{len(prompts)} prompts exceed the queue of {self.scheduler.max_queue}", "prompt"
            else:
                message, param = (f"{len(prompts)} prompt(s) x best_of={best_of} = {len(request.sequences)} sequences "
                                  f"exceed the queue of {self.scheduler.max_queue}", "best_of")  # fmt: skip
            raise RequestError(message, param)
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            self.scheduler.add(request.sequences)  # QueueFull: nothing was queued
            self._requests.append(request)
            self._lock.notify_all()
        return request

    def abort(self, request: Request) -> None:
        """Drop a request (its client went away); its slots are freed at the next step."""
        request.aborted = True
        with self._lock:
            self._lock.notify_all()

    def call(self, fn: Callable[[GPT2, Tokenizer], Any]) -> concurrent.futures.Future:
        """Run ``fn(model, tokenizer)`` on the engine thread between two steps; its result (or
        exception) comes back through the Future. The way other code (the explorer page)
        reads the model while the server runs: nothing else touches it meanwhile."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                future.set_exception(EngineClosed("the engine is shut down"))
                return future
            self._calls.append((fn, future))
            self._lock.notify_all()
        return future

    async def run(self, fn: Callable[[GPT2, Tokenizer], Any]) -> Any:
        """``await engine.run(fn)``: ``call`` for asyncio code."""
        return await asyncio.wrap_future(self.call(fn))

    # ------------------------------------------------------------------ the thread
    def _has_work(self) -> bool:
        return bool(self._calls or self.scheduler.waiting or self.scheduler.running) or any(
            r.aborted for r in self._requests
        )

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._has_work()):
                    self._lock.wait()
                if self._closing:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a bug outside the guarded parts: fail what is in flight
                logger.exception("engine step failed")
                with self._lock:
                    requests, self._requests = self._requests, []
                for request in requests:
                    if not request.done:
                        self._release(request)
                        self._emit(request, [ErrorOutput(f"the engine failed: {type(e).__name__}: {e}")])
                        request.done = True
        self._close()

    def step(self) -> None:
        """One iteration (see the module docstring). Runs on the engine thread."""
        self._run_calls()
        out: dict[Request, list[Output]] = defaultdict(list)
        failed: dict[Request, BaseException] = {}
        for request in [r for r in self._requests if r.aborted]:
            self._release(request)
        with self._lock:
            admitted = self.scheduler.schedule()
        if admitted or self.scheduler.running:
            self.steps += 1
        with torch.inference_mode():
            for group in _prompt_groups(admitted):
                if group[0].request.finished:  # failed in an earlier group of this step
                    continue
                request = group[0].request
                try:
                    self._prefill(group, out)
                except Exception as e:  # noqa: BLE001 - fails this request only
                    failed[request] = e
                    self._release(request)
                else:  # its first token goes out now, not after the other prefills and the decode step
                    self._emit(request, out.pop(request))
            running = list(self.scheduler.running)
            if running:
                self._decode(running, out, failed)
        for request, outputs in out.items():
            if request not in failed:
                self._emit(request, outputs)
        for request, error in failed.items():
            logger.error("request failed in an engine step", exc_info=error)
            self._emit(request, [ErrorOutput(f"the engine failed on this request: {type(error).__name__}: {error}")])
        with self._lock:  # submit() appends to the list from other threads
            for request in self._requests:
                request.done = request.finished  # its outputs are delivered now
            self._requests = [r for r in self._requests if not r.done]

    def _prefill(self, group: list[Sequence], out: dict[Request, list[Output]]) -> None:
        """Prefill one prompt into the first sequence's slot; its siblings copy the slot."""
        first, p = group[0], group[0].params
        T = len(first.prompt_ids)
        score = p.echo and p.logprobs is not None
        logits, hidden = self.runner.prefill(first.slot, first.prompt_ids, all_positions=score)
        for seq in group[1:]:
            self.runner.copy(first.slot, seq.slot, T)
        echo = self._echo(first, hidden) if p.echo else None
        for seq in group:  # before any of them finishes and moves another
            seq.length = T
            self._init(seq, echo.text if echo else "")
        for seq in group:
            if echo is not None:
                out[seq.request].append(PromptOutput(seq.index, echo.text, echo.tokens, echo.text_offset,
                                                     echo.token_logprobs, echo.top_logprobs))  # fmt: skip
            if p.max_tokens == 0:
                out[seq.request].append(self._finish(seq, LENGTH))
            else:
                out[seq.request].append(self._append(seq, processors.pick(seq, logits, self._eos)))

    def _decode(self, running: list[Sequence], out: dict[Request, list[Output]], failed: dict) -> None:
        """One token for every running sequence (slots 0..n-1, in order)."""
        try:
            logits = self.runner.decode([s.last_token for s in running], [s.length for s in running])
        except Exception as e:  # noqa: BLE001 - fails the requests in this batch
            for request in {s.request for s in running}:
                failed.setdefault(request, e)
                self._release(request)
            return
        for seq in running:  # before any of them finishes and moves another
            seq.length += 1
        for b, seq in enumerate(running):
            if seq.request in failed or seq.is_finished:
                continue
            try:
                out[seq.request].append(self._append(seq, processors.pick(seq, logits[b : b + 1], self._eos)))
            except Exception as e:  # noqa: BLE001 - fails this request only
                failed[seq.request] = e
                self._release(seq.request)

    # ------------------------------------------------------------------ per sequence
    def _init(self, seq: Sequence, prompt_text: str) -> None:
        """A sequence's own state, made when it is admitted: RNG, penalty state, detokenizer."""
        p, dev, T = seq.params, self.model.device, len(seq.prompt_ids)
        if not p.greedy:
            seed = secrets.randbits(63) if p.seed is None else p.seed + seq.index % seq.request.best_of
            seq.generator = torch.Generator(device=dev).manual_seed(seed)
        seq.processors, seq.warpers = processors.library_processors(p)
        seq.ids = torch.empty(1, T + p.max_tokens, dtype=torch.long, device=dev)
        seq.ids[0, :T] = torch.tensor(seq.prompt_ids)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            seq.counts = torch.zeros(self.config.vocab_size, device=dev)
        if p.logit_bias:
            seq.bias = (
                torch.tensor([t for t, _ in p.logit_bias], device=dev),
                torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32, device=dev),
            )
        seq.detokenizer = Detokenizer(self.strings, p.stop, self.eos_ids, offset_start=len(prompt_text))

    def _append(self, seq: Sequence, pick: processors.Pick) -> TokenOutput:
        """Add the picked token to ``seq``; finish it on EOS, a stop string or max_tokens."""
        p, token, detok = seq.params, pick.token, seq.detokenizer
        processors.record(seq, token)
        seq.output_ids.append(token)
        if pick.logprob is not None:
            seq.cumulative_logprob += pick.logprob
        offset = detok.add(token, check_stop=len(seq.output_ids) > p.min_tokens)
        reason = None
        if token in self.eos_ids and not p.ignore_eos:
            reason = STOP
        elif detok.stopped:
            reason = STOP
        elif len(seq.output_ids) >= p.max_tokens:
            reason = LENGTH
        top = None
        if p.logprobs is not None:
            top = {self.strings.string(t): lp for t, lp in pick.top or ()}
            top.setdefault(self.strings.string(token), pick.logprob)  # OpenAI: up to logprobs + 1
        output = TokenOutput(
            seq.index, token, self.strings.string(token), detok.release(final=reason is not None), offset,
            pick.logprob, top, reason, detok.stop_reason,
        )  # fmt: skip
        if reason is not None:
            self._free(seq, reason)
        return output

    def _finish(self, seq: Sequence, reason: str) -> TokenOutput:
        """End ``seq`` without a new token (max_tokens=0, abort): the rest of its text."""
        detok = seq.detokenizer
        text = detok.release(final=True) if detok is not None else ""
        offset = detok.chars if detok is not None else 0
        self._free(seq, reason)
        return TokenOutput(seq.index, None, "", text, offset, finish_reason=reason)

    def _free(self, seq: Sequence, reason: str | None) -> None:
        seq.finish_reason = reason
        with self._lock:
            move = self.scheduler.free(seq)
        if move is not None:
            src, dst = move
            self.runner.move(src, dst, self.scheduler.running[dst].length)
        if all(s.is_finished for s in seq.request.sequences):
            seq.request.finished = True

    def _release(self, request: Request) -> None:
        """Free every sequence of a request that is gone or failed."""
        for seq in request.sequences:
            if not seq.is_finished:
                self._free(seq, None)
        request.finished = True

    def _echo(self, seq: Sequence, hidden: torch.Tensor | None) -> PromptOutput:
        text, tokens, offsets = self.strings.prompt(seq.prompt_ids)
        echo = PromptOutput(seq.index, text, tokens, offsets)
        k = seq.params.logprobs
        if hidden is not None and k is not None:
            chosen, top = self.runner.prompt_logprobs(hidden, seq.prompt_ids, k)
            echo.token_logprobs = [None, *chosen]
            echo.top_logprobs = [None]
            for t, lp, alternatives in zip(seq.prompt_ids[1:], chosen, top):
                d = {self.strings.string(a): v for a, v in alternatives}
                d.setdefault(self.strings.string(t), lp)
                echo.top_logprobs.append(d)
        return echo

    def _emit(self, request: Request, outputs: list[Output]) -> None:
        try:
            request.emit(outputs)
        except Exception:  # noqa: BLE001 - a receiver that is gone: drop the request
            logger.exception("could not deliver outputs; dropping the request")
            self._release(request)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.model, self.tokenizer))
            except BaseException as e:  # noqa: BLE001 - the caller gets it
                future.set_exception(e)

    def _close(self) -> None:
        """Shutdown: every unfinished sequence ends with "abort"; pending calls fail."""
        with self._lock:
            calls, self._calls = self._calls, []
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineClosed("the engine shut down"))
        with self._lock:  # closing: submit() admits nothing more
            requests, self._requests = self._requests, []
        for request in requests:
            if not (request.finished or request.aborted):
                outputs = [self._finish(s, ABORT) for s in request.sequences if not s.is_finished]
                self._emit(request, outputs)
            request.finished = request.done = True


def _prompt_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Admitted sequences grouped by shared prompt (a request's choices of one prompt)."""
    groups: list[list[Sequence]] = []
    for seq in seqs:
        if groups and groups[-1][0].request is seq.request and groups[-1][0].prompt_ids == seq.prompt_ids:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups
