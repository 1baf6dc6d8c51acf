"""``LocalEngine``: one thread owns the model; requests hand it work and await the result.

The explorer's routes need only this contract (the server's engine provides the same):

    engine.call(fn) -> concurrent.futures.Future   # fn(model, tokenizer) on the engine thread
    await engine.run(fn)                           # the same, awaited from the event loop
    engine.model, engine.tokenizer                 # for metadata (config, eos id) only

A single worker thread means model calls never overlap (PyTorch already uses every core for
one forward) and run in the order they were asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..model import GPT2
    from ..tokenizer import Tokenizer

T = TypeVar("T")


class LocalEngine:
    """A one-thread executor holding the model and tokenizer (the stand-in for the server's engine)."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or model.name_or_path or "gpt2"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minigpt2-engine")

    def call(self, fn: Callable[[Any, Any], T]) -> Future[T]:
        """Run ``fn(model, tokenizer)`` on the engine thread; its result (or exception) in a Future."""
        return self._pool.submit(fn, self.model, self.tokenizer)

    async def run(self, fn: Callable[[Any, Any], T]) -> T:
        """``call`` awaited from asyncio: the event loop stays free while the model works."""
        return await asyncio.wrap_future(self.call(fn))

    def close(self) -> None:
        """Stop taking work; what is queued and not started is dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
