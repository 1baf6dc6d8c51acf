"""Matrix-vector kernels for decoding, and the per-host choice between them.

Decoding one token at batch 1 multiplies a vector by every weight matrix once, so it is
limited by how fast the weights stream from memory (bandwidth / weight bytes tokens per
second), not by arithmetic. Which PyTorch call streams them fastest depends on the CPU
and the torch build; measured on the hosts here (see docs/performance.md):

- ``plain``: the weight as stored, through the BLAS library: ``torch.addmm(b, x, W)`` on
  Conv1D's [in, out] weight, ``F.linear(x, E)`` on the [V, C] unembedding. No extra memory.
  This is exactly the model's own path (and transformers').
- ``transposed``: a copy in the other layout (Conv1D weight as [out, in] for ``F.linear``,
  the unembedding as [C, V] for ``mm``): BLAS libraries pick different gemv code for the two
  layouts, and either can be the faster one. Costs one copy of the weights.
- ``mkldnn``: the weight reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied with
  ``torch.ops.mkldnn._linear_pointwise``. On CPUs with AMX / AVX512-bf16 it is by far the
  fastest bf16 path, and at batch > 1 also in fp32. Private torch ops, so they sit behind
  :func:`available`, which runs them once on a small matrix and checks the result.

:func:`choose` picks one per (CPU, torch version, dtype, matrix shapes, batch size) by a
short measurement on the model's own matrices the first time, cached in
``$MINIGPT2_CACHE_DIR/kernels.json`` (default ``~/.cache/minigpt2``). The environment
variable ``MINIGPT2_KERNEL`` (``plain``, ``transposed``, ``mkldnn``) or :func:`force`
overrides the choice, so tests can run every candidate on whatever host they land on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

#: The candidates, in order of preference when measurements tie (plain costs no memory).
KERNELS = ("plain", "transposed", "mkldnn")

#: Measurements within this fraction of the fastest count as a tie (the run-to-run noise of
#: one choice on the hosts here is ~1-2 %).
TIE = 0.03

ENV_KERNEL = "MINIGPT2_KERNEL"
ENV_CACHE_DIR = "MINIGPT2_CACHE_DIR"

_forced: str | None = None  # set by force(); wins over the environment variable
_available: dict[tuple[str, torch.dtype, str], bool] = {}
_decisions: dict[str, str] = {}  # decision_key -> kernel, this process's copy of the cache file


# ------------------------------------------------------------------------ the kernels
class PreparedLinear:
    """y = x @ W^T + b for one weight matrix, in the form one kernel wants.

    ``weight_out_in`` is the matrix as [out, in] (for Conv1D a transposed view of its
    [in, out] parameter, for the unembedding the embedding itself): only ``prepare`` copies.
    Whether the source weights changed since is fast.py's business (it keys the whole set).
    """

    def __init__(self, kernel: str, weight_out_in: torch.Tensor, bias: torch.Tensor | None, batch_size: int) -> None:
        self.out_features = weight_out_in.shape[0]
        w = weight_out_in.detach()
        self.extra_bytes = 0 if kernel == "plain" else w.numel() * w.element_size()
        if kernel == "plain":
            self.weight = w.t()  # (in, out): Conv1D's own parameter, or a view of the embedding
        elif kernel == "transposed":
            # (in, out) again, but in the memory layout the parameter is NOT stored in.
            wt = w.t()
            self.weight = wt.contiguous() if not wt.is_contiguous() else w.contiguous().t()
        elif kernel == "mkldnn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_size)  # opaque
        else:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")

        # mm(x2) for x2 (N, in): one call, no branching per use (decoding calls it 49 times a token).
        if kernel == "mkldnn":
            self.mm = functools.partial(_mkldnn_linear, weight=self.weight, bias=bias)
        elif bias is None:
            self.mm = functools.partial(torch.mm, mat2=self.weight)
        else:
            self.mm = functools.partial(torch.addmm, bias, mat2=self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        y = self.mm(x.reshape(-1, x.shape[-1]))  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)


def _mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def source_key(*tensors: torch.Tensor | None) -> tuple:
    """What identifies a weight's current contents cheaply: version counter, address, dtype, device."""
    # (Inference tensors have no version counter; they cannot be edited outside inference mode.)
    return tuple(
        None if t is None else (-1 if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device, t.shape)
        for t in tensors
    )


def available(kernel: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether ``kernel`` runs, and gives the right answer, for this dtype on this device.

    ``plain`` always does. ``transposed`` needs nothing special. ``mkldnn`` needs a CPU torch
    build with oneDNN and the private ops, fp32 or bf16 (bf16 only where oneDNN supports it);
    it is tried once on a small matrix and compared with ``plain`` (so a torch version that
    changed the ops' signature falls back instead of failing).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    device = torch.device(device)
    key = (kernel, dtype, device.type)
    if key not in _available:
        _available[key] = _check(kernel, dtype, device)
    return _available[key]


def _check(kernel: str, dtype: torch.dtype, device: torch.device) -> bool:
    if kernel == "plain":
        return True
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False  # on GPUs the plain path is what cuBLAS does best; fp16 on CPU is slow anyway
    if kernel == "mkldnn" and not _mkldnn_ops_present(dtype):
        return False
    try:
        with torch.inference_mode(False), torch.no_grad():
            g = torch.Generator().manual_seed(0)
            w = torch.randn(24, 40, generator=g).to(dtype)  # (out, in)
            b = torch.randn(24, generator=g).to(dtype)
            x = torch.randn(3, 40, generator=g).to(dtype)
            want = torch.addmm(b.float(), x.float(), w.float().t())
            got = PreparedLinear(kernel, w, b, 1)(x).float()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return got.shape == want.shape and bool(((got - want).abs().max() <= tol * want.abs().max()).item())
    except Exception:  # noqa: BLE001 - any failure of a private op means: do not use it
        return False


def _mkldnn_ops_present(dtype: torch.dtype) -> bool:
    """The feature check for the private oneDNN ops (other torch builds, non-x86 hosts)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        ops = torch.ops.mkldnn
        if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
            return False
        if dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
            return False
        return True
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------ forcing a kernel
def forced() -> str | None:
    """The kernel forced by :func:`force` or ``MINIGPT2_KERNEL``, or None (measure and choose)."""
    name = _forced if _forced is not None else os.environ.get(ENV_KERNEL, "").strip().lower() or None
    if name is not None and name not in KERNELS and name != "auto":
        raise ValueError(f"{ENV_KERNEL}={name!r} is not a kernel; choose one of auto, {', '.join(KERNELS)}")
    return None if name == "auto" else name


@contextlib.contextmanager
def force(kernel: str | None) -> Iterator[None]:
    """Use ``kernel`` for every matrix inside the ``with`` block (None: measure and choose)."""
    global _forced
    if kernel is not None and kernel not in KERNELS and kernel != "auto":
        raise ValueError(f"unknown kernel {kernel!r}; choose one of auto, {', '.join(KERNELS)}")
    previous, _forced = _forced, kernel
    try:
        yield
    finally:
        _forced = previous


# ------------------------------------------------------------------- choosing one
def batch_bucket(batch_size: int) -> int:
    """Batch sizes that share a measurement: 1, 2, 4, 8, ... (rounded up), at most 64."""
    b = 1
    while b < min(batch_size, 64):
        b *= 2
    return b


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """The CPU model (with family / model / stepping, since VMs often report a generic name)
    and the core count: kernel speed differs between hosts, not between runs on one."""
    name, ident = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fields: dict[str, str] = {}
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
        name = fields.get("model name", name)
        ident = [fields.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")]
    except OSError:
        pass
    return f"{name} [{' '.join(ident)}] x{os.cpu_count()}"


def cache_file() -> Path:
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "minigpt2")
    return Path(root) / "kernels.json"


def _read_cache() -> dict[str, dict]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    """Add one decision to the cache file (atomic rename; a read-only home just skips it)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=".kernels.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def decision_key(role: str, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, batch_size: int) -> str:
    unique = list(dict.fromkeys(shapes))
    shape_s = ",".join("x".join(map(str, s)) for s in unique) + f" ({len(shapes)} matrices)"
    dt = str(dtype).removeprefix("torch.")
    return f"{host_id()} | torch {torch.__version__} | {role} {shape_s} | {dt} | batch {batch_bucket(batch_size)}"


def choose(
    role: str,
    matrices: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    batch_size: int,
    *,
    rounds: int = 5,
) -> str:
    """The kernel for these [out, in] matrices (+ biases) at this batch size.

    Forced (``force`` / ``MINIGPT2_KERNEL``) if so, and available; else the cached
    decision for this host, torch version, shapes, dtype and batch bucket; else measured
    now: every available candidate runs one pass over ``matrices`` per round, candidates
    interleaved so that machine drift hits all of them, best of ``rounds`` rounds (other
    processes only ever add time, so the minimum is the kernel's own speed). Pass matrices
    that together exceed the last-level cache, or the measurement sees cache speed, not
    the memory streaming that decoding is limited by.
    """
    w0 = matrices[0][0]
    dtype, device = w0.dtype, w0.device
    name = forced()
    if name is not None:
        if available(name, dtype, device):
            return name
        warnings.warn(f"kernel {name!r} is not available for {dtype} on {device.type}; using 'plain'", stacklevel=2)
        return "plain"
    candidates = [k for k in KERNELS if available(k, dtype, device)]
    if len(candidates) == 1:
        return candidates[0]
    key = decision_key(role, [tuple(w.shape) for w, _ in matrices], dtype, batch_size)
    if key in _decisions:
        return _decisions[key]
    cached = _read_cache().get(key)
    if cached and cached.get("kernel") in candidates:
        best = cached["kernel"]
    else:
        times = measure(matrices, candidates, batch_size, rounds=rounds)
        fastest = min(times.values())
        # Candidates come cheapest first (plain holds no copy): take the first within TIE of
        # the fastest, so that a copy of the weights is only kept for a measurable gain.
        best = next(k for k in candidates if times[k] <= fastest * (1 + TIE))
        _write_cache(key, {"kernel": best, "seconds_per_pass": times, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
    _decisions[key] = best
    return best


def decisions() -> dict[str, str]:
    """The kernel chosen so far in this process, per decision key (host | torch | role | dtype | batch)."""
    return dict(_decisions)


def measure(
    matrices: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    candidates: Sequence[str],
    batch_size: int,
    *,
    rounds: int = 5,
) -> dict[str, float]:
    """Best seconds per pass of x @ W^T + b over every matrix, per candidate kernel."""
    w0 = matrices[0][0]
    with torch.no_grad():
        prepared = {k: [PreparedLinear(k, w, b, batch_size) for w, b in matrices] for k in candidates}
        g = torch.Generator(device=w0.device).manual_seed(0)  # the global RNG is the user's (seeded sampling)
        xs = [torch.randn(batch_size, w.shape[1], generator=g, device=w.device).to(w.dtype) for w, _ in matrices]
        runs: dict[str, list[float]] = {k: [] for k in candidates}
        for r in range(rounds + 1):
            for k in candidates:
                t = time.perf_counter()
                for p, x in zip(prepared[k], xs):
                    p(x)
                if r > 0:  # round 0 warms caches and oneDNN's kernel selection
                    runs[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in runs.items()}
