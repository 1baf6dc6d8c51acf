"""minigpt2's own matrix-vector kernel (native/decode.c), built for this host on first use,
and GPT-2's whole one-token decode step on it (:class:`DecodeStep`).

The ``native`` kernel of kernels.py: ``y = x W^T + b`` for the few rows of a decode step,
streaming the weights with the host's widest vectors (AVX-512, AVX2 + FMA, or plain C) and
fp32 accumulation, on the OpenMP team torch itself runs on. Why it exists, measured on the
AMD EPYC hosts here (docs/performance.md):

- it reads each thread's rows of W as one sequential stream, which the hardware prefetchers
  follow best: over GPT-2's 49 matrices, 46-49 GB/s in fp32 and bf16 where OpenBLAS's GEMV
  read ~42 and oneDNN's bf16 GEMV ~38 (docs/performance.md);
- half-precision weights are widened to fp32 on the fly, so on CPUs without native bf16
  arithmetic a bf16 model streams half the bytes of an fp32 one (torch's fallback there
  reads ~14 GB/s, and the ``upcast`` kernel reads fp32 copies);
- it runs in torch's thread pool, not a second one: OpenBLAS's threads spin for ~0.1 s after
  each call and slow whatever torch runs next (a bf16 prefill right after an fp32 generate
  ran 15-20 % slower).

Where every block matrix of a decode step is on this kernel, fast.Decoder runs the whole
one-token step as one C call (:class:`DecodeStep`): embeddings, the 12 blocks' layer norms,
products, cache writes, attention, GELU and residual additions, ln_f and (where it is native
too) the unembedding, in one OpenMP parallel region with the model's roundings.

Building needs a C compiler (``$CC``, else ``cc``) with OpenMP; the library is compiled
once per host, compiler and source (``-O3 -march=native -fopenmp``, about a second) into
``$MINIGPT2_CACHE_DIR/native`` (default ``~/.cache/minigpt2/native``) and loaded with ctypes.
Where anything is missing (no compiler, another OpenMP runtime than torch's, a non-x86 or
non-Linux host), :func:`library` returns None and the kernel is simply not a candidate.
``MINIGPT2_NATIVE=0`` (or false / no / off) switches it off; a failed build says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

ENV_NATIVE = "MINIGPT2_NATIVE"
SOURCE = Path(__file__).with_name("native") / "decode.c"
# -fno-trapping-math: the compiler may then turn the GELU's and the softmax's compares into
# vector selects (nothing here reads the floating-point exception flags); without it the AVX2
# build's GELU loop stayed scalar (4.9 ms for a 1000 x 3072 bf16 activation, against 1.1 with it)
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared")
#: The dtype codes of decode.c.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OPENMP = ("libgomp", "libiomp", "libomp")


class _StepArgs(ctypes.Structure):
    """decode.c's step_args (minigpt2_decode_step's one argument), field for field."""

    _fields_ = [
        ("dtype", ctypes.c_int),
        *[(f, ctypes.c_long) for f in ("B", "C", "n_head", "inner", "n_layer", "vocab", "n_positions")],
        ("ids", ctypes.c_void_p),
        ("positions", ctypes.c_void_p),
        ("position_rows", ctypes.c_long),
        ("wte", ctypes.c_void_p),
        ("wpe", ctypes.c_void_p),
        ("params", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("lnf_w", ctypes.c_void_p),
        ("lnf_b", ctypes.c_void_p),
        ("unembed", ctypes.c_void_p),
        ("kv", ctypes.c_void_p),
        *[(f, ctypes.c_long) for f in ("kv_l", "kv_kv", "kv_b", "kv_h", "kv_s", "max_len", "past")],
        ("write_pos", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("hidden", ctypes.c_void_p),
    ]


class Library:
    """The loaded library: its vector width and dtypes, and its five functions (the product,
    one token's attention, the tanh GELU, a whole decode step, greedy's maximum per row)."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.lanes = int(lib.minigpt2_lanes())  # fp32 lanes of a vector: 16 (AVX-512), 8 (AVX2), 1 (C)
        # bf16 products of 3 or more rows on AVX512_BF16's dot products (decode.c's rows_bf16_dp)
        self.bf16_dot = bool(lib.minigpt2_bf16_dot())
        mask = int(lib.minigpt2_dtypes())
        self.dtypes = {dt for dt, code in DTYPES.items() if mask >> code & 1}
        fn = lib.minigpt2_linear
        p, n = ctypes.c_void_p, ctypes.c_long
        fn.argtypes = [ctypes.c_int, p, p, p, p, n, n, n]
        fn.restype = ctypes.c_int
        self.fn = fn
        att = lib.minigpt2_attention_one
        att.argtypes = [ctypes.c_int, p, p, p, p, n, p] + [n] * 12 + [ctypes.c_float]
        att.restype = ctypes.c_int
        self.attention_fn = att
        gelu = lib.minigpt2_gelu_tanh_
        gelu.argtypes = [ctypes.c_int, p, n]
        gelu.restype = ctypes.c_int
        self.gelu_fn = gelu
        step = lib.minigpt2_decode_step
        step.argtypes = [ctypes.POINTER(_StepArgs)]
        step.restype = ctypes.c_int
        self.step_fn = step
        top = lib.minigpt2_max_rows
        top.argtypes = [p, n, n, p, p]
        top.restype = ctypes.c_int
        self.max_fn = top

    def max_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``torch.max(x, dim=-1)`` of a contiguous fp32 CPU tensor (B, V): values (B,) fp32 and
        indices (B,) int64, the same ones (the first maximal index; a NaN over any number, the
        first NaN; index 0 of an all -inf row), in decode.c's ``minigpt2_max_rows``.

        Raises:
            ValueError: x not a contiguous 2-D fp32 CPU tensor with at least one column.
        """
        if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu" \
                or x.shape[1] < 1:  # fmt: skip
            raise ValueError(f"max_rows takes a contiguous (B, V) fp32 CPU tensor with V >= 1, got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")  # fmt: skip
        B, V = x.shape
        values, indices = torch.empty(B), torch.empty(B, dtype=torch.int64)
        if self.max_fn(x.data_ptr(), B, V, values.data_ptr(), indices.data_ptr()) != 0:
            raise ValueError(f"minigpt2_max_rows refused a ({B}, {V}) input")  # (checked above: not reached)
        return values, indices


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
    from .kernels import cache_file  # (kernels imports this module)

    return cache_file().parent / "native"  # beside the kernel decisions: $MINIGPT2_CACHE_DIR


def _compiler() -> tuple[str, str] | None:
    """The C compiler and its version line, or None (with a warning where ``$CC`` names one that
    does not run: the user asked for it)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    try:
        out = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        if os.environ.get("CC"):
            warnings.warn(f"CC={cc!r} does not run ({type(e).__name__}); the native kernel is not built and decoding "
                          f"uses the other kernels", stacklevel=3)  # fmt: skip
        return None
    return cc, (out.stdout.splitlines() or [""])[0]


def _compile(cc: str, out: Path) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".decode.", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([*shlex.split(cc), *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, timeout=120,
                       check=True)  # fmt: skip
        os.chmod(tmp, 0o755)  # (mkstemp's 0600: other users sharing the cache directory could not load it)
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the new one
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _complete_elf(path: Path) -> bool:
    """Whether ``path`` is a 64-bit ELF file as long as its header says: the section header table
    (e_shoff + e_shnum * e_shentsize), which the linker writes last, ends within the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:5] != b"\x7fELF\x02":
        return False
    order = "little" if head[5] == 1 else "big"
    shoff = int.from_bytes(head[0x28:0x30], order)
    shentsize, shnum = int.from_bytes(head[0x3A:0x3C], order), int.from_bytes(head[0x3C:0x3E], order)
    return 0 < shoff + shentsize * shnum <= size


def library_file() -> tuple[str, Path] | None:
    """(the C compiler, the path its build of decode.c has or will have in the cache directory),
    or None without a compiler or the source. The name carries a hash of the source, the flags,
    the compiler and its version, and the CPU's flags: another host or compiler builds anew."""
    found = _compiler()
    if found is None:
        return None
    cc, version = found
    try:
        source = SOURCE.read_text(encoding="utf-8")
    except OSError:  # an install without the package data
        return None
    key = hashlib.sha256("\n".join([source, " ".join(FLAGS), cc, version, _cpu_flags()]).encode()).hexdigest()[:16]
    return cc, _build_dir() / f"decode-{key}.so"


@functools.lru_cache(maxsize=1)
def library() -> Library | None:
    """The kernel library for this host, compiled if needed; None where it cannot run here.

    Needs Linux on x86-64, a C compiler with OpenMP, and that the library's OpenMP runtime
    is the one torch loaded (checked after loading: a second runtime would bring a second
    thread pool, the problem this kernel avoids). A failed build is not retried in the same
    process."""
    if os.environ.get(ENV_NATIVE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    torch_omp = _openmp_runtimes()
    if len(torch_omp) != 1:
        return None  # torch runs no OpenMP runtime we know: the library would bring a second pool
    built = library_file()
    if built is None:
        return None
    cc, path = built
    try:
        # A file cut short (a full disk, a partial copy of the cache) must not reach dlopen: the
        # loader maps it and dies of SIGBUS reading past its end, with no message. Build it again.
        if not _complete_elf(path) and not _compile(cc, path):
            warnings.warn(f"building the native kernel with {cc!r} into {path.parent} failed; decoding uses "
                          f"the other kernels (MINIGPT2_NATIVE=0 skips the attempt)", stacklevel=2)  # fmt: skip
            return None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a foreign file under our name: build it again, once
            if not _compile(cc, path):
                return None
            lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if _openmp_runtimes() != torch_omp:
        # It brought an OpenMP runtime of its own. (It stays loaded, unused: its runtime starts no
        # threads until one of its functions runs.)
        return None
    try:
        return Library(lib, path)
    except AttributeError:  # a foreign file under our name
        return None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lib: Library) -> torch.Tensor:
    """x (N, in) @ w (out, in)^T + b (out,) -> (N, out) by decode.c: all CPU tensors of one dtype
    this build serves, contiguous (kernels.PreparedLinear binds the constant arguments once
    instead, for decoding's 49 calls a token).

    Raises:
        ValueError: mismatched shapes or dtypes, a dtype this build does not serve, a device
            other than the CPU.
    """
    if w.dtype not in lib.dtypes or x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
        raise ValueError(f"the native kernel takes one dtype of {sorted(map(str, lib.dtypes))}, got x {x.dtype}, "
                         f"w {w.dtype}, b {None if b is None else b.dtype}")  # fmt: skip
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or (b is not None and b.shape != (w.shape[0],)):
        raise ValueError(f"native kernel: shapes x {tuple(x.shape)}, w {tuple(w.shape)}, "
                         f"b {None if b is None else tuple(b.shape)} do not fit (N, in) @ (out, in)^T + (out,)")  # fmt: skip
    if not all(t.device.type == "cpu" for t in (x, w) + (() if b is None else (b,))):
        raise ValueError("the native kernel runs on the CPU only")
    x, w = x.contiguous(), w.contiguous()
    b = None if b is None else b.contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=w.dtype)
    rc = lib.fn(DTYPES[w.dtype], w.data_ptr(), None if b is None else b.data_ptr(), x.data_ptr(), y.data_ptr(),
                x.shape[0], w.shape[0], w.shape[1])  # fmt: skip
    if rc != 0:
        raise MemoryError(f"the native kernel failed (code {rc})")
    return y


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                        lib: Library) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scale) v for one new token: q (B, nh, 1, hs), k and v (B, nh, S, hs) (the
    KV cache's views: any strides with the last dimension contiguous), the bool mask (B or 1,
    1, 1, S) (True = may attend) or None. Returns (B, nh, 1, hs) in q's dtype, computed in fp32
    (scores, softmax with the maximum subtracted, the weighted sum) and rounded once; a row
    whose keys are all masked is NaN, as torch's softmax gives.

    Raises:
        ValueError: shapes, dtypes or layouts this kernel does not take.
    """
    B, nh, T, hs = q.shape
    S = k.shape[2]
    if any(t.device.type != "cpu" for t in (q, k, v) + (() if mask is None else (mask,))):
        raise ValueError(f"native attention runs on CPU tensors only, got q on {q.device}, k on {k.device}, "
                         f"v on {v.device}{'' if mask is None else f', mask on {mask.device}'}")  # fmt: skip
    if (T != 1 or k.shape != (B, nh, S, hs) or v.shape != k.shape or not (q.dtype == k.dtype == v.dtype)
            or q.dtype not in lib.dtypes or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1):  # fmt: skip
        raise ValueError(f"native attention takes one query (B, nh, 1, hs) and keys/values (B, nh, S, hs) of one "
                         f"dtype, last dim contiguous; got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"{k.dtype}, v {tuple(v.shape)} {v.dtype}")  # fmt: skip
    m = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape[-1] != S or mask.shape[0] not in (1, B) or mask.numel() != mask.shape[0] * S:
            raise ValueError(f"native attention: the mask must be bool (1 or {B}, 1, 1, {S}), got {tuple(mask.shape)} {mask.dtype}")
        m = mask.reshape(mask.shape[0], S).contiguous().view(torch.uint8)
    out = torch.empty(B, nh, 1, hs, dtype=q.dtype)
    rc = lib.attention_fn(DTYPES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), None if m is None else m.data_ptr(),
                          1 if m is None else m.shape[0], out.data_ptr(), B, nh, S, hs, q.stride(0), q.stride(1),
                          k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), scale)  # fmt: skip
    if rc != 0:
        raise MemoryError(f"the native attention failed (code {rc})")
    return out


def gelu_tanh_(x: torch.Tensor, lib: Library) -> torch.Tensor:
    """GPT-2's tanh GELU on a contiguous half-precision CPU tensor (any shape), in place: computed in
    fp32 and rounded once, as ``F.gelu(x, approximate="tanh")``, written as x / (1 + e^(-2u)),
    which has no cancellation for negative x (tested: within one unit of the dtype of float64's
    value everywhere). Returns x.

    Raises:
        ValueError: not a contiguous bf16 / fp16 CPU tensor this build serves.
    """
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dtype not in lib.dtypes or not x.is_contiguous() \
            or x.device.type != "cpu":  # fmt: skip
        raise ValueError(f"native GELU takes a contiguous bf16 / fp16 CPU tensor, got {x.dtype} on {x.device}"
                         f"{'' if x.is_contiguous() else ', not contiguous'}")  # fmt: skip
    if lib.gelu_fn(DTYPES[x.dtype], x.data_ptr(), x.numel()) != 0:
        raise ValueError(f"this build of the native kernel does not serve {x.dtype}")
    return x


def fast_gelu(lib: Library | None, dtype: torch.dtype) -> bool:
    """Whether :func:`gelu_tanh_` beats torch's GELU here: in vector builds (a 1000 x 3072 bf16
    activation on the AMD EPYC host: AVX-512 0.52 against torch's 1.99 ms; the AVX2 build, with
    torch held to AVX2 as on a host without AVX-512, 1.06 against 4.04 ms)."""
    return lib is not None and lib.lanes >= 8 and dtype in lib.dtypes and dtype in (torch.bfloat16, torch.float16)


class DecodeStep:
    """GPT-2's forward for one new token per row, every layer in one call of decode.c's
    ``minigpt2_decode_step``: token and position embeddings, per block ln_1, the q|k|v product
    (keys and values written straight into the cache), one token's attention over the cache,
    attn.c_proj added into the residual stream, ln_2, c_fc with the tanh GELU, mlp.c_proj
    added, then ln_f and the tied unembedding: fp32 logits out (or, without the unembedding,
    ln_f's output, for an unembedding on another kernel).

    The same arithmetic as the model in its dtype, with the model's roundings (decode.c says
    which), products on this library's GEMV, all in one OpenMP parallel region of torch's team
    (omp_get_max_threads() of the calling thread) with five barriers a layer. What it replaces:
    ~200 torch ops and 49 + 12 separate C calls a token, ~1 ms of a 5.5 ms bf16 token of GPT-2
    124M on the AMD EPYC host here (docs/performance.md).

    The tensors are bound once (their addresses); the caller keeps them unchanged, or builds
    a new step (fast.Decoder rebuilds when a weight's version or address changes).
    """

    def __init__(
        self,
        lib: Library,
        *,
        wte: torch.Tensor,
        wpe: torch.Tensor,
        n_head: int,
        layers: list[tuple[torch.Tensor | None, ...]],
        scales: list[float],
        eps: float,
        ln_f: tuple[torch.Tensor, torch.Tensor],
        unembed: torch.Tensor | None,
    ) -> None:
        """wte (V, C) and wpe (n_positions, C); the attention's n_head; per block the 12 tensors
        (ln_1 weight, bias; c_attn (3C, C), its bias (3C); attn.c_proj (C, C), (C); ln_2 weight,
        bias; c_fc (inner, C), (inner); mlp.c_proj (C, inner), (C)), weights as [out, in], biases
        possibly None; each block's attention scale; the layer norms' one epsilon; ln_f's weight
        and bias; the unembedding (V, C), or None (the step then ends with ln_f's output). All
        contiguous CPU tensors of one dtype this build serves.

        Raises:
            ValueError: a tensor of another dtype, device, layout or shape.
        """
        dtype = wte.dtype
        V, C = wte.shape
        inner = layers[0][8].shape[0] if layers and layers[0][8] is not None else 0
        shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (inner, C), (inner,), (C, inner), (C,)]
        tensors = [("wte", wte), ("wpe", wpe), ("ln_f.weight", ln_f[0]), ("ln_f.bias", ln_f[1])]
        if unembed is not None:
            tensors.append(("unembed", unembed))
        for i, layer in enumerate(layers):
            if len(layer) != len(shapes):
                raise ValueError(f"native decode step: block {i} has {len(layer)} tensors, not {len(shapes)}")
            for j, (t, shape) in enumerate(zip(layer, shapes)):
                if t is None and j in (3, 5, 9, 11):  # a bias may be absent
                    continue
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"native decode step: block {i} tensor {j} has shape "
                                     f"{None if t is None else tuple(t.shape)}, expected {shape}")  # fmt: skip
                tensors.append((f"block {i} tensor {j}", t))
        if wpe.dim() != 2 or wpe.shape[1] != C or (unembed is not None and tuple(unembed.shape) != (V, C)) \
                or ln_f[0].shape != (C,) \
                or ln_f[1].shape != (C,) or inner == 0 or len(scales) != len(layers) \
                or n_head <= 0 or C % n_head:  # fmt: skip
            raise ValueError(f"native decode step: shapes do not fit wte {tuple(wte.shape)}: wpe {tuple(wpe.shape)}, "
                             f"unembed {None if unembed is None else tuple(unembed.shape)}, ln_f {tuple(ln_f[0].shape)}, {len(scales)} scales "
                             f"for {len(layers)} blocks, n_head={n_head}")  # fmt: skip
        for name, t in tensors:
            if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"native decode step: {name} is {t.dtype} on {t.device}"
                                 f"{'' if t.is_contiguous() else ', not contiguous'}; every tensor must be a "
                                 f"contiguous CPU tensor of {dtype}")  # fmt: skip
        if dtype not in lib.dtypes:
            raise ValueError(f"this build of the native kernel does not serve {dtype}")
        self.lib, self.dtype, self.vocab, self.n_layer, self.n_head = lib, dtype, V, len(layers), n_head
        self._keep = [t for _, t in tensors]  # the C side only sees addresses
        ptrs = [None if t is None else t.data_ptr() for layer in layers for t in layer]
        self._params = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self._scales = (ctypes.c_float * len(scales))(*scales)
        a = self.args = _StepArgs()
        a.dtype, a.C, a.inner, a.n_layer, a.vocab, a.n_positions = DTYPES[dtype], C, inner, len(layers), V, wpe.shape[0]
        a.n_head = n_head
        a.wte, a.wpe = wte.data_ptr(), wpe.data_ptr()
        a.unembed = None if unembed is None else unembed.data_ptr()
        self.unembeds = unembed is not None
        a.lnf_w, a.lnf_b = ln_f[0].data_ptr(), ln_f[1].data_ptr()
        a.params = ctypes.cast(self._params, ctypes.c_void_p)
        a.scales = ctypes.cast(self._scales, ctypes.c_void_p)
        a.eps = eps
        self._ref = ctypes.byref(a)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor,
                 past: int, write_positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """fp32 logits (B, V) of one step (without the unembedding: ln_f's output (B, C) in the
        step's dtype): ids (B, 1) and positions (B or 1, 1) int64, mask None or bool (B, past + 1)
        (True = may attend; every row needs a key it may attend), ``kv`` the cache buffer
        (n_layer, 2, B, n_head, max_len, head_dim) in this step's dtype with its last dimension
        contiguous, ``past`` the positions already in it. Writes this token's keys and values at
        position ``past``, or row b's at ``write_positions[b]`` (int64 (B,), each in 0..past: rows
        at different lengths, whose mask hides the positions each must not see); the caller
        advances its length. All on the CPU.

        Raises:
            ValueError: inputs of another type, shape, dtype, device or layout, a full cache, a
                token id or position outside the embeddings, a write position outside 0..past.
        """
        tensors = {"ids": ids, "positions": positions, "kv": kv, "mask": mask, "write_positions": write_positions}
        for name, t in tensors.items():
            if t is None and name in ("mask", "write_positions"):
                continue
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                raise ValueError(f"native decode step: {name} must be a CPU tensor, got "
                                 f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")  # fmt: skip
        if not isinstance(past, int) or isinstance(past, bool) or not 0 <= past < 2**62:
            raise ValueError(f"native decode step: past must be a non-negative int, got {past!r}")
        B = ids.shape[0] if ids.dim() == 2 else -1
        if (ids.dtype != torch.int64 or positions.dtype != torch.int64 or ids.shape != (B, 1)
                or positions.shape not in ((1, 1), (B, 1))):  # fmt: skip
            raise ValueError(f"native decode step: ids (B, 1) and positions (B or 1, 1) must be int64, got "
                             f"{tuple(ids.shape)} {ids.dtype}, {tuple(positions.shape)} {positions.dtype}")  # fmt: skip
        C, nh = self.args.C, self.n_head
        if (kv.dtype != self.dtype or kv.shape != (self.n_layer, 2, B, nh, kv.shape[4], C // nh)
                or kv.stride(-1) != 1):  # fmt: skip
            raise ValueError(f"native decode step: the cache must be ({self.n_layer}, 2, {B}, {nh}, max_len, {C // nh}) "
                             f"{self.dtype} with its last dimension contiguous, got {tuple(kv.shape)} {kv.dtype}")  # fmt: skip
        S = past + 1
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (B, S)):
            raise ValueError(f"native decode step: the mask must be bool ({B}, {S}), got "
                             f"{tuple(mask.shape)} {mask.dtype}")  # fmt: skip
        if write_positions is not None and (write_positions.dtype != torch.int64 or write_positions.shape != (B,)):
            raise ValueError(f"native decode step: write_positions must be int64 ({B},), got "
                             f"{tuple(write_positions.shape)} {write_positions.dtype}")  # fmt: skip
        ids, positions = ids.contiguous(), positions.contiguous()
        mask = None if mask is None else mask.contiguous()
        write_positions = None if write_positions is None else write_positions.contiguous()
        out = torch.empty(B, self.vocab) if self.unembeds else torch.empty(B, self.args.C, dtype=self.dtype)
        a = self.args
        a.B = B
        a.ids, a.positions, a.position_rows = ids.data_ptr(), positions.data_ptr(), positions.shape[0]
        a.kv, a.max_len, a.past = kv.data_ptr(), kv.shape[4], past
        a.kv_l, a.kv_kv, a.kv_b, a.kv_h, a.kv_s = kv.stride()[:5]
        a.mask = None if mask is None else mask.data_ptr()
        a.write_pos = None if write_positions is None else write_positions.data_ptr()
        if self.unembeds:
            a.logits = out.data_ptr()
        else:
            a.hidden = out.data_ptr()
        rc = self.lib.step_fn(self._ref)
        if rc == 0:
            return out
        if rc == -4:
            raise ValueError(f"native decode step: a token id outside 0..{self.vocab - 1} or a position outside "
                             f"0..{a.n_positions - 1} (ids {ids.flatten().tolist()}, positions "
                             f"{positions.flatten().tolist()})")  # fmt: skip
        if rc == -3:
            raise ValueError(f"native decode step: sizes it does not take (batch {B}, past {past}, cache of "
                             f"{kv.shape[4]} positions, write positions "
                             f"{None if write_positions is None else write_positions.tolist()})")  # fmt: skip
        if rc == -2:
            raise MemoryError("the native decode step could not allocate its buffers")
        raise ValueError(f"this build of the native kernel does not serve {self.dtype}")
