"""Weights that decoding streams, on 2 MiB pages (Linux transparent huge pages).

A batch-1 decode step reads every weight matrix from memory once (kernels.py), so its speed is
the speed at which one core's stream of loads is fed. On 4 KiB pages that stream is cut every
4 KiB: the hardware prefetchers stop at each page boundary (they work on physical addresses)
and each page is one more TLB entry to walk. On 2 MiB pages neither happens. Measured on the
AMD EPYC (Zen 5) host here, one process, the same 497 MB of fp32 GPT-2 matrices interleaved in
rounds, 2 threads: the native kernel's pass over all 49 matrices 51-56 GB/s on 4 KiB pages,
68-73 on 2 MiB pages; a plain sum over the same bytes 56-59 against 68-71.

Linux gives an anonymous mapping huge pages on its own only where
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always``; most distributions ship
``madvise``, which gives them to memory advised ``MADV_HUGEPAGE`` only (torch's allocator does
not advise, unless ``THP_MEM_ALLOC_ENABLE=1``). So:

- :class:`Arena` makes the copies the fast path keeps (the native kernel's [out, in] copies of
  the Conv1D weights, the ``transposed`` / ``numpy`` / ``upcast`` copies) in chunks of fresh
  anonymous memory (``mmap``, not torch's allocator, so nothing has written it yet, even with
  torch's deterministic mode filling new tensors) advised ``MADV_HUGEPAGE`` before the first
  byte is written, huge-page-aligned, the copies packed one after another (64-byte aligned), so
  every whole huge page of them is one and at most the last, partly used, page of a chunk is
  spare;
- :func:`collapse` asks the kernel to move memory already written (the tied unembedding, which
  the kernels read in place) onto huge pages: ``MADV_COLLAPSE`` (Linux 6.1 or newer) on the
  2 MiB-aligned part of it. The contents and addresses do not change. Only for storages of
  COLLAPSE_MIN_BYTES or more, which glibc's malloc maps on their own (a smaller one may sit in
  the heap, where the advice would outlive it). The kernel compacts and copies synchronously
  (about 0.4 s for 150 MB the first time here). After a ``fork``, a collapsed page is private
  to the process that collapsed it (a copy-on-write page shared with the parent no longer is).

Either is advice: where the kernel has no free huge page, refuses, or is not Linux, the memory
stays on 4 KiB pages and everything works as before. ``MINIGPT2_HUGE_PAGES=0`` (or false / no /
off) switches both off.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import warnings
from collections.abc import Sequence

import torch

ENV_HUGE_PAGES = "MINIGPT2_HUGE_PAGES"
#: Bytes a chunk of an Arena reserves at most (address space: pages exist once written),
#: unless one copy is larger; chunks start at FIRST_CHUNK and double.
CHUNK = 256 << 20
FIRST_CHUNK = 8 << 20
#: Tensors smaller than this are copied as torch would (a small model's matrices sit in the caches).
MIN_BYTES = 256 << 10
#: Huge pages larger than this (arm64 kernels with 16 or 64 KiB pages have 32 or 512 MiB ones)
#: are not used: one partly used page would cost more memory than the copies it holds.
MAX_HUGE = 4 << 20
#: Storages collapse() moves: glibc's malloc maps a request this large on its own (its mmap
#: threshold is at most 32 MiB), so the advice dies with the storage.
COLLAPSE_MIN_BYTES = 32 << 20
ALIGN = 64  # bytes: each copy starts on a cache line
MADV_HUGEPAGE = 14  # <linux/mman.h>
MADV_COLLAPSE = 25


@functools.cache
def huge_page_bytes() -> int:
    """The size of a transparent huge page here (2 MiB on x86-64; 32 or 512 MiB on arm64 with
    16 or 64 KiB pages), from /sys/kernel/mm/transparent_hugepage/hpage_pmd_size; 2 MiB where
    the file is missing."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    """libc's madvise on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _thp_mode() -> str | None:
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled (always, madvise,
    never), or None where the file is missing."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


OFF = ("0", "false", "no", "off")
ON = ("", "1", "true", "yes", "on")


def enabled() -> bool:
    """Whether weights are placed on huge pages here: Linux with transparent huge pages not
    ``never``, and ``MINIGPT2_HUGE_PAGES`` unset or not 0 / false / no / off (a value that is
    neither on nor off warns once and counts as on)."""
    value = os.environ.get(ENV_HUGE_PAGES, "1").strip().lower()
    if value in OFF:
        return False
    if value not in ON:
        _warn_value(value)
    return (
        _madvise() is not None
        and _thp_mode() in ("always", "madvise")
        and huge_page_bytes() <= MAX_HUGE
    )


@functools.cache
def _warn_value(value: str) -> None:
    warnings.warn(
        f"{ENV_HUGE_PAGES}={value!r} is neither on (1, true, yes, on) nor off (0, false, no, off): counted as on",
        stacklevel=2,
    )


def _advise(start: int, nbytes: int, advice: int) -> bool:
    fn = _madvise()
    return fn is not None and nbytes > 0 and fn(start, nbytes, advice) == 0


def _aligned_span(t: torch.Tensor) -> tuple[int, int]:
    """The huge-page-aligned part of the memory of ``t``'s storage: (start address, bytes),
    bytes 0 when it holds no whole huge page."""
    huge = huge_page_bytes()
    s = t.untyped_storage()
    begin, end = s.data_ptr(), s.data_ptr() + s.nbytes()
    start = -(-begin // huge) * huge
    stop = end // huge * huge
    return start, max(0, stop - start)


def collapse(tensors: Sequence[torch.Tensor]) -> int:
    """Move the memory of each dense CPU tensor's storage onto huge pages in place, where the
    kernel can (``MADV_HUGEPAGE``, then ``MADV_COLLAPSE``; Linux 6.1+), and return the bytes
    it moved. Values, addresses, storages and version counters are unchanged. Skipped: other
    devices and layouts, storages under COLLAPSE_MIN_BYTES, a storage already advised in this
    call. Refused advice (an older kernel, no free huge pages, shared memory) leaves the pages
    as they were and adds nothing to the count."""
    if not enabled():
        return 0
    done, seen = 0, set()
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
            continue
        if t.untyped_storage().nbytes() < COLLAPSE_MIN_BYTES:
            continue
        start, nbytes = _aligned_span(t)
        if nbytes == 0 or start in seen:
            continue
        seen.add(start)
        # (the advice alone: khugepaged makes them huge later if the collapse fails)
        _advise(start, nbytes, MADV_HUGEPAGE)
        if _advise(start, nbytes, MADV_COLLAPSE):
            done += nbytes
    return done


class Arena:
    """Contiguous copies of tensors packed into memory advised ``MADV_HUGEPAGE`` before it is
    written (see the module docstring).

    Each copy is a view of a chunk; the first chunk reserves FIRST_CHUNK bytes of address
    space, each next one as much as all before it (up to CHUNK), or the copy's size if larger,
    each plus one huge page of slack for the alignment: address space only (for GPT-2's
    shapes 1.1-1.6x what it holds; at worst about 3x); the pages written are what the copies
    hold, plus at most the last, partly used, huge page of each chunk. A chunk is freed when
    the last copy in it is: give one arena to copies that live and die together (one model's prepared
    weights, one measurement's candidates), since a short-lived copy next to long-lived ones
    would keep its pages. Where huge pages are off (:func:`enabled`) or a tensor is under
    MIN_BYTES, :meth:`copy` copies into torch's own memory.
    """

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None  # uint8, huge-page-aligned
        self._used = 0
        self.reserved = 0  # bytes of address space of every chunk so far
        self.huge_bytes = 0  # bytes of copies placed in advised chunks

    def copy(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A contiguous copy of CPU tensor ``t`` (converted to ``dtype`` if given), same shape,
        on huge pages where possible. Tensors on another device are copied as torch would."""
        dtype = dtype or t.dtype
        nbytes = t.numel() * dtype.itemsize
        if t.device.type != "cpu" or nbytes < MIN_BYTES or not enabled():
            return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            huge = huge_page_bytes()
            size = max(nbytes, min(CHUNK, max(FIRST_CHUNK, self.reserved)))
            try:
                chunk = _chunk(-(-size // huge) * huge)
            except OSError:
                # no address space left (ulimit -v, strict overcommit): torch's own memory
                return torch.empty(t.shape, dtype=dtype).copy_(t)
            self._chunk, self._used = chunk, 0
            self.reserved += self._chunk.numel()
        out = self._chunk[self._used : self._used + nbytes].view(dtype).view(t.shape)
        self._used += -(-nbytes // ALIGN) * ALIGN
        self.huge_bytes += nbytes
        out.copy_(t)
        return out


def _chunk(nbytes: int) -> torch.Tensor:
    """``nbytes`` (a whole number of huge pages) of fresh, never written uint8 memory, starting
    on a huge-page boundary and advised MADV_HUGEPAGE. An anonymous ``mmap`` of its own rather
    than torch's allocator: nothing writes it before the advice (torch fills new tensors in
    deterministic mode), and unmapping it returns every page. The returned tensor keeps the
    mapping alive (freed with the last view of it)."""
    huge = huge_page_bytes()
    region = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = torch.frombuffer(region, dtype=torch.uint8)
    offset = -buf.data_ptr() % huge
    out = buf[offset : offset + nbytes]
    _advise(out.data_ptr(), nbytes, MADV_HUGEPAGE)
    return out
