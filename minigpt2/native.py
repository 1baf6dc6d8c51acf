"""minigpt2's own matrix-vector kernel (native/linear.c), built for this host on first use.

The ``native`` kernel of kernels.py: ``y = x W^T + b`` for the few rows of a decode step,
streaming the weights with the host's widest vectors (AVX-512, AVX2 + FMA, or plain C) and
fp32 accumulation, on the OpenMP team torch itself runs on. Why it exists, measured on the
AMD EPYC hosts here (docs/performance.md):

- half-precision weights: it widens bf16 / fp16 to fp32 on the fly, so on CPUs without native
  bf16 arithmetic a bf16 model streams half the bytes of an fp32 one (torch's fallback is
  ~14 GB/s, and the ``upcast`` kernel reads fp32 copies); where oneDNN has native bf16 its
  packed layout reads faster than oneDNN's GEMV;
- fp32: it streams as fast as OpenBLAS's GEMV, in torch's thread pool instead of a second
  one: OpenBLAS's threads spin for ~0.1 s after each call and slow whatever torch runs next
  (a bf16 prefill right after an fp32 generate: 15-20 % slower).

Building needs a C compiler (``$CC``, else ``cc``) with OpenMP; the library is compiled
once per host, compiler and source (``-O3 -march=native -fopenmp``, under a second) into
``$MINIGPT2_CACHE_DIR/native`` (default ``~/.cache/minigpt2/native``) and loaded with ctypes.
Where anything is missing (no compiler, another OpenMP runtime than torch's, a non-x86 or
non-Linux host), :func:`library` returns None and the kernel is simply not a candidate.
``MINIGPT2_NATIVE=0`` switches it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ENV_NATIVE = "MINIGPT2_NATIVE"
SOURCE = Path(__file__).with_name("native") / "linear.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
#: The dtype codes of linear.c.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OPENMP = ("libgomp", "libiomp", "libomp")


class Library:
    """The loaded kernel: its vector width, rows per group, dtypes, and the product itself."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.lanes = int(lib.minigpt2_lanes())  # W: fp32 lanes of a vector (16, 8 or 1)
        self.group_rows = int(lib.minigpt2_group_rows())  # R: rows read together
        mask = int(lib.minigpt2_dtypes())
        self.dtypes = {dt for dt, code in DTYPES.items() if mask >> code & 1}
        fn = lib.minigpt2_linear
        p, n = ctypes.c_void_p, ctypes.c_long
        fn.argtypes = [ctypes.c_int, ctypes.c_int, p, p, p, p, n, n, n]
        fn.restype = ctypes.c_int
        self.fn = fn


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (one: torch's)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return {line.split()[-1] for line in f if any(n in line for n in _OPENMP) and ".so" in line}
    except OSError:
        return set()


def _build_dir() -> Path:
    root = os.environ.get("MINIGPT2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "minigpt2")
    return Path(root) / "native"


def _compiler() -> tuple[str, str] | None:
    """The C compiler and its version line, or None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return cc, (out.stdout.splitlines() or [""])[0]


def _compile(cc: str, out: Path) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".linear.", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, timeout=120, check=True)
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the new one
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def library() -> Library | None:
    """The kernel library for this host, compiled if needed; None where it cannot run here.

    Needs Linux on x86-64, a C compiler with OpenMP, and that the library's OpenMP runtime
    is the one torch loaded (checked after loading: a second runtime would bring a second
    thread pool, the problem this kernel avoids). A failed build is not retried in the same
    process."""
    if os.environ.get(ENV_NATIVE, "1").strip() == "0":
        return None
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    found = _compiler()
    if found is None:
        return None
    cc, version = found
    torch_omp = _openmp_runtimes()
    try:
        source = SOURCE.read_text(encoding="utf-8")
    except OSError:  # an install without the package data
        return None
    key = hashlib.sha256("\n".join([source, " ".join(FLAGS), cc, version, _cpu_flags()]).encode()).hexdigest()[:16]
    path = _build_dir() / f"linear-{key}.so"
    try:
        if not path.exists() and not _compile(cc, path):
            return None
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if len(_openmp_runtimes()) != 1 or (torch_omp and _openmp_runtimes() != torch_omp):
        return None  # it brought an OpenMP runtime of its own (or torch runs none we know)
    try:
        return Library(lib, path)
    except AttributeError:  # a stale or foreign file under our name
        return None


def packed(w: torch.Tensor, lib: Library) -> torch.Tensor:
    """W [out, in] in the packed layout linear.c reads for half precision: per group of R rows,
    [in / W][R][W] (rows past ``out`` zero). Needs ``in`` a multiple of W."""
    out, n_in = w.shape
    R, W = lib.group_rows, lib.lanes
    groups = -(-out // R)
    padded = w.new_zeros(groups * R, n_in)
    padded[:out] = w
    return padded.view(groups, R, n_in // W, W).permute(0, 2, 1, 3).contiguous()


def uses_packed(dtype: torch.dtype, n_in: int, lib: Library) -> bool:
    """Whether weights of this dtype and input size are packed (half precision, in % W == 0)."""
    return dtype in (torch.bfloat16, torch.float16) and n_in % lib.lanes == 0


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out_features: int, is_packed: bool,
           lib: Library) -> torch.Tensor:  # fmt: skip
    """x (N, in) contiguous, of w's dtype -> x W^T + b (N, out_features), by linear.c.

    Raises:
        ValueError: a dtype this build does not serve, or a packed W with in not a multiple of W.
    """
    n, n_in = x.shape
    y = torch.empty(n, out_features, dtype=w.dtype, device=x.device)
    rc = lib.fn(DTYPES.get(w.dtype, -1), int(is_packed), w.data_ptr(), None if b is None else b.data_ptr(),
                x.data_ptr(), y.data_ptr(), n, out_features, n_in)  # fmt: skip
    if rc != 0:
        raise ValueError(f"the native kernel does not serve {w.dtype} weights of {n_in} inputs (code {rc})")
    return y
