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
- ``numpy``: the weight as [out, in] (a copy for Conv1D, the embedding itself for the
  unembedding) multiplied by numpy's BLAS (OpenBLAS in numpy's wheels), sharing memory with
  the torch tensors. On the AMD EPYC hosts here OpenBLAS's GEMV streams at ~90 % of the
  read bandwidth where MKL's reads ~45 % and oneDNN's ~75 %. Its threads are OpenBLAS's
  own, so a step on these kernels runs torch on one thread (fast.py): two thread pools
  spinning on the same cores slow each other down by 10x. Offered only when numpy's BLAS
  runs as many threads as torch (the user's thread setting holds).
- ``mkldnn``: the weight reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied with
  ``torch.ops.mkldnn._linear_pointwise``. On CPUs with AMX / AVX512-bf16 it is by far the
  fastest bf16 path, and at batch > 1 also in fp32. Private torch ops, so they sit behind
  :func:`available`, which runs them once on a small matrix and checks the result.
- ``native``: minigpt2's own kernel (native.py, native/decode.c), compiled for the host on
  first use where a C compiler with OpenMP is found: the weight as [out, in] (a copy for
  Conv1D, the embedding itself for the unembedding), each thread streaming its rows in
  order, half precision widened to fp32 on the fly. It runs on torch's own OpenMP team (no
  second thread pool, unlike ``numpy``), and it gives a bf16 model half of fp32's bytes to
  stream on CPUs without native bf16, where ``mkldnn`` has no bf16 kernel.
- ``upcast`` (bf16 / fp16 weights only): an fp32 copy of the weights, multiplied in fp32
  (oneDNN's prepacked fp32 kernel where available) and rounded back to the weights' dtype.
  On CPUs without native half-precision arithmetic (no AVX512-bf16 / AMX: oneDNN has no
  bf16 kernel and torch's fallback is slow) this keeps a bf16 model at least as fast as the
  same model in fp32. Costs twice the half-precision weight bytes.

:func:`choose` picks one per (CPU, torch version and threads, dtype, matrix shapes, batch
size) by a short measurement on the model's own matrices, cached in
``$MINIGPT2_CACHE_DIR/kernels.json`` (default ``~/.cache/minigpt2``). A measurement taken
while other processes compete for the cores can crown the wrong kernel, so one sample
decides for good only when it is quiet and clear; otherwise the next few processes measure
again and the decision is taken from all samples together (see :func:`decide`).
:func:`choose_rows` does the same for many-row products (a prompt's prefill). The
environment variable ``MINIGPT2_KERNEL`` (``plain``, ``transposed``, ``native``, ``numpy``, ``mkldnn``, ``upcast``)
or :func:`force` overrides the choice, so tests can run every candidate on whatever host
they land on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hugepages, native

#: The candidates, in order of preference when measurements tie (plain costs no memory;
#: upcast costs the most; native before transposed and numpy: the same copies, and only with
#: native does the whole decode step run in one C call, so a tie on the products is no tie on
#: the token: on the emulated AVX2 host, bf16 block products measured transposed 3.72 ms a pass
#: against native 3.61, a tie, and generate ran 157 tok/s on transposed against 222 on native).
KERNELS = ("plain", "native", "transposed", "numpy", "mkldnn", "upcast")

#: Measurements within this fraction of the fastest count as a tie (the run-to-run noise of
#: one choice on a quiet host here is ~1-2 %).
TIE = 0.03

#: One sample settles a decision only if it was quiet (every candidate's median round within
#: this factor of its best round) and clear (the winner ahead of every other candidate by
#: more than CLEAR); otherwise the next processes measure again, up to SAMPLES samples.
QUIET = 1.10
CLEAR = 0.10
SAMPLES = 3
#: Part of every cache key: raised when the rule that settles a decision changes, so that
#: decisions an older rule settled (possibly under load) are measured again.
DECISIONS_VERSION = 5  # 3: the native kernel joined the candidates; 4: its batch tiles got faster (bf16 dot products); 5: copies on huge pages

#: After the first timed round, a candidate this many times slower than the fastest is not
#: timed further; one ABSURD times slower than the fastest is cut short in the warm-up
#: already (torch's bf16 fallback on a CPU without bf16 can be 50x slower than fp32).
HOPELESS = 4.0
ABSURD = 30.0

#: Products with more rows than this (a prompt's prefill, large batches) are compute-bound
#: GEMMs, not weight streaming: they have their own kernel choice (:func:`choose_rows`).
ROWS = 64

#: Rows of x up to which the native kernel's GEMV serves half-precision products where torch's
#: half GEMM is native (more go to that GEMM; see native_rows); DOT_ROWS for bf16 where the
#: native kernel has AVX512_BF16's dot products.
NATIVE_ROWS = 2
DOT_ROWS = 16

ENV_KERNEL = "MINIGPT2_KERNEL"
ENV_CACHE_DIR = "MINIGPT2_CACHE_DIR"

_forced: str | None = None  # set by force(); wins over the environment variable
_available: dict[tuple[str, torch.dtype, str], bool] = {}
_warned_unavailable: set[tuple[str, torch.dtype, str]] = set()  # forced kernels already warned about
_decisions: dict[str, str] = {}  # decision_key -> kernel, this process's copy of the cache file
HALF = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------ the kernels
class PreparedLinear:
    """y = x @ W^T + b for one weight matrix, in the form one kernel wants.

    ``weight_out_in`` is the matrix as [out, in] (for Conv1D a transposed view of its
    [in, out] parameter, for the unembedding the embedding itself): only ``prepare`` copies.
    Whether the source weights changed since is fast.py's business (it keys the whole set).
    The copies a kernel keeps go into ``arena`` if given (hugepages.Arena: on 2 MiB pages, which
    the kernels stream faster), else into torch's memory. ``mm`` takes x as (N, in) and
    returns (N, out) in the weights' dtype.
    """

    def __init__(
        self, kernel: str, weight_out_in: torch.Tensor, bias: torch.Tensor | None, batch_size: int,
        inner: str | None = None, arena: hugepages.Arena | None = None,
    ) -> None:  # fmt: skip
        self.kernel = kernel
        self.pool = "numpy" if kernel == "numpy" else "torch"  # whose threads run the product
        self.out_features = weight_out_in.shape[0]
        w = weight_out_in.detach()
        b = None if bias is None else bias.detach()
        self.extra_bytes = 0
        self.mm_gelu_tanh: Callable[[torch.Tensor], torch.Tensor] | None = None  # mkldnn only
        if kernel == "plain":
            self.weight = w.t()  # (in, out): Conv1D's own parameter, or a view of the embedding
        elif kernel == "transposed":
            # (in, out) again, but in the memory layout the parameter is NOT stored in.
            wt = w.t()
            self.weight = _contiguous(wt, arena) if not wt.is_contiguous() else _contiguous(w, arena).t()
            self.extra_bytes = w.numel() * w.element_size()
        elif kernel == "mkldnn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_size)  # opaque
            self.extra_bytes = w.numel() * w.element_size()
        elif kernel == "numpy":
            self.weight = _contiguous(w, arena)  # (out, in): each output a dot product over contiguous memory
            self.extra_bytes = 0 if self.weight.data_ptr() == w.data_ptr() else w.numel() * w.element_size()
            self.mm = _numpy_linear(self.weight, b)
            return
        elif kernel == "native":
            lib = native.library()
            if lib is None or w.dtype not in lib.dtypes or w.device.type != "cpu":
                raise ValueError(f"kernel 'native' is not available for {w.dtype} on {w.device.type} here")
            self.weight = _contiguous(w, arena)  # (out, in): each thread streams its rows in order
            self.bias = None if b is None else b.contiguous()  # (what fast.py's whole native step reads too)
            self.extra_bytes = 0 if self.weight.data_ptr() == w.data_ptr() else w.numel() * w.element_size()
            self.mm = _native_linear(self.weight, self.bias, lib)
            return
        elif kernel == "upcast":
            if w.dtype not in HALF:
                raise ValueError(f"kernel 'upcast' is for bf16 / fp16 weights, not {w.dtype}")
            # The fp32 copy, on the fp32 kernel ``inner`` (:func:`upcast_inner`: the one fp32
            # weights of this shape get), so bf16 never runs slower than the same model in fp32.
            inner = inner or default_upcast_inner(w.device)
            # (in the arena only where the inner kernel reads this copy as it is: oneDNN reorders
            # it and transposed transposes it into copies of their own, and a dead copy in an
            # arena would keep its pages)
            keeps = arena is not None and inner in ("plain", "native", "numpy")
            w32 = arena.copy(w, torch.float32) if keeps else w.float().contiguous()
            self.fp32 = PreparedLinear(inner, w32, None if b is None else b.float(), batch_size, arena=arena)
            self.pool, self.weight = self.fp32.pool, self.fp32.weight
            self.extra_bytes = w.numel() * 4  # the copy (or the inner kernel's own copy of it)
            dtype, fp32_mm = w.dtype, self.fp32.mm
            self.mm = lambda x: fp32_mm(x.float()).to(dtype)
            return
        else:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")

        # mm(x2) for x2 (N, in): one call, no branching per use (decoding calls it 49 times a token).
        if kernel == "mkldnn":
            self.mm = functools.partial(_mkldnn_linear, weight=self.weight, bias=b)
            # The same product with the tanh GELU applied in oneDNN's epilogue, on the fp32
            # accumulator (fast.py uses it for half-precision prompt rows: one pass over the
            # activation fewer, and one rounding fewer).
            self.mm_gelu_tanh = functools.partial(_mkldnn_linear_gelu_tanh, weight=self.weight, bias=b)
        elif b is None:
            self.mm = functools.partial(torch.mm, mat2=self.weight)
        else:
            self.mm = functools.partial(torch.addmm, b, mat2=self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        y = self.mm(x.reshape(-1, x.shape[-1]))  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)


def _numpy_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (N, in) -> x @ W^T + b (N, out) by numpy's BLAS: a GEMV for one row, a GEMM for more.
    numpy arrays share the torch tensors' memory both ways (no copies per call)."""
    w = weight.numpy()  # (out, in)
    b = None if bias is None else bias.numpy()

    def mm(x: torch.Tensor) -> torch.Tensor:
        xn = x.contiguous().numpy()
        y = (w @ xn[0])[None] if xn.shape[0] == 1 else xn @ w.T
        if b is not None:
            y += b
        return torch.from_numpy(y)

    return mm


def _contiguous(w: torch.Tensor, arena: hugepages.Arena | None) -> torch.Tensor:
    """``w`` itself if contiguous, else a contiguous copy: in ``arena`` (on huge pages) if given."""
    if w.is_contiguous():
        return w
    return w.contiguous() if arena is None else arena.copy(w)


def native_rows(dtype: torch.dtype, lib: native.Library) -> int:
    """Rows of x up to which the native kernel's own product serves ``dtype``; more go to
    torch's GEMM on the same [out, in] weight.

    The kernel is a GEMV: each row of x is its own pass of dot products. Where torch's half
    GEMM is native (oneDNN), it takes more rows than NATIVE_ROWS (a short prompt, a draft
    check): for GPT-2's 48 block matrices here, 16 rows in 9.2 ms against 23.4 on the GEMV (1
    row: 4.2 GEMV, 6.8 GEMM). In fp32, torch's GEMM on this layout is slower than the GEMV up
    to 64 rows (MKL: 31.9 against 24.3 ms at 16 rows). bf16 on AVX512_BF16's dot products
    (``lib.bf16_dot``) keeps up to DOT_ROWS: the same 48 matrices, AMD EPYC Zen 5, 8 rows 4.5 ms
    (torch's GEMM 9.5, oneDNN's prepacked 4.7), 16 rows 8.6 (11.2, 5.7), 32 rows 22.9 (15.9, 9.1).
    """
    if dtype in HALF and native_half(dtype):
        return DOT_ROWS if dtype == torch.bfloat16 and lib.bf16_dot else NATIVE_ROWS
    return ROWS


def _native_linear(weight: torch.Tensor, bias: torch.Tensor | None, lib: native.Library) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (N, in) -> x @ W^T + b (N, out) by the native kernel (native.linear's checks, with the
    constant arguments bound once: decoding calls it 49 times a token). The closure keeps the
    weight and bias alive: the library only sees their addresses."""
    out_features, n_in = weight.shape
    if bias is not None and (bias.dtype != weight.dtype or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"native kernel: the bias must be ({out_features},) {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")  # fmt: skip
    bias = None if bias is None else bias.contiguous()
    fn, code, dtype = lib.fn, native.DTYPES[weight.dtype], weight.dtype
    w_ptr, b_ptr = weight.data_ptr(), None if bias is None else bias.data_ptr()
    gemm_rows = native_rows(dtype, lib)

    def mm(x: torch.Tensor, _keep: tuple = (weight, bias)) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != n_in or x.device.type != "cpu":
            raise ValueError(f"native kernel: x must be (N, {n_in}) on the CPU, got {tuple(x.shape)} on {x.device}")
        if x.shape[0] > gemm_rows or x.dtype != dtype:
            # many rows: torch's GEMM; another dtype (autocast hands an fp32 weight bf16
            # activations): what torch's own product does with it
            return torch.nn.functional.linear(x, weight, bias)
        x = x.contiguous()
        y = torch.empty(x.shape[0], out_features, dtype=dtype)
        if fn(code, w_ptr, b_ptr, x.data_ptr(), y.data_ptr(), x.shape[0], out_features, n_in) != 0:
            raise MemoryError("the native kernel could not allocate its fp32 copy of x")
        return y

    return mm


@functools.lru_cache(maxsize=1)
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get_num_threads, set_num_threads) of the OpenBLAS numpy loaded (found in the process's
    mapped libraries, as threadpoolctl does), or None (another BLAS, another platform)."""
    import ctypes

    import numpy  # noqa: F401  (loads its BLAS)

    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    return None


def numpy_blas_threads() -> int | None:
    """How many threads numpy's BLAS runs (OpenBLAS's own count), or None where unknown."""
    fns = _openblas()
    return None if fns is None else int(fns[0]())


def set_numpy_blas_threads(n: int) -> None:
    """Set OpenBLAS's thread count (process-wide: fast.py sets it for one step and restores it)."""
    fns = _openblas()
    if fns is not None:
        fns[1](n)


def _mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _mkldnn_linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")


def default_upcast_inner(device: torch.device | str = "cpu") -> str:
    """The fp32 kernel of an ``upcast`` copy when none was chosen: oneDNN's, else addmm."""
    return "mkldnn" if available("mkldnn", torch.float32, device) else "plain"


def upcast_inner(
    role: str,
    matrices: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    batch_size: int,
    candidates: Sequence[str] | None = None,
) -> str:
    """The fp32 kernel for fp32 copies of these half-precision matrices: the decision fp32
    weights of the same shapes get (:func:`choose`, measured on fp32 copies if not known)."""
    if forced() is not None:
        return default_upcast_inner(matrices[0][0].device)
    copies = [(w.float(), None if b is None else b.float()) for w, b in matrices]
    return choose(role, copies, batch_size, candidates=[k for k in (candidates or KERNELS) if k != "upcast"])


def upcast_rows(weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (N, in) -> (N, out) for half-precision weights, computed in fp32 with the weight
    converted on each call (no copy kept): for products with many rows, where the
    conversion is small next to the arithmetic, on CPUs whose half-precision GEMM is slow.
    The same function as a native bf16 GEMM (fp32 accumulation, one rounding at the end)."""
    w, b = weight_out_in.detach(), None if bias is None else bias.detach()
    dtype = w.dtype

    def mm(x: torch.Tensor) -> torch.Tensor:
        y = torch.mm(x.float(), w.t().float()) if b is None else torch.addmm(b.float(), x.float(), w.t().float())
        return y.to(dtype)

    return mm


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
    changed the ops' signature falls back instead of failing). ``upcast`` is for bf16 / fp16
    weights on the CPU.
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
    if device.type != "cpu":
        return False  # on GPUs the plain path is what cuBLAS does best
    if kernel == "upcast":
        if dtype not in HALF:
            return False
    elif kernel == "numpy":
        if dtype != torch.float32 or numpy_blas_threads() is None:
            return False
    elif kernel == "native":
        lib = native.library()
        if lib is None or dtype not in lib.dtypes:
            return False
    elif dtype not in (torch.float32, torch.bfloat16):
        return False  # fp16 on CPU: plain, or upcast
    if kernel == "mkldnn" and not _mkldnn_ops_present(dtype):
        return False
    try:  # (autocast off: its dtype rules would change the reference, not the kernel)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
            g = torch.Generator().manual_seed(0)
            ok = True
            # (out, in): a tail of inputs past the vector width, and a width multiple
            for out_f, in_f in ((24, 40), (20, 64)):
                w = torch.randn(out_f, in_f, generator=g).to(dtype)
                b = torch.randn(out_f, generator=g).to(dtype)
                x = torch.randn(3, in_f, generator=g).to(dtype)
                want = torch.addmm(b.float(), x.float(), w.float().t())
                got = PreparedLinear(kernel, w, b, 1)(x).float()
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                ok = ok and got.shape == want.shape and bool(((got - want).abs().max() <= tol * want.abs().max()).item())
        return ok
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


def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively through oneDNN (AVX512-bf16,
    AMX, AVX512-fp16), which is where torch sends half-precision GEMMs when it can; without
    it torch falls back to a generic loop that is far slower than fp32."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16:
            return bool(ops._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(ops._is_mkldnn_fp16_supported())
    except Exception:  # noqa: BLE001
        return False
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


def decision_key(role: str, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, batch_size: int | str) -> str:
    unique = list(dict.fromkeys(shapes))
    shape_s = ",".join("x".join(map(str, s)) for s in unique) + f" ({len(shapes)} matrices)"
    dt = str(dtype).removeprefix("torch.")
    bucket = batch_size if isinstance(batch_size, str) else f"batch {batch_bucket(batch_size)}"
    # DECISIONS_VERSION: decisions settled by an older rule are measured again, not trusted.
    # The pages: the copies on huge pages stream faster than on small ones (hugepages.py).
    pages = "huge pages" if hugepages.enabled() else "small pages"
    return (f"{host_id()} | torch {torch.__version__}, {torch.get_num_threads()} threads, {pages}, "
            f"decisions v{DECISIONS_VERSION} | {role} {shape_s} | {dt} | {bucket}")


@dataclass
class Sample:
    """One measurement: best seconds per pass of each candidate, how noisy it was (the
    largest ratio of a candidate's median round to its best round), whether every
    candidate was timed through every round (none dropped as hopeless or cut short), and
    whether other work held the cores in every round (``crowded``: see :func:`crowded`)."""

    seconds: dict[str, float]
    noise: float
    complete: bool = True
    crowded: bool = False

    def to_json(self) -> dict:
        return {"seconds_per_pass": self.seconds, "noise": round(self.noise, 4), "complete": self.complete,
                "crowded": self.crowded, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def crowded() -> bool:
    """Whether more tasks are runnable on this host right now than this process has cores
    (the running count of /proc/loadavg, which counts this thread and torch's spinning
    workers too); False where that count is not available.

    Why: a measurement taken while other work holds the cores slows every candidate alike,
    so its rounds agree (low noise) and it would settle a decision. A new user's trial here,
    with a test suite running beside it, measured every kernel ~15x slower at noise 1.07.
    """
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0])
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    except (OSError, ValueError, IndexError):
        return False
    return running > cores


def decide(samples: Sequence[dict], candidates: Sequence[str]) -> tuple[str, bool]:
    """The kernel the samples point to, and whether that is settled.

    Each candidate's time is its best over all samples (other processes only ever add
    time, so the minimum is the kernel's own speed, and more samples only sharpen it); the
    first candidate (cheapest first) within TIE of the fastest wins. Settled when there are
    SAMPLES samples, or when the newest one was quiet (noise <= QUIET, and not crowded),
    complete (every candidate timed in every round: see time_passes) and clear (the winner
    ahead of every other candidate that is not tied with it by more than CLEAR).
    """
    best_t: dict[str, float] = {}
    for s in samples:
        for k, t in s["seconds_per_pass"].items():
            if k in candidates:
                best_t[k] = min(t, best_t.get(k, float("inf")))
    ranked = [k for k in candidates if k in best_t]
    fastest = min(best_t[k] for k in ranked)
    best = next(k for k in ranked if best_t[k] <= fastest * (1 + TIE))
    if len(samples) >= SAMPLES:
        return best, True
    newest = samples[-1]
    t = newest["seconds_per_pass"]
    rivals = [t[k] for k in ranked if k in t and t[k] > fastest * (1 + TIE)]
    clear = all(r >= min(t.values()) * (1 + CLEAR) for r in rivals)
    quiet = newest.get("noise", float("inf")) <= QUIET and newest.get("complete", True) and not newest.get("crowded")
    return best, quiet and clear


def choose(
    role: str,
    matrices: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    batch_size: int,
    *,
    rounds: int = 5,
    candidates: Sequence[str] | None = None,
) -> str:
    """The kernel for these [out, in] matrices (+ biases) at this batch size.

    Forced (``force`` / ``MINIGPT2_KERNEL``) if so, and available; else the settled
    decision cached for this host, torch version and threads, shapes, dtype and batch
    bucket; else measured now (:func:`measure`), the sample added to the cache file's
    samples for this key, and decided from all of them (:func:`decide`): a decision that is
    not settled yet is used in this process and measured again in the next. Pass matrices
    that together exceed the last-level cache, or the measurement sees cache speed, not the
    memory streaming that decoding is limited by.
    """
    w0 = matrices[0][0]
    dtype, device = w0.dtype, w0.device
    name = forced()
    if name is not None:
        if available(name, dtype, device):
            return name
        if (name, dtype, device.type) not in _warned_unavailable:  # once, not once per choice
            _warned_unavailable.add((name, dtype, device.type))
            warnings.warn(f"kernel {name!r} is not available for {dtype} on {device.type}; using 'plain'", stacklevel=2)
        return "plain"
    allowed = list(candidates or KERNELS)
    candidates = [k for k in allowed if available(k, dtype, device)]
    if "numpy" in candidates and ("native" in candidates or numpy_blas_threads() != torch.get_num_threads()):
        # Not with the native kernel at hand: it streams at least as fast (a same-process A/B of
        # 128 fp32 tokens here: 103.6 against 76.7 tok/s on a fast run, 50.1 against 49.0 on a
        # slow one), and OpenBLAS's threads spin ~0.1 s after each call against torch's (a bf16
        # prefill right after an fp32 generate ran 15-20 % slower). Nor where it would not run
        # on the user's thread count.
        candidates.remove("numpy")
    if len(candidates) == 1:
        return candidates[0]
    key = decision_key(role, [tuple(w.shape) for w, _ in matrices], dtype, batch_size)

    def sample() -> Sample:
        inner = None
        if "upcast" in candidates:  # measured on the fp32 kernel it would use (within the same pools)
            inner = upcast_inner(role, matrices, batch_size, None if "numpy" in allowed else allowed)
        return _sample(matrices, candidates, batch_size, rounds, inner)

    return _decided(key, candidates, sample)


def _decided(key: str, candidates: Sequence[str], sample: Callable[[], Sample]) -> str:
    if _decisions.get(key) in candidates:
        return _decisions[key]
    cached = _read_cache().get(key) or {}
    samples = [s for s in cached.get("samples", []) if isinstance(s, dict) and "seconds_per_pass" in s]
    # Samples that did not time every candidate available now (measured where the native kernel
    # could not be built, say, or with MINIGPT2_NATIVE=0) decide nothing here: start over.
    fresh = [s for s in samples if set(candidates) <= set(s["seconds_per_pass"])]
    if len(fresh) < len(samples):
        samples, cached = fresh, {}
    if cached.get("settled") and cached.get("kernel") in candidates:
        best = cached["kernel"]
    else:
        samples = (samples + [sample().to_json()])[-SAMPLES:]
        best, settled = decide(samples, candidates)
        _write_cache(key, {"kernel": best, "settled": settled, "samples": samples})
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
    return _sample(matrices, candidates, batch_size, rounds).seconds


def _sample(
    matrices: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    candidates: Sequence[str],
    batch_size: int,
    rounds: int,
    inner: str | None = None,
) -> Sample:
    with torch.no_grad():
        fns = {}
        for k in candidates:
            arena = hugepages.Arena()  # the copies on huge pages, as prepare makes them; freed with k's
            fns[k] = [PreparedLinear(k, w, b, batch_size, inner, arena).mm for w, b in matrices]
        return time_passes(fns, _inputs(matrices, batch_size), rounds)


def _inputs(matrices: Sequence[tuple[torch.Tensor, torch.Tensor | None]], rows: int) -> list[torch.Tensor]:
    w0 = matrices[0][0]
    g = torch.Generator(device=w0.device).manual_seed(0)  # the global RNG is the user's (seeded sampling)
    return [torch.randn(rows, w.shape[1], generator=g, device=w.device).to(w.dtype) for w, _ in matrices]


def time_passes(fns: dict[str, list[Callable]], xs: Sequence[torch.Tensor], rounds: int) -> Sample:
    """Per candidate, one pass = fns[k][i](xs[i]) for every matrix i; ``rounds`` rounds after
    a warm-up, candidates interleaved within each round so that drift hits all of them.

    A pass's time is the sum over matrices of each matrix's best time over the rounds: a
    preemption by another process spoils one matrix of one round, not the whole pass. A
    candidate more than HOPELESS times slower than the fastest in both of the first two timed
    rounds is not timed further (the warm-up round holds one-time costs, such as oneDNN
    generating its kernels, so it decides nothing; only a candidate ABSURD times slower than
    the fastest finished one is cut short there). ``noise`` is the largest ratio of a
    candidate's median round total to its best one, over every candidate timed twice or more.

    A burst of load can make a good candidate look hopeless or absurd, and a sample must not
    then look quiet because the candidate it hit was never timed again (a busy AMD host here
    settled bf16 on ``upcast`` that way, its three rivals timed once at 30x their speed). So
    a candidate is dropped only after two timed rounds, one cut short in the warm-up is
    tried once more after the rounds, and a sample in which any candidate was dropped or cut
    is ``complete=False``: it is used, but it cannot settle a decision by itself (decide).
    Likewise a sample ``crowded`` in every round (:func:`crowded`: other work held the cores
    throughout, slowing every candidate alike).
    """
    clock = time.perf_counter

    def one_pass(k: str, limit: float = float("inf")) -> float:
        t = clock()
        for fn, x in zip(fns[k], xs):
            fn(x)
            if clock() - t > limit:
                break
        return clock() - t

    warm: dict[str, float] = {}
    for k in fns:  # warm-up: caches, oneDNN's kernel selection, page faults
        warm[k] = one_pass(k, ABSURD * min(warm.values(), default=float("inf")))
    live = [k for k in fns if warm[k] <= ABSURD * min(warm.values())]
    cut = [k for k in fns if k not in live]
    best = {k: [float("inf")] * len(xs) for k in live}
    totals: dict[str, list[float]] = {k: [] for k in live}
    crowd = []
    for r in range(max(rounds, 2)):
        crowd.append(crowded())
        for k in live:
            per = best[k]
            total = 0.0
            for i, (fn, x) in enumerate(zip(fns[k], xs)):
                t = clock()
                fn(x)
                dt = clock() - t
                total += dt
                per[i] = min(per[i], dt)
            totals[k].append(total)
        if r == 1:
            fastest = min(min(totals[k]) for k in live)
            live = [k for k in live if min(totals[k]) <= HOPELESS * fastest]
    seconds = {k: (sum(best[k]) if k in best else warm[k]) for k in fns}
    noise = max((statistics.median(v) / max(min(v), 1e-12) for v in totals.values() if len(v) > 1), default=1.0)
    fastest_pass = min(seconds[k] for k in best)
    for k in cut:
        seconds[k] = min(seconds[k], one_pass(k, ABSURD * fastest_pass))
    return Sample(seconds, noise, complete=not cut and len(live) == len(best), crowded=all(crowd))


def choose_rows(
    role: str,
    matrices: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    step_kernel: str,
    *,
    rows: int = 256,
    rounds: int = 3,
) -> str:
    """The kernel for products with many rows (more than ROWS: a prompt's prefill, large
    batches), given ``step_kernel``, the one chosen for the decode step.

    - fp32: ``plain``, the model's own addmm, so a prompt's logits are bit-identical to the
      model's and transformers' (these GEMMs are compute-bound: every kernel runs at the
      same arithmetic rate, within a few percent).
    - bf16 / fp16: ``upcast`` (computed in fp32, see :func:`upcast_rows`) on CPUs without
      native half arithmetic, where torch's half GEMM is ~50x slower than fp32 (not worth
      measuring); where it is native, the step kernel or ``upcast``, measured on ``rows``
      rows of ``matrices`` (one block's) and cached like :func:`choose`, because an emulated
      half GEMM may still lose to fp32. A step kernel of ``upcast`` serves rows too; a step
      kernel of ``native`` (a GEMV) is measured as ``plain`` instead (torch's half GEMM).
    """
    w0 = matrices[0][0]
    dtype, device = w0.dtype, w0.device
    if dtype not in HALF or device.type != "cpu":
        return "plain"
    if step_kernel == "upcast":
        return "upcast"
    name = forced()
    if name is not None:
        if name == "upcast":
            return "upcast"
        return ("plain" if native_half(dtype) else "upcast") if step_kernel == "native" else step_kernel
    if not native_half(dtype):
        return "upcast"
    # The native kernel is a GEMV: a prompt's GEMMs go to torch's own half-precision addmm on the
    # parameters (oneDNN's GEMM where the half arithmetic is native; no copy) or the upcast.
    rival = "plain" if step_kernel == "native" else step_kernel
    key = decision_key(f"{role} after {step_kernel}", [tuple(w.shape) for w, _ in matrices], dtype, f"{rows} rows")

    def sample() -> Sample:
        with torch.no_grad():
            fns = {
                rival: [PreparedLinear(rival, w, b, batch_bucket(rows)).mm for w, b in matrices],
                "upcast": [upcast_rows(w, b) for w, b in matrices],
            }
            return time_passes(fns, _inputs(matrices, rows), rounds)

    return _decided(key, [rival, "upcast"], sample)
