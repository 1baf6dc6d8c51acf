"""Iteration-level scheduling (Orca, OSDI '22; vLLM): which sequences run at each engine step.

Two collections, as nano-vllm's scheduler: ``waiting``, a bounded FIFO of sequences without
KV memory, and ``running``, the sequences that hold a slot. Each step first admits waiting
sequences into free slots (their prompts are prefilled), then every running sequence makes one
token; a finished one gives its slot back at once, so a waiting one can take it next step.

KV memory is ``max_batch_size`` slots of n_positions positions each (model_runner.py), not
paged blocks: a GPT-2 context is at most 1024 positions, so a slot per sequence wastes
little, and a slot is one contiguous [positions, head_dim] row per head that attention reads
in place (paged blocks would need a gather or a paged attention kernel on every step). The
running sequences always occupy slots 0..n-1: when one finishes, the last one moves into its
slot, so a step runs on the first n rows of memory and never on holes.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence, Status


class QueueFull(Exception):
    """The waiting queue cannot take these sequences now (the HTTP layer answers 429)."""


class Scheduler:
    """Slots and queue. Not thread-safe: the engine calls it under its lock."""

    def __init__(self, max_batch_size: int, max_queue: int, max_prefill_tokens: int) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_prefill_tokens < 1:
            raise ValueError(
                f"max_batch_size={max_batch_size}, max_queue={max_queue} and "
                f"max_prefill_tokens={max_prefill_tokens} must all be >= 1"
            )
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].slot == i

    def add(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none (QueueFull)."""
        if len(self.waiting) + len(seqs) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} sequences are waiting; the queue holds {self.max_queue}")
        self.waiting.extend(seqs)

    def schedule(self) -> list[Sequence]:
        """Admit waiting sequences, oldest first, into free slots; return them (to prefill).

        A step prefills at most ``max_prefill_tokens`` prompt tokens (and always at least one
        sequence), so that a burst of long prompts delays the running sequences' next token
        by a bounded amount. Siblings (the n choices of one prompt) share one prefill.
        """
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            shared = bool(admitted) and _siblings(admitted[-1], seq)
            cost = 0 if shared else len(seq.prompt_ids)
            if admitted and cost > budget:
                break
            budget -= cost
            self.waiting.popleft()
            seq.status, seq.slot = Status.RUNNING, len(self.running)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def free(self, seq: Sequence) -> tuple[int, int] | None:
        """Finish ``seq`` and give its slot back; returns the (src, dst) slot move that keeps
        the running sequences in slots 0..n-1, or None when nothing has to move."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
            return None
        if seq.status is Status.FINISHED:
            return None
        hole, last = seq.slot, self.running.pop()
        seq.status, seq.slot = Status.FINISHED, -1
        if last is seq:
            return None
        src = last.slot
        self.running[hole] = last
        last.slot = hole
        return src, hole

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)


def _siblings(a: Sequence, b: Sequence) -> bool:
    """Two choices of the same prompt of the same request."""
    return a.request is b.request and a.prompt_ids == b.prompt_ids
