"""Weight copies on huge pages (hugepages.py): the same values as torch's copies, where the
kernel was asked to back them with 2 MiB pages, and generation unchanged by it."""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path

import pytest
import torch

from minigpt2 import GPT2, GPT2Config, fast, hugepages, kernels, native

needs_thp = pytest.mark.skipif(
    not hugepages.enabled(),
    reason="no transparent huge pages here (not Linux, or THP never)",
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.ENV_KERNEL, raising=False)
    monkeypatch.delenv(hugepages.ENV_HUGE_PAGES, raising=False)
    monkeypatch.setattr(kernels, "_decisions", {})


def _mapping(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding ``address``."""
    fields: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            # a mapping's first line is "start-end perms ...", its fields "Name: value"
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                if fields is not None:
                    return fields
                fields = {} if start <= address < end else None
            elif fields is not None:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    if fields is None:
        raise AssertionError(f"no mapping holds {address:#x}")
    return fields


def test_copies_equal_torch_copies_in_every_layout_and_dtype() -> None:
    arena = hugepages.Arena()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(700, 900, generator=g)  # 2.5 MB
    for src, dtype in (
        (w.t(), None),
        (w, None),
        (w[:, ::2], None),
        (w.bfloat16().t(), None),
        (w.bfloat16(), torch.float32),
    ):
        out = arena.copy(src, dtype)
        assert out.is_contiguous() and out.shape == src.shape
        assert out.dtype == (dtype or src.dtype)
        assert out.data_ptr() % hugepages.ALIGN == 0
        assert torch.equal(out, src.to(out.dtype))
        assert out.data_ptr() != src.data_ptr()
    n = w.numel()
    assert arena.huge_bytes == (
        (4 * n + 4 * n + 4 * n // 2 + 2 * n + 4 * n) if hugepages.enabled() else 0
    )


def test_copies_do_not_overlap_and_outlive_the_arena(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        hugepages, "CHUNK", 4 << 20
    )  # so the third copy opens a second chunk
    arena = hugepages.Arena()
    srcs = [torch.full((512, 768), float(i)).t() for i in range(3)]  # 1.5 MB each
    outs = [arena.copy(s) for s in srcs]
    del arena
    for i, out in enumerate(outs):
        out.add_(1)  # a copy written through must not reach another
    for i, out in enumerate(outs):
        assert torch.equal(out, torch.full((768, 512), i + 1.0))
    spans = sorted((o.data_ptr(), o.data_ptr() + o.numel() * 4) for o in outs)
    assert all(
        a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans)
    )


def _vmstat(name: str) -> int:
    with open("/proc/vmstat") as f:
        return next((int(line.split()[1]) for line in f if line.split()[0] == name), 0)


@needs_thp
def test_copies_are_on_huge_pages() -> None:
    fallbacks = _vmstat("thp_fault_fallback")
    arena = hugepages.Arena()
    out = arena.copy(torch.randn(1024, 1024).t())
    assert (
        out.data_ptr() % hugepages.huge_page_bytes() == 0
    )  # the first copy opens a chunk: on a huge page
    fields = _mapping(out.data_ptr())
    assert "hg" in fields["VmFlags"].split()  # MADV_HUGEPAGE took
    if int(fields["AnonHugePages"].split()[0]) == 0:
        # advised but not huge: only acceptable where the kernel had no free huge page
        assert _vmstat("thp_fault_fallback") > fallbacks, (
            "advised memory written without huge pages"
        )
        pytest.skip("the kernel had no free huge page")


@needs_thp
def test_chunks_are_fresh_memory_even_in_deterministic_mode() -> None:
    """torch fills new tensors in deterministic mode; a chunk from torch's allocator would be
    written (all of it resident, on small pages) before the advice."""
    torch.use_deterministic_algorithms(True)
    try:
        arena = hugepages.Arena()
        out = arena.copy(torch.randn(1024, 300))  # 1.2 MB in an 8 MiB chunk
    finally:
        torch.use_deterministic_algorithms(False)
    assert arena.reserved == hugepages.FIRST_CHUNK
    rss_kb = int(_mapping(out.data_ptr())["Rss"].split()[0])
    assert (
        rss_kb <= hugepages.huge_page_bytes() // 1024
    )  # the one page written, not the chunk


def test_chunks_grow_by_doubling(monkeypatch: pytest.MonkeyPatch) -> None:
    arena = hugepages.Arena()
    big = torch.zeros(3 << 20, dtype=torch.uint8)  # 3 MiB
    outs = [arena.copy(big) for _ in range(8)]  # 24 MiB: chunks of 8, 8, 16 MiB
    if hugepages.enabled():
        assert arena.reserved == 32 << 20
    assert all(torch.equal(o, big) for o in outs)


def test_small_tensors_and_the_switch_use_torchs_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arena = hugepages.Arena()
    small = torch.randn(100, 100).t()
    out = arena.copy(small)
    assert torch.equal(out, small) and out.is_contiguous() and arena.huge_bytes == 0
    monkeypatch.setenv(hugepages.ENV_HUGE_PAGES, "off")
    assert not hugepages.enabled()
    big = torch.randn(1024, 1024).t()
    out = arena.copy(big)
    assert torch.equal(out, big) and arena.huge_bytes == 0
    assert hugepages.collapse([torch.randn(1024, 1024)]) == 0


def test_nothing_is_advised_where_madvise_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hugepages, "_madvise", lambda: None)  # as on macOS or Windows
    assert not hugepages.enabled()
    arena = hugepages.Arena()
    big = torch.randn(1024, 1024).t()
    assert torch.equal(arena.copy(big), big) and arena.huge_bytes == 0


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int(release[1].split("-")[0])) >= (major, minor)


def test_collapse_keeps_values_and_addresses_and_makes_huge_pages() -> None:
    t = torch.randn(12 << 20)  # 48 MB: its own mapping, many whole huge pages inside
    before, ptr, version = t.clone(), t.data_ptr(), t._version
    failed = _vmstat("thp_collapse_alloc_failed")
    done = hugepages.collapse([t, t[1:]])  # the same storage twice: advised once
    assert t.data_ptr() == ptr and t._version == version and torch.equal(t, before)
    start, nbytes = hugepages._aligned_span(t)
    huge = hugepages.huge_page_bytes()
    assert start % huge == 0 and ptr <= start and start + nbytes <= ptr + t.numel() * 4
    assert nbytes >= 48 * 2**20 - 2 * huge
    if not hugepages.enabled():
        assert done == 0
        return
    assert "hg" in _mapping(start)["VmFlags"].split()
    if (
        done == 0
    ):  # refused: only where the kernel cannot (before 6.1) or had no huge pages
        assert (
            not _kernel_at_least(6, 1) or _vmstat("thp_collapse_alloc_failed") > failed
        )
        pytest.skip("the kernel did not collapse")
    assert done == nbytes
    assert int(_mapping(start)["AnonHugePages"].split()[0]) * 1024 >= nbytes


@needs_thp
def test_prepare_collapses_the_unembedding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        hugepages, "COLLAPSE_MIN_BYTES", 0
    )  # this model's embedding is only 8 MB
    model = _model(torch.float32, vocab_size=8000)
    E = model.lm_head.weight
    start, nbytes = hugepages._aligned_span(E)
    assert nbytes > 0
    assert "hg" not in _mapping(start)["VmFlags"].split()
    fast.prepare(model, 1)
    assert "hg" in _mapping(start)["VmFlags"].split()


def test_collapse_skips_small_and_other_device_tensors() -> None:
    assert (
        hugepages.collapse([torch.randn(1024, 1024)]) == 0
    )  # 4 MB: it may sit in malloc's heap
    assert hugepages.collapse([torch.randn(1024, 1024, device="meta")]) == 0


def _model(dtype: torch.dtype, vocab_size: int = 3000) -> GPT2:
    torch.manual_seed(0)
    m = GPT2(
        GPT2Config(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=256,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    with torch.no_grad():  # biases and norms off their zeros and ones
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.to(dtype)


@pytest.mark.skipif(
    native.library() is None,
    reason="no C compiler with OpenMP here: the native kernel is not built",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_is_the_same_with_and_without_huge_pages(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native kernel's copies of the block matrices go into an arena; the tokens and scores
    are those of the same kernel on torch's copies, bit for bit."""
    ids = torch.randint(0, 3000, (2, 7), generator=torch.Generator().manual_seed(1))
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(hugepages.ENV_HUGE_PAGES, switch)
        model = _model(dtype)
        with kernels.force("native"):
            out = model.generate(
                ids,
                max_new_tokens=12,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            p = fast.prepare(model, 2)
        assert p.block_kernel == "native"
        copies = [pl.weight for pl in p.blocks]
        assert all(c.is_contiguous() for c in copies)
        # the copies of MIN_BYTES or more (bf16 attn.c_proj, 256 x 256, is under it)
        if switch == "1" and hugepages.enabled():
            big = [
                c for c in copies if c.numel() * c.element_size() >= hugepages.MIN_BYTES
            ]
            assert len(big) >= 4 and all(
                _mapping(c.data_ptr()).get("THPeligible") == "1" for c in big
            )
        runs[switch] = out
    assert torch.equal(runs["1"].sequences, runs["0"].sequences)
    for a, b in zip(runs["1"].scores, runs["0"].scores):
        assert torch.equal(a, b)


@pytest.mark.parametrize("inner", ["plain", "transposed"])
def test_upcast_keeps_its_fp32_copy_in_the_arena(inner: str) -> None:
    w = torch.randn(512, 768).bfloat16()
    arena = hugepages.Arena()
    pl = kernels.PreparedLinear("upcast", w.t().t(), None, 1, inner=inner, arena=arena)
    x = torch.randn(1, 768).bfloat16()
    assert torch.equal(pl.mm(x), (x.float() @ w.float().t()).bfloat16())
    # plain reads the fp32 copy as it is; transposed makes its own copy of it: one copy either way
    assert arena.huge_bytes == (w.numel() * 4 if hugepages.enabled() else 0)


def test_decisions_are_kept_apart_by_page_size(monkeypatch: pytest.MonkeyPatch) -> None:
    on = kernels.decision_key("blocks", [(768, 768)], torch.float32, 1)
    monkeypatch.setenv(hugepages.ENV_HUGE_PAGES, "0")
    off = kernels.decision_key("blocks", [(768, 768)], torch.float32, 1)
    assert "small pages" in off
    assert (on != off) == (
        hugepages._madvise() is not None
        and hugepages._thp_mode() in ("always", "madvise")
    )


@pytest.mark.parametrize(
    ("value", "on"),
    [
        ("0", False),
        (" Off ", False),
        ("no", False),
        ("1", True),
        ("yes", True),
        ("", True),
    ],
)
def test_the_switch_reads_on_and_off(
    value: str, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(hugepages.ENV_HUGE_PAGES, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hugepages.enabled() == (
            on
            and hugepages._madvise() is not None
            and hugepages._thp_mode() in ("always", "madvise")
        )


def test_a_value_neither_on_nor_off_warns_and_stays_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(hugepages.ENV_HUGE_PAGES, "garbage")
    hugepages._warn_value.cache_clear()
    with pytest.warns(
        UserWarning, match="MINIGPT2_HUGE_PAGES='garbage' is neither on.*counted as on"
    ):
        state = hugepages.enabled()
    assert state == (
        hugepages._madvise() is not None
        and hugepages._thp_mode() in ("always", "madvise")
    )


def test_an_arena_without_address_space_copies_into_torchs_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_space(nbytes: int) -> torch.Tensor:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages, "_chunk", no_space)
    w = torch.randn(1024, 1024)
    out = hugepages.Arena().copy(w.t())
    assert torch.equal(out, w.t()) and out.is_contiguous()


def test_pages_larger_than_max_huge_are_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        hugepages, "huge_page_bytes", lambda: 512 << 20
    )  # arm64 with 64 KiB pages
    assert not hugepages.enabled()
    arena = hugepages.Arena()
    w = torch.randn(1024, 1024)
    assert (
        torch.equal(arena.copy(w), w) and arena.huge_bytes == 0 and arena.reserved == 0
    )
