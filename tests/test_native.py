"""The native kernel (native.py, native/decode.c): built for this host, exact in fp32 to
float64's tolerance, one rounding in half precision, in torch's OpenMP team, and a fallback
to the other kernels wherever it cannot be built."""

from __future__ import annotations

import itertools

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from minigpt2 import GPT2, fast, kernels, native

LIB = native.library()
needs_native = pytest.mark.skipif(LIB is None, reason="no C compiler with OpenMP here: the native kernel is not built")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.ENV_KERNEL, raising=False)
    monkeypatch.setattr(kernels, "_decisions", {})


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """native.library() recomputed inside the test (environment, cache dir), and again on its
    next use after the test (this teardown runs before monkeypatch's: no call here)."""
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f, in_f", [(24, 40), (20, 64), (8, 16), (37, 200), (3, 5), (2304, 768), (64, 1600), (5, 3001)])
@pytest.mark.parametrize("rows", [1, 2, 3, 11, 64])
def test_native_product_against_float64(dtype: torch.dtype, out_f: int, in_f: int, rows: int) -> None:
    """x W^T + b for inputs short of, and with tails past, the unrolled vectors (gpt2-xl's 1600
    included), one or two rows of x (the one-row kernel) and more (groups of rows: 3, 6 + 5, 8 x
    8), a group's rows of x in one piece or, past what L1 holds, in pieces of the input (1600 at
    11 rows in fp32, at 64 rows in every dtype; 3001 with a tail in its last piece); fp32 within
    fp32 rounding of the sum, half precision rounded once from an fp32 sum."""
    if dtype not in LIB.dtypes:
        pytest.skip(f"this build does not serve {dtype} (no F16C)")
    g = torch.Generator().manual_seed(out_f * 1000 + in_f + rows)
    w = (torch.randn(out_f, in_f, generator=g) * 0.5).to(dtype)
    b = (torch.randn(out_f, generator=g) + 0.3).to(dtype)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    pl = kernels.PreparedLinear("native", w, b, 1)
    got = pl(x)
    assert got.shape == (rows, out_f) and got.dtype == dtype
    want = _reference(x, w, b)
    scale = want.abs().max().item()
    if dtype == torch.float32:
        assert (got.double() - want).abs().max().item() <= 1e-6 * scale
    else:  # one rounding of a sum accurate to fp32: within one unit of the dtype at the value
        eps = torch.finfo(dtype).eps
        assert ((got.double() - want).abs() <= eps * want.abs() + 1e-5 * scale).all()
        assert (got.double() == want.to(dtype).double()).float().mean() >= 0.95  # nearly all correctly rounded
    # no bias; the weight as given ([out, in], contiguous: no copy); native.linear agrees
    assert torch.allclose(kernels.PreparedLinear("native", w, None, 1)(x).double(), _reference(x, w, None),
                          rtol=0, atol=2 * torch.finfo(dtype).eps * scale + 1e-6)  # fmt: skip
    assert pl.weight.data_ptr() == w.data_ptr() and pl.extra_bytes == 0
    direct = native.linear(x, w, b, LIB)  # always the GEMV
    if rows <= kernels.native_rows(dtype, LIB):
        assert torch.equal(direct, got)
    else:  # more rows of native half precision went to torch's GEMM: the same sums, other rounding order
        assert ((direct.double() - want).abs() <= torch.finfo(dtype).eps * want.abs() + 1e-5 * scale).all()


@needs_native
def test_native_linear_checks_its_arguments() -> None:
    w, x, b = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6)
    for args in ((x, w, b.double()), (x.bfloat16(), w, b), (torch.randn(2, 7), w, b), (x, w, torch.randn(5)),
                 (x[0], w, b), (x, w.double(), b.double())):  # fmt: skip
        with pytest.raises(ValueError):
            native.linear(*args, LIB)
    torch.testing.assert_close(native.linear(x.t().contiguous().t(), w, None, LIB), x @ w.t(), rtol=1e-5, atol=1e-5)
    # no inputs: y is the bias, for one row and for a group of rows (the grouped path once
    # divided by a zero count of input pieces there: SIGFPE)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 3, 9):
            got = native.linear(torch.empty(rows, 0, dtype=dtype), torch.empty(6, 0, dtype=dtype), b.to(dtype), LIB)
            assert torch.equal(got, b.to(dtype).expand(rows, 6))


@needs_native
def test_native_conv1d_weight_is_copied_once_and_embedding_shared() -> None:
    """A Conv1D weight ([in, out] stored) is copied to [out, in]; the unembedding's [V, C]
    embedding is read in place in fp32."""
    g = torch.Generator().manual_seed(1)
    conv_w = torch.randn(40, 24, generator=g)  # [in, out]
    pl = kernels.PreparedLinear("native", conv_w.t(), None, 1)
    assert pl.weight.data_ptr() != conv_w.data_ptr() and pl.extra_bytes == conv_w.numel() * 4
    emb = torch.randn(30, 40, generator=g)
    pe = kernels.PreparedLinear("native", emb, None, 1)
    assert pe.weight.data_ptr() == emb.data_ptr() and pe.extra_bytes == 0


@needs_native
def test_native_rejects_bad_input_with_a_clear_error() -> None:
    """A wrong width, dtype or rank is a ValueError naming it, never a read out of bounds."""
    w = torch.randn(16, 32)
    mm = kernels.PreparedLinear("native", w, None, 1).mm
    for bad in (torch.randn(1, 31), torch.randn(32), torch.randn(2, 1, 32), torch.randn(1, 32, device="meta")):
        with pytest.raises(ValueError, match="native kernel"):
            mm(bad)
    with pytest.raises(RuntimeError):  # another dtype goes to torch's product, which says so (autocast aside)
        mm(torch.randn(1, 32).double())
    with pytest.raises(ValueError, match="not available"):
        kernels.PreparedLinear("native", torch.randn(4, 8, dtype=torch.float64), None, 1)


@needs_native
def test_native_runs_on_torchs_openmp_team() -> None:
    """One OpenMP runtime in the process (the library's is torch's), and the thread count is
    torch's: the same results on one thread and on two."""
    assert len(native._openmp_runtimes()) == 1
    w, x = torch.randn(4096, 256), torch.randn(1, 256)
    mm = kernels.PreparedLinear("native", w, None, 1).mm
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mm(x)
        torch.set_num_threads(2)
        two = mm(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is one thread's sum in either case


@needs_native
def test_native_library_is_built_once_per_host_into_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None
) -> None:
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "c2"))
    lib = native.library()
    assert lib is not None and lib.path.parent == tmp_path / "c2" / "native" and lib.path.exists()
    built = lib.path.stat().st_mtime_ns
    native.library.cache_clear()
    again = native.library()
    assert again is not None and again.path == lib.path and again.path.stat().st_mtime_ns == built  # not rebuilt
    assert list(lib.path.parent.glob(".decode.*")) == []  # no temporary left behind


@pytest.mark.parametrize("how", ["env off", "no compiler", "compiler fails"])
def test_without_the_native_kernel_the_others_serve(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None
) -> None:
    """MINIGPT2_NATIVE=0, no compiler, or a compiler that fails: no library, the kernel is not
    available, and choosing a kernel (numpy's BLAS among the candidates again) still works."""
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "c3"))
    if how == "env off":
        monkeypatch.setenv(native.ENV_NATIVE, "0")
    elif how == "no compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
    else:
        monkeypatch.setenv("CC", "false")
        monkeypatch.setattr(native, "_compiler", lambda: ("false", "false 1.0"))
    monkeypatch.setattr(kernels, "_available", {})
    if how == "compiler fails" and len(native._openmp_runtimes()) == 1:  # a build is attempted: it says so
        with pytest.warns(UserWarning, match="building the native kernel"):
            assert native.library() is None
    assert native.library() is None
    assert not kernels.available("native", torch.float32)
    g = torch.Generator().manual_seed(0)
    mats = [(torch.randn(64, 48, generator=g), torch.randn(64, generator=g))]
    seen: list[list[str]] = []
    monkeypatch.setattr(kernels, "_sample", lambda m, c, b, r, inner=None: seen.append(list(c)) or kernels.Sample(
        {k: 1.0 for k in c}, 1.0))  # fmt: skip
    monkeypatch.setattr(kernels, "numpy_blas_threads", lambda: torch.get_num_threads())
    assert kernels.choose("no native", mats, 1) == "plain"
    assert "native" not in seen[-1] and ("numpy" in seen[-1]) == kernels.available("numpy", torch.float32)
    assert not (tmp_path / "c3" / "native").exists() or not any((tmp_path / "c3" / "native").glob("*.so"))


def test_a_cc_that_does_not_run_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """$CC set to a compiler that is not there: a warning naming it (the user asked for it), no
    library; without $CC and without a compiler on PATH: nothing to say."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match="CC='/nonexistent/cc' does not run"):
        assert native._compiler() is None
    monkeypatch.delenv("CC")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native._compiler() is None


def test_a_forced_kernel_that_is_unavailable_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing a kernel this dtype has not here falls back to plain with one warning per process,
    not one per choice (the blocks and the unembedding each asked)."""
    monkeypatch.setattr(kernels, "_warned_unavailable", set())
    monkeypatch.setattr(kernels, "available", lambda name, dtype, device="cpu": name == "plain")
    mats = [(torch.randn(8, 4), None)]
    with kernels.force("mkldnn"):
        with pytest.warns(UserWarning, match="kernel 'mkldnn' is not available") as record:
            assert kernels.choose("blocks", mats, 1) == "plain"
            assert kernels.choose("unembed", mats, 1) == "plain"
    assert len([w for w in record if "is not available" in str(w.message)]) == 1


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_half_precision_generation(make_checkpoint, dtype: torch.dtype) -> None:
    """A half-precision model decoding on the native kernel: every step's logits as the plain
    half-precision model's within half-precision noise, prompts (more than kernels.ROWS rows)
    on torch's half GEMM or the fp32 upcast, never on the GEMV; a padded batch too."""
    if dtype not in LIB.dtypes:
        pytest.skip(f"this build does not serve {dtype}")
    directory, _ = make_checkpoint(seed=31)
    model = GPT2.from_pretrained(directory, dtype=dtype)
    ref = GPT2.from_pretrained(directory)  # fp32
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with kernels.force("native"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        names = fast.kernel_names(model)
    assert names["blocks"] == "native" and names["unembed"] == "native" and names["prefill"] in ("plain", "upcast")
    with torch.no_grad():
        full = ref(out.sequences, attention_mask=torch.cat([mask, mask.new_ones(2, 6)], 1)).float()
    for step, logits in enumerate(out.logits):
        want = full[:, 70 + step - 1]
        assert (logits - want).abs().max() <= 0.05 * want.abs().max()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, nh, S, hs", [(1, 12, 144, 64), (3, 4, 17, 24), (2, 2, 1, 80)])
def test_native_one_token_attention_against_float64(dtype: torch.dtype, B: int, nh: int, S: int, hs: int) -> None:
    """One query against the cache's strided views, with a per-row mask (left padding) or a
    shared one or none: fp32 softmax and sum, rounded once to the dtype."""
    if dtype not in LIB.dtypes:
        pytest.skip(f"this build does not serve {dtype}")
    g = torch.Generator().manual_seed(B * 100 + S)
    cache_k = torch.randn(B, nh, S + 9, hs, generator=g).to(dtype)  # a preallocated cache, S filled
    cache_v = torch.randn(B, nh, S + 9, hs, generator=g).to(dtype)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, 1, 3, nh, hs, generator=g).to(dtype).select(2, 0).transpose(1, 2)  # as fast.py slices q|k|v
    masks = [None, torch.ones(1, 1, 1, S, dtype=torch.bool)]
    if S > 1:
        per_row = torch.ones(B, 1, 1, S, dtype=torch.bool)
        per_row[-1, ..., : S // 2] = False
        masks.append(per_row)
    for mask in masks:
        got = native.one_token_attention(q, k, v, mask, hs**-0.5, LIB)
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                                scale=hs**-0.5)  # fmt: skip
        assert got.shape == (B, nh, 1, hs) and got.dtype == dtype
        tol = 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert ((got.double() - want).abs() <= tol * want.abs().max()).all()


@needs_native
def test_native_attention_edges() -> None:
    """Every key masked: NaN, as torch's softmax over all -inf; bad shapes: ValueError."""
    q, k = torch.randn(1, 2, 1, 16).bfloat16(), torch.randn(1, 2, 5, 16).bfloat16()
    none = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    assert native.one_token_attention(q, k, k, none, 0.25, LIB).isnan().all()
    for args in ((torch.randn(1, 2, 2, 16).bfloat16(), k, k, None), (q, k.float(), k, None), (q, k, k[:, :, :4], None),
                 (q, k, k, torch.ones(1, 1, 1, 4, dtype=torch.bool)), (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), k, None)):  # fmt: skip
        with pytest.raises(ValueError, match="native attention"):
            native.one_token_attention(*args, 0.25, LIB)


@needs_native
def test_half_precision_steps_use_the_native_attention(make_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 decode step run op by op computes its one token's attention natively (prompts keep
    SDPA), and the logits equal those of the Python fp32 attention within bf16 rounding. (Where
    the block products are native the whole step runs in C instead: test_decode_step_*.)"""
    directory, _ = make_checkpoint(seed=32)
    model = GPT2.from_pretrained(directory, dtype=torch.bfloat16)
    monkeypatch.setattr(fast, "build_native_step", lambda *a: None)
    calls: list[int] = []
    real = native.one_token_attention
    monkeypatch.setattr(native, "one_token_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    assert calls and set(calls) == {1} and len(calls) == 3 * model.config.n_layer  # 3 steps after the prompt
    monkeypatch.setattr(native, "library", lambda: None)  # the Python attention
    ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_gelu_in_place_and_correctly_rounded(dtype: torch.dtype) -> None:
    """The tanh GELU in place: within one unit of the dtype of the float64 function everywhere,
    correctly rounded at least as often as torch's own fused GELU; odd sizes, extremes."""
    if dtype not in LIB.dtypes:
        pytest.skip(f"this build does not serve {dtype}")
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(70001, generator=g) * 3).to(dtype)  # more than the parallel threshold, not a multiple of 256
    x[:6] = torch.tensor([0.0, -0.0, 60.0, -60.0, 1e-3, -5.0]).to(dtype)
    # float64 as x sigmoid(2u) (= 0.5 x (1 + tanh u)): float64's own 1 + tanh(u) cancels to 0 for
    # x < -7, where the function is ~1e-16
    xd = x.double()
    exact = xd * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))
    torch_rounded = torch.nn.functional.gelu(x, approximate="tanh")
    y = x.clone()
    assert native.gelu_tanh_(y, LIB) is y
    fi = torch.finfo(dtype)  # (results under 1e-36, x < -10, may flush to zero)
    assert ((y.double() - exact).abs() <= fi.eps * (exact.abs() + fi.smallest_normal) + 1e-36).all()  # subnormals
    assert (y == exact.to(dtype)).float().mean() >= (torch_rounded == exact.to(dtype)).float().mean()
    assert y[2] == x[2] and y[3] == 0 and y[0] == 0  # large x: x; large -x: 0
    small = x[:100].clone()  # below the parallel threshold
    assert torch.equal(native.gelu_tanh_(small, LIB), y[:100])
    for bad in (torch.randn(8), torch.randn(4, 6).to(dtype).t()):
        with pytest.raises(ValueError, match="native GELU"):
            native.gelu_tanh_(bad, LIB)


@needs_native
def test_half_precision_prompts_and_steps_use_the_native_gelu_where_it_is_fast(make_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, _ = make_checkpoint(seed=33)
    model = GPT2.from_pretrained(directory, dtype=torch.bfloat16)
    calls: list[int] = []
    real = native.gelu_tanh_
    monkeypatch.setattr(native, "gelu_tanh_", lambda x, lib: calls.append(x.shape[0]) or real(x, lib))
    ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(2))
    with kernels.force("native"):
        model.generate(ids, max_new_tokens=3, min_new_tokens=3)
        in_generate = list(calls)
        with torch.inference_mode():
            dec = fast.decoder(model, 1)
            cache = model.make_cache(1, 72)
            dec.hidden(ids, torch.arange(70)[None], None, cache)
            calls.clear()
            dec.hidden(ids[:, -1:], torch.tensor([[70]]), None, cache)  # a step op by op
    if native.fast_gelu(LIB, torch.bfloat16):
        assert 70 in in_generate  # the prompt's rows
        assert calls == [1] * model.config.n_layer  # (generate's steps ran whole in C: see test_decode_step_*)
    else:
        assert in_generate == calls == []


@needs_native
def test_native_prepared_product_checks_its_bias() -> None:
    """A bias of another dtype or length is a ValueError when the product is prepared, before any
    pointer reaches C (it would read past the bias)."""
    w = torch.randn(64, 48)
    for b in (torch.randn(64).bfloat16(), torch.randn(3), torch.randn(64, 1)):
        with pytest.raises(ValueError, match="bias"):
            kernels.PreparedLinear("native", w, b, 1)


@needs_native
def test_native_under_autocast(make_checkpoint) -> None:
    """An fp32 model on the native kernel generating under CPU bf16 autocast: activations that
    autocast turned bf16 go through torch's product (what the plain kernel does), and a kernel
    check run under autocast does not mark the kernel unavailable."""
    directory, _ = make_checkpoint(seed=34)
    model = GPT2.from_pretrained(directory)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels._check("native", torch.float32, torch.device("cpu"))
        with kernels.force("native"):
            out = model.generate(ids, max_new_tokens=4, min_new_tokens=4)
        with kernels.force("plain"):
            ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4)
    assert out.shape == ref.shape == (1, 14) and torch.equal(out[:, :10], ids)


@needs_native
def test_native_attention_and_gelu_reject_other_devices() -> None:
    q = torch.randn(1, 2, 1, 16).bfloat16()
    with pytest.raises(ValueError, match="CPU"):
        native.one_token_attention(q.to("meta"), q.to("meta"), q.to("meta"), None, 0.25, LIB)
    with pytest.raises(ValueError, match="CPU"):
        native.gelu_tanh_(torch.randn(4).bfloat16().to("meta"), LIB)


def test_a_bad_cached_library_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None) -> None:
    """A truncated file under the library's name (a crash mid-copy, a full disk) is rebuilt once,
    not taken as 'no native kernel here' for good; the built file is readable by others."""
    if LIB is None:
        pytest.skip("no C compiler with OpenMP here")
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "c4"))
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags of a host this process never loaded")  # a new name
    built = native.library_file()
    assert built is not None
    path = built[1]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    lib = native.library()
    assert lib is not None and lib.path == path and path.stat().st_size > 1000
    assert path.stat().st_mode & 0o755 == 0o755


def _max_cases() -> list[torch.Tensor]:
    """Rows that torch.max's conventions decide: ties, NaN, +-inf, signed zeros, all -inf; row
    lengths around the vector widths (1, 8, 16 lanes) and GPT-2's vocabulary."""
    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(3)
    special = [[1.0, nan, 3.0, nan], [-inf] * 4, [2.0, 5.0, 5.0, 1.0], [inf, 1.0, inf, nan], [-0.0, 0.0, -0.0, 0.0],
               [0.0, -0.0, 0.0, 0.0]]  # fmt: skip
    cases = [
        torch.tensor(special), torch.full((2, 37), nan), torch.full((2, 200), -inf), torch.randn(3, 1, generator=g),
        torch.randn(2, 130, generator=g).round(),  # many ties
    ]
    for n in (7, 8, 9, 15, 16, 17, 31, 33, 1000, 50257):
        x = torch.randn(6, n, generator=g)
        x[1, -1] = 9.0  # the maximum in the last lane (or the tail)
        x[2, n // 2 :] = 9.0  # ties from the middle on
        x[3, n - 1] = nan  # a NaN at the very end
        x[4].fill_(-0.0)
        x[4, n // 3] = 0.0  # +0 after -0s: equal, so the first (-0) wins
        x[5, n // 2] = inf
        x[5, 0] = inf
        cases.append(x)
    return cases


def _assert_max_rows_is_torch_max(lib: native.Library, label: str = "") -> None:
    for x in _max_cases():
        values, indices = lib.max_rows(x)
        want_v, want_i = torch.max(x, dim=-1)
        assert indices.dtype == torch.int64 and values.dtype == torch.float32
        assert torch.equal(indices, want_i), (label, x.shape, indices, want_i)
        same = (values == want_v) | (values.isnan() & want_v.isnan())
        assert same.all() and torch.equal(values.signbit(), want_v.signbit()), (label, values, want_v)


@needs_native
def test_native_max_rows_is_torch_max() -> None:
    """Greedy's argmax (fast.max_last): torch.max's values and first indices on every convention
    (ties, NaN, signed zeros, all -inf); bad input is a ValueError, not a crash."""
    _assert_max_rows_is_torch_max(LIB)
    for bad in (torch.zeros(2, 0), torch.zeros(4), torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(8, 2).t()):
        with pytest.raises(ValueError, match="max_rows takes a contiguous"):
            LIB.max_rows(bad)


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v2", "ivybridge", "x86-64-v3", "x86-64-v4", "x86-64-v4 -mavx512bf16"])
def test_the_source_builds_for_every_x86_level(march: str, tmp_path: Path) -> None:
    """What other hosts' -march=native gives: plain C (no AVX), F16C without AVX2 (Ivy Bridge),
    AVX2 + FMA, AVX-512, AVX-512 with bf16 dot products (Zen 4 and later, Sapphire Rapids); each
    build compiles without warnings and reports its vector width, dtypes (fp16 only with F16C)
    and bf16 dot products; where this CPU can run it, its products and attention are right."""
    import ctypes
    import subprocess

    built = native.library_file() if native.platform.machine().lower() in ("x86_64", "amd64") else None
    if built is None:
        pytest.skip("no C compiler here")
    out = tmp_path / f"{march}.so"
    flags = [g for f in native.FLAGS for g in (f"-march={march}".split() if f == "-march=native" else [f])]
    cmd = [*native.shlex.split(built[0]), *flags, "-Wall", "-Wextra", "-Werror", str(native.SOURCE), "-o", str(out), "-lm"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    lib = ctypes.CDLL(str(out))
    lanes, dtypes = lib.minigpt2_lanes(), lib.minigpt2_dtypes()
    assert lanes == {"x86-64": 1, "x86-64-v2": 1, "ivybridge": 1, "x86-64-v3": 8}.get(march, 16)
    assert dtypes & 0b011 == 0b011 and bool(dtypes & 0b100) == (march != "x86-64" and march != "x86-64-v2")
    assert lib.minigpt2_bf16_dot() == ("avx512bf16" in march)
    # Where this CPU can run the build, its products against float64 (a host of that level runs
    # these paths: this one may not otherwise): one row, and groups of rows (3; 7 + 7)
    needs = {"x86-64-v3": {"avx2", "fma", "f16c"}, "x86-64-v4": {"avx512f", "avx512bw", "avx512dq", "avx512vl"},
             "ivybridge": {"avx", "f16c"}}.get(march, set())  # fmt: skip
    if "avx512bf16" in march:
        needs = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"}
    if not needs <= set(native._cpu_flags().split()):
        return
    fn = lib.minigpt2_linear
    fn.argtypes, fn.restype = LIB.fn.argtypes, ctypes.c_int
    g = torch.Generator().manual_seed(7)
    for dtype, code in native.DTYPES.items():
        for (out_f, in_f), rows in itertools.product([(37, 200), (64, 1600)], [1, 3, 14]):
            w = torch.randn(out_f, in_f, generator=g).to(dtype)
            b, x = torch.randn(out_f, generator=g).to(dtype), torch.randn(rows, in_f, generator=g).to(dtype)
            y = torch.full((rows, out_f), float("nan"), dtype=dtype)
            rc = fn(code, w.data_ptr(), b.data_ptr(), x.data_ptr(), y.data_ptr(), rows, out_f, in_f)
            if not dtypes >> code & 1:
                assert rc == -1
                continue
            want = _reference(x, w, b)
            tol = (1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps) * want.abs().max().item()
            assert rc == 0 and (y.double() - want).abs().max().item() <= tol, (march, dtype, out_f, rows)
    # one token's attention (keys 8 at a time and the rest; 8, 4, 1 vectors of the output), and
    # the GELU (vectorized: fast_gelu uses it in every vector build)
    built_lib = native.Library(lib, out)
    for dtype in built_lib.dtypes - {torch.float32}:
        x = torch.linspace(-12, 12, 4001).to(dtype).double()
        want = x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))  # as in the test above
        got = native.gelu_tanh_(x.to(dtype), built_lib).double()
        fi = torch.finfo(dtype)
        assert ((got - want).abs() <= fi.eps * (want.abs() + fi.smallest_normal) + 1e-36).all(), (march, dtype)
    _assert_max_rows_is_torch_max(built_lib, march)
    for dtype in built_lib.dtypes:
        for B, nh, S, hs in ((2, 3, 21, 80), (1, 2, 8, 64)):
            k, v = (torch.randn(B, nh, S + 3, hs, generator=g).to(dtype)[:, :, :S] for _ in range(2))
            q = torch.randn(B, nh, 1, hs, generator=g).to(dtype)
            mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
            mask[-1, ..., : S // 2] = False
            got = native.one_token_attention(q, k, v, mask, hs**-0.5, built_lib)
            want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                                    scale=hs**-0.5)  # fmt: skip
            tol = 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
            assert ((got.double() - want).abs() <= tol * want.abs().max()).all(), (march, dtype, S, hs)


def test_a_cut_off_cached_library_is_built_again_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            fresh_library: None) -> None:  # fmt: skip
    """A cached library cut short (a full disk, a partial copy of the cache) is rebuilt before the
    loader sees it: loading one killed the process with SIGBUS, every run, with no message."""
    if LIB is None:
        pytest.skip("no C compiler with OpenMP here")
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "c5"))
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags of another host never loaded here")  # a new name
    cc, path = native.library_file()
    assert native._compile(cc, path) and native._complete_elf(path)
    whole = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(whole // 2)
    assert not native._complete_elf(path)
    lib = native.library()
    assert lib is not None and lib.path == path and path.stat().st_size == whole


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_native_switched_off(value: str, monkeypatch: pytest.MonkeyPatch, fresh_library: None) -> None:
    monkeypatch.setenv(native.ENV_NATIVE, value)
    assert native.library() is None


def test_a_failed_build_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None) -> None:
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "c6"))
    monkeypatch.setattr(native, "_compiler", lambda: ("false", "false 1.0"))
    if len(native._openmp_runtimes()) != 1:
        pytest.skip("torch runs no OpenMP runtime known here: no build is attempted")
    with pytest.warns(UserWarning, match="building the native kernel with 'false'"):
        assert native.library() is None


# ------------------------------------------------------------------ the whole decode step in C
def _step_model(make_checkpoint, dtype: torch.dtype, **config) -> GPT2:
    directory, _ = make_checkpoint(seed=41, **config)
    return GPT2.from_pretrained(directory, dtype=dtype)


def _half_ulps(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}[dtype]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["one row", "padded rows", "odd head size", "unembedding on plain"])
def test_decode_step_is_the_op_by_op_step(make_checkpoint, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                          threads: int, case: str) -> None:  # fmt: skip
    """Whole steps in C give the op-by-op step's logits and cache contents: in half precision
    the same roundings at the same places (equal but for a rare last-bit difference of a layer
    norm), in fp32 within fp32 rounding; with padded rows (a mask), a head size that is not a
    multiple of the vectors (12) and per-layer attention scales, with the unembedding on another
    kernel (the step then ends with ln_f), on one thread and on two."""
    if dtype not in LIB.dtypes:
        pytest.skip(f"this build does not serve {dtype} (no F16C)")
    config = dict(n_embd=48, n_head=4, n_layer=3, scale_attn_by_inverse_layer_idx=True) if case == "odd head size" else {}
    model = _step_model(make_checkpoint, dtype, **config)
    B, T = (1, 7) if case == "one row" else (3, 7)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    mask = None
    if case == "padded rows":
        mask = torch.ones(B, T + 6, dtype=torch.long)
        mask[0, :3] = 0
        mask[2, :1] = 0
    calls = []
    real = native.DecodeStep.__call__
    monkeypatch.setattr(native.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with kernels.force("native"), torch.inference_mode():
            dec = fast.decoder(model, B)
            if case == "unembedding on plain":
                p = fast.prepare(model, B)
                p.unembed, p.unembed_kernel = kernels.PreparedLinear("plain", model.lm_head.weight, None, B), "plain"
                dec = fast.Decoder(model, p)
            assert dec is not None and dec.native_step is not None
            assert dec.native_step.unembeds == (case != "unembedding on plain")
            caches = [model.make_cache(B, T + 6), model.make_cache(B, T + 6)]
            positions = torch.arange(T)[None] if mask is None else (mask[:, :T].cumsum(-1) - 1).clamp(min=0)
            for c in caches:
                dec(ids, positions, None if mask is None else mask[:, :T], c)
            tok = ids[:, -1:]
            for i in range(6):
                m = None if mask is None else mask[:, : T + i + 1]
                pos = positions[:, -1:] + i + 1
                want = dec.logits(dec.hidden(tok, pos, m, caches[0]))
                got = dec(tok, pos, m, caches[1])
                assert got.dtype == torch.float32 and got.shape == (B, V)
                tol = _half_ulps(dtype) * want.abs().max().item()
                assert (got - want).abs().max().item() <= tol, f"step {i}"
                tok = want.argmax(-1, keepdim=True)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 6 and caches[0].length == caches[1].length == T + 6
    k0, k1 = caches[0].kv.float(), caches[1].kv.float()
    assert (k0 - k1).abs().max().item() <= _half_ulps(dtype) * k0.abs().max().item()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_batch_tiles_in_pieces_match_the_models_forward(make_checkpoint, monkeypatch: pytest.MonkeyPatch,
                                                                     dtype: torch.dtype) -> None:  # fmt: skip
    """Eight rows through a 2048-wide MLP: the step's batch tiles cut mlp.c_proj's input in
    pieces (8 rows of 2048 inputs are past the 24 KB of x a tile keeps in L1, in fp32 and in
    bf16) and add up their sums. The logits of whole C steps match the model's own forward over
    the same tokens (torch's products; the step test above compares against op-by-op steps on the
    same native kernel): fp32 within fp32 rounding, bf16 within its noise, where a lost or doubled
    piece is off by the size of the logits."""
    model = _step_model(make_checkpoint, dtype, n_inner=2048)
    B, T, V = 8, 5, model.config.vocab_size
    ids = torch.randint(0, V, (B, T + 3), generator=torch.Generator().manual_seed(5))
    calls = []
    real = native.DecodeStep.__call__
    monkeypatch.setattr(native.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    with kernels.force("native"), torch.inference_mode():
        dec = fast.decoder(model, B)
        assert dec is not None and dec.native_step is not None
        cache = model.make_cache(B, T + 3)
        dec(ids[:, :T], torch.arange(T)[None], None, cache)
        got = [dec(ids[:, i : i + 1], torch.tensor([[i]]), None, cache) for i in range(T, T + 3)]
    assert len(calls) == 3
    with kernels.force("plain"), torch.inference_mode():
        want = model(ids)[:, T:]
    for i, g in enumerate(got):
        tol = (1e-5 if dtype == torch.float32 else 0.05) * want[:, i].abs().max().item()
        assert (g - want[:, i]).abs().max().item() <= tol, f"step {i}"


@needs_native
def test_decode_step_generates_transformers_tokens(make_checkpoint) -> None:
    """fp32 greedy and sampled generation through whole C steps: the tokens of transformers."""
    directory, hf = make_checkpoint(seed=42)
    model = GPT2.from_pretrained(directory)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with kernels.force("native"):
        with torch.inference_mode():
            assert fast.decoder(model, 1).native_step is not None
        for sample in (False, True):
            torch.manual_seed(5)
            ours = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=sample, top_k=0)
            torch.manual_seed(5)
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                                 do_sample=sample, top_k=0, pad_token_id=0)  # fmt: skip
            assert torch.equal(ours, theirs), sample


@needs_native
def test_decode_step_refuses_what_it_cannot_read(make_checkpoint) -> None:
    """Bad ids, positions, caches and masks are ValueErrors naming the value, before C reads past
    a tensor; under autocast the Decoder runs the step op by op (autocast's dtypes, not the C
    step's)."""
    model = _step_model(make_checkpoint, torch.float32)
    c = model.config
    with kernels.force("native"), torch.inference_mode():
        dec = fast.decoder(model, 1)
        step = dec.native_step
        cache = model.make_cache(1, 4)
        one = torch.tensor([[1]])
        with pytest.raises(ValueError, match="token id"):
            step(torch.tensor([[c.vocab_size]]), torch.tensor([[0]]), None, cache.kv, 0)
        with pytest.raises(ValueError, match="token id"):
            step(torch.tensor([[-1]]), torch.tensor([[0]]), None, cache.kv, 0)
        with pytest.raises(ValueError, match="position"):
            step(one, torch.tensor([[c.n_positions]]), None, cache.kv, 0)
        with pytest.raises(ValueError, match="cache of 4 positions"):
            step(one, torch.tensor([[4]]), None, cache.kv, 4)
        with pytest.raises(ValueError, match="the cache must be"):
            step(one, torch.tensor([[0]]), None, cache.kv.bfloat16(), 0)
        with pytest.raises(ValueError, match="the mask must be"):
            step(one, torch.tensor([[0]]), torch.ones(1, 3, dtype=torch.bool), cache.kv, 0)
        with pytest.raises(ValueError, match="int64"):
            step(one.int(), torch.tensor([[0]]), None, cache.kv, 0)
        with pytest.raises(ValueError, match="ids"):
            step(torch.tensor(1), torch.tensor([[0]]), None, cache.kv, 0)
        with pytest.raises(ValueError, match="the cache must be"):  # one k|v slot: C would write past it
            step(one, torch.tensor([[0]]), None, cache.kv[:, :1].contiguous(), 0)
        split = cache.kv.view(c.n_layer, 2, 1, c.n_head // 2, 4, c.head_dim * 2)
        with pytest.raises(ValueError, match="the cache must be"):  # the same bytes as other heads
            step(one, torch.tensor([[0]]), None, split, 0)
        with pytest.raises(ValueError, match="ids must be a CPU tensor"):
            step(one.to("meta"), torch.tensor([[0]]), None, cache.kv, 0)
        with pytest.raises(ValueError, match="ids must be a CPU tensor, got list"):
            step([[1]], torch.tensor([[0]]), None, cache.kv, 0)
        for past in (1.5, -1, 2**64, True):
            with pytest.raises(ValueError, match="past must be"):
                step(one, torch.tensor([[0]]), None, cache.kv, past)
        with pytest.raises(ValueError, match="write positions"):
            step(one, torch.tensor([[1]]), None, cache.kv, 1, torch.tensor([2]))
        with pytest.raises(ValueError, match="write_positions must be"):
            step(one, torch.tensor([[1]]), None, cache.kv, 1, torch.tensor([0, 1]))
        assert cache.length == 0
        calls = []
        dec.native_step = type("Spy", (), {"dtype": torch.float32, "unembeds": True, "__call__": lambda self, *a: calls.append(a)})()
        dec(one, torch.tensor([[0]]), None, model.make_cache(1, 4))
        assert len(calls) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dec(one, torch.tensor([[0]]), None, model.make_cache(1, 4))
        assert len(calls) == 1  # under autocast: op by op


@needs_native
def test_decode_step_only_where_every_step_product_is_native(make_checkpoint) -> None:
    """No whole C step for another kernel, another activation or differing layer norm epsilons:
    those steps run op by op."""
    model = _step_model(make_checkpoint, torch.float32)
    with torch.inference_mode():
        with kernels.force("plain"):
            assert fast.decoder(model, 1).native_step is None
        with kernels.force("native"):
            assert fast.decoder(model, 1).native_step is not None
            relu = _step_model(make_checkpoint, torch.float32, activation_function="relu")
            assert fast.decoder(relu, 1).native_step is None
            model.transformer.h[0].ln_2.eps = 1e-6
            fast.release(model)
            assert fast.decoder(model, 1).native_step is None


@needs_native
def test_decode_step_with_the_servers_rows_at_different_positions(make_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's slot cache: rows at different lengths in one step, each writing its keys and
    values at its own position, give each row's own logits through the whole C step."""
    from minigpt2.serve.model_runner import ModelRunner

    model = _step_model(make_checkpoint, torch.float32)
    calls = []
    real = native.DecodeStep.__call__
    monkeypatch.setattr(native.DecodeStep, "__call__", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
    tokens = [100, 200, 300, 400]
    with kernels.force("native"):
        runner = ModelRunner(model, 4)
        for slot, p in enumerate(prompts):
            runner.prefill(slot, p)
        batched = runner.decode(tokens, [len(p) for p in prompts])
        again = runner.decode([1, 2, 3, 4], [len(p) + 1 for p in prompts])  # the keys written above are read
    rows = [c.tolist() for c in calls if c is not None]  # (the one-token prompt's prefill is a step too)
    assert rows == [[3, 6, 1, 4], [4, 7, 2, 5]]  # the write positions reached the step
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + [tokens[b], b + 1]]))[0]
            for got, want in ((batched[b], alone[-2]), (again[b], alone[-1])):
                assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
