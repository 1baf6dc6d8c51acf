"""minigpt2 against transformers and the CPU engines a user would pick instead, in one process.

    python scripts/bench.py --json bench.json    # the full report (~20 min on 2 cores)
    python scripts/bench.py --quick              # a short smoke run (fewer tokens, one run)
    python scripts/bench.py --size medium        # medium / large / xl shapes for the main table
    python scripts/bench.py --skip-peers --skip-xl --plot out.png

The full report, one random-weight checkpoint of the 124M shape unless said:

1. the main table: minigpt2 against transformers (decode at batch 1 and 8 in fp32 and
   bf16, sampling, long context, prefill, kernels, memory, training);
2. the peers (``--skip-peers`` to leave out): ONNX Runtime on a torch.onnx export and
   llama.cpp (llama-cpp-python) on a GGUF converted by llama.cpp's own script, on the same
   weights, batch 1, each one's greedy tokens checked against transformers' first
   (scripts/bench_peers.py; ``pip install -e ".[bench]"``; without it the peer rows are
   skipped with one line naming that extra);
3. the prefill floor: a 1000-token prompt's GEMMs and attention timed alone, against the
   whole prefill, fp32 and bf16;
4. the gpt2-xl shape (``--skip-xl`` to leave out; not in ``--quick``): decode at batch 1 in
   fp32 and bf16, fp32 with ``assistant_model`` (a gpt2-shape draft), and the load's peak
   memory (random weights written tensor by tensor, 6.2 GB on disk);
5. assisted decoding (``--skip-assisted`` to leave out; scripts/bench_assisted.py): a
   gpt2-large-shape target alone and with assistants, and the speed-up its step costs imply.

What is timed is the path a user takes: ``GPT2.from_pretrained(dir)`` (or with
``dtype=torch.bfloat16``) and ``model.generate(...)`` with no extra flags, against
transformers' ``GPT2LMHeadModel.from_pretrained(dir).generate(...)``; tokens/s = batch x
new tokens / wall time of the whole call (prefill and cache set-up included). EOS never
stops either side (min_new_tokens = max_new_tokens). minigpt2 and transformers run
interleaved, so machine drift hits both; each figure is the median of the runs after a
warm-up. The memory-bandwidth limit of batch-1 decoding (read bandwidth / weight bytes:
every weight matrix is read once per token) is measured in the same run, by summing a
buffer of the weights' size and dtype around the decode runs (best of several); batch-1
shares are given twice: against the run's fastest probe, and each round's decode against
a probe taken in that same round (the median over rounds), since this host's bandwidth
moves by up to 1.7x between minutes.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import minigpt2  # noqa: E402
from minigpt2 import fast, hugepages, kernels  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=1024, bos_token_id=999,
                 eos_token_id=999),  # smoke tests only
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "large": dict(n_embd=1280, n_layer=36, n_head=20),
    "xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


# --------------------------------------------------------------------------- checkpoints
def make_checkpoint(directory: Path, size: str, seed: int = 0) -> Path:
    """A random-weight checkpoint of the given shape, saved by transformers itself."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SIZES[size]))
    hf.save_pretrained(directory)
    return directory


def write_zero_checkpoint(directory: Path, size: str) -> int:
    """A checkpoint of the right shape with zero weights, written tensor by tensor (cheap: for
    the load-memory figure only). Returns the weight bytes."""
    from safetensors.torch import save_file

    config = minigpt2.GPT2Config(**SIZES[size])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in minigpt2.GPT2(config).state_dict().items() if k != "lm_head.weight"}
    tensors = {k: torch.zeros(s) for k, s in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "gpt2"}))
    return sum(t.numel() * 4 for t in tensors.values())


def load_peak_rss(directory: Path, dtype: str = "float32") -> dict[str, float]:
    """Peak RSS of ``from_pretrained`` in a fresh process, minus its RSS after the imports.

    The peak is the process's high-water mark (VmHWM in /proc/self/status; ``ru_maxrss``
    where there is no /proc). On Linux ``ru_maxrss`` of a child started by a big parent
    (this benchmark holds three models) carries the parent's peak over the exec, VmHWM not.
    """
    code = f"""
import resource, json, torch, minigpt2
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * {os.sysconf('SC_PAGE_SIZE')}
def peak_rss():
    try:
        with open('/proc/self/status') as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
m = minigpt2.GPT2.from_pretrained({str(directory)!r}, dtype={dtype!r}, device='cpu')
peak = peak_rss()
wb = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({{'peak': peak - base, 'weights': wb, 'after': rss() - base}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak_bytes": r["peak"], "weight_bytes": r["weights"], "multiple": r["peak"] / r["weights"]}


# --------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


#: Seconds of idle before each timed call of interleaved(): thread pools that spin after their
#: work (OpenBLAS's ~0.1 s, ONNX Runtime's intra-op threads, ggml's) park meanwhile, so no engine
#: is timed while the previous one's threads still hold the cores. (Added when minigpt2's fp32
#: row, timed first in each peer round right after llama.cpp's, read 114 and 78 tok/s in two
#: runs; the machine's own speed also moved between them.)
PAUSE = 0.25


def rounds(
    fns: dict[str, Callable[[], Any]], runs: int, probes: dict[str, Probe] | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each fn's wall time in each of ``runs`` rounds after one warm-up, fns interleaved, each
    timed call after PAUSE seconds of idle; with ``probes``, each round first measures every
    probe's read bandwidth (bytes/s), so a figure can be set against the memory speed of its
    own round: this host's bandwidth moved by up to 1.7x within one run (48-80 GB/s)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    bws: dict[str, list[float]] = {k: [] for k in probes or {}}
    for _ in range(runs):
        for k, probe in (probes or {}).items():
            time.sleep(PAUSE)
            bws[k].append(probe(repeats=3))
        for k, f in fns.items():
            time.sleep(PAUSE)
            times[k].append(timed(f))
    return times, bws


def interleaved(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median wall time of each fn over ``runs`` rounds (see rounds())."""
    return {k: statistics.median(v) for k, v in rounds(fns, runs)[0].items()}


def same_round_share(times: list[float], bws: list[float], tokens: int, nbytes: int) -> float:
    """Median over rounds of tokens/s / (that round's bandwidth / nbytes): the share of the
    limit with the decode and the probe in the same minute."""
    return statistics.median(tokens / t / (bw / nbytes) for t, bw in zip(times, bws))


PROBE_BYTES = 1 << 30
#: The read bandwidth of each page size, GB/s, every time bandwidth() measured (for the JSON)
BANDWIDTH_BY_PAGES: list[dict[str, float]] = []


class Probe:
    """Read bandwidth in bytes/s: sum a buffer of ``nbytes`` of ``dtype`` on torch's own pages
    and, where the host has transparent huge pages, on 2 MiB pages (hugepages.Arena, where
    minigpt2 keeps its weight copies), the two interleaved, best of ``repeats`` each: the
    faster one is the limit. Summing on 4 KiB pages alone read up to 20 % less than on 2 MiB
    pages here, a limit any engine on huge pages could pass. At most PROBE_BYTES each (far
    past any last-level cache): the xl shape's 6.2 GB twice would not fit beside its model.
    Every measurement is also kept in BANDWIDTH_BY_PAGES (GB/s per page size)."""

    def __init__(self, nbytes: int, dtype: torch.dtype) -> None:
        self.nbytes = min(nbytes, PROBE_BYTES)
        plain = torch.ones(self.nbytes // dtype.itemsize, dtype=dtype)
        self.bufs = {"4k": plain}
        if hugepages.enabled():
            self.bufs["2M"] = hugepages.Arena().copy(plain)

    def __call__(self, repeats: int = 7) -> float:
        best = {k: float("inf") for k in self.bufs}
        for _ in range(repeats):
            for k, b in self.bufs.items():
                best[k] = min(best[k], timed(b.sum))
        BANDWIDTH_BY_PAGES.append({k: round(self.nbytes / v / 1e9, 2) for k, v in best.items()})
        return self.nbytes / min(best.values())


def bandwidth(nbytes: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """One Probe's reading (bytes/s), its buffers freed after."""
    return Probe(nbytes, dtype)(repeats)


def matrix_bytes(model: Any) -> int:
    """Bytes a batch-1 decode step must read: every Conv1D weight and the unembedding."""
    return sum(w.numel() * w.element_size() for w, _ in fast._sources(model)[0]) + (
        model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    )


def kernel_passes(model: Any, batch: int = 1, rounds: int = 5) -> dict[str, float]:
    """Passes per second of x @ W over every weight matrix (the block matrices and the
    unembedding), per available candidate kernel."""
    blocks, E = fast._sources(model)
    mats = blocks + [(E, None)]
    cands = [k for k in kernels.KERNELS if kernels.available(k, model.dtype)]
    secs = kernels.measure(mats, cands, batch, rounds=rounds)
    return {k: 1.0 / s for k, s in secs.items()}


# --------------------------------------------------------------------------- the rows
class Bench:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        import transformers

        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.peers: list[dict[str, Any]] = []  # the peer table (peer_rows)
        self.floor: dict[str, Any] = {}  # the prefill floor (floor_rows)
        self.xl: dict[str, Any] = {}  # the gpt2-xl shape rows (xl_rows)
        self.same_round: dict[str, Any] = {}  # batch-1 decode times and their rounds' probes (decode_rows)
        self.ours = minigpt2.GPT2.from_pretrained(directory, device="cpu")
        self.ours_bf16 = minigpt2.GPT2.from_pretrained(directory, device="cpu", dtype=torch.bfloat16)
        self.hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        self.vocab = self.ours.config.vocab_size
        self.eos = self.ours.config.eos_token_id

    def prompt(self, batch: int, length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1234)
        return torch.randint(0, self.vocab, (batch, length), generator=g)

    def ours_gen(self, model: Any, ids: torch.Tensor, n: int, **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            torch.manual_seed(0)
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

        return run

    def hf_gen(self, ids: torch.Tensor, n: int, **kw: Any) -> Callable[[], Any]:
        mask = torch.ones_like(ids)

        def run() -> Any:
            torch.manual_seed(0)
            with torch.inference_mode():
                return self.hf.generate(
                    ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=self.eos, **kw
                )

        return run

    def add(self, figure: str, ours: float, theirs: float | None, unit: str, higher_is_better: bool = True) -> None:
        ratio = None
        if theirs is not None and ours > 0 and theirs > 0:
            ratio = ours / theirs if higher_is_better else theirs / ours
        self.rows.append({"figure": figure, "minigpt2": ours, "transformers": theirs, "unit": unit, "ratio": ratio})
        _print_row(self.rows[-1])

    def decode_rows(self, batch: int, prompt: int, new: int, bf16: bool) -> None:
        ids = self.prompt(batch, prompt)
        fns = {"ours": self.ours_gen(self.ours, ids, new), "hf": self.hf_gen(ids, new)}
        if bf16:
            fns["ours_bf16"] = self.ours_gen(self.ours_bf16, ids, new)
        probes = None
        if batch == 1:  # the bandwidth limit, probed in every round beside the decode it limits
            probes = {key: Probe(matrix_bytes(model), model.dtype)
                      for key, model in (("fp32", self.ours), ("bf16", self.ours_bf16))}  # fmt: skip
        times, bws = rounds(fns, self.args.runs, probes)
        del probes
        t = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: batch * new / v for k, v in t.items()}
        if batch == 1:
            self.same_round = {"times": times, "bandwidth": bws, "tokens": new}
            for key, bw in bws.items():
                self.extra.setdefault(f"bw_{key}", []).append(max(bw))
        self.add(f"decode fp32 batch {batch} (tokens/s)", tps["ours"], tps["hf"], "tok/s")
        if bf16:
            self.add(f"decode bf16 batch {batch} vs transformers fp32 (tokens/s)", tps["ours_bf16"], tps["hf"], "tok/s")
        self.extra[f"decode_b{batch}"] = tps

    def bandwidth_rows(self) -> None:
        """Batch-1 decode as a percentage of the bandwidth limit, fp32 and bf16."""
        for key, model, dtype in (("fp32", self.ours, torch.float32), ("bf16", self.ours_bf16, torch.bfloat16)):
            nbytes = matrix_bytes(model)
            bw = max(self.extra.get(f"bw_{key}", []) + [bandwidth(nbytes, dtype)])
            limit = bw / nbytes
            tps = self.extra["decode_b1"]["ours" if key == "fp32" else "ours_bf16"]
            self.extra[f"bandwidth_{key}_GBps"] = bw / 1e9
            self.extra[f"limit_{key}_tps"] = limit
            self.add(f"decode {key} batch 1 as % of bandwidth limit ({bw / 1e9:.1f} GB/s, {limit:.1f} tok/s)",
                     100 * tps / limit, 100 * self.extra["decode_b1"]["hf"] / limit if key == "fp32" else None, "%")
        # The same, each round's decode against that round's probe (the line above takes the
        # run's fastest probe, which may fall in a faster minute than the decode runs).
        r = self.same_round
        for key, name in (("fp32", "ours"), ("bf16", "ours_bf16")):
            if name not in r.get("times", {}):
                continue
            nbytes, bws = matrix_bytes(self.ours if key == "fp32" else self.ours_bf16), r["bandwidth"][key]
            share = same_round_share(r["times"][name], bws, r["tokens"], nbytes)
            hf = same_round_share(r["times"]["hf"], r["bandwidth"]["fp32"], r["tokens"], nbytes) if key == "fp32" else None
            self.extra[f"same_round_share_{key}"] = share
            self.add(f"decode {key} batch 1 as % of its own round's limit "
                     f"({min(bws) / 1e9:.0f}-{max(bws) / 1e9:.0f} GB/s over the rounds)",
                     100 * share, None if hf is None else 100 * hf, "%")  # fmt: skip

    def measure_bw(self) -> None:
        for key, model, dtype in (("fp32", self.ours, torch.float32), ("bf16", self.ours_bf16, torch.bfloat16)):
            self.extra.setdefault(f"bw_{key}", []).append(bandwidth(matrix_bytes(model), dtype))

    def run(self) -> None:
        a = self.args
        new = 16 if a.quick else 128
        self.measure_bw()
        self.decode_rows(1, 16, new, bf16=True)
        self.measure_bw()
        self.bandwidth_rows()
        self.decode_rows(8, 16, new, bf16=True)
        # sampling (top-p 0.9) and long context, batch 1 fp32
        ids = self.prompt(1, 16)
        t = interleaved({"ours": self.ours_gen(self.ours, ids, new, do_sample=True, top_p=0.9),
                         "hf": self.hf_gen(ids, new, do_sample=True, top_p=0.9)}, a.runs)
        self.add("sampling top-p 0.9 fp32 batch 1 (tokens/s)", new / t["ours"], new / t["hf"], "tok/s")
        long_prompt, long_new = (100, 10) if a.quick else (900, 100)
        long_prompt = min(long_prompt, self.ours.config.n_positions - long_new)
        ids = self.prompt(1, long_prompt)
        t = interleaved({"ours": self.ours_gen(self.ours, ids, long_new), "hf": self.hf_gen(ids, long_new)}, a.runs)
        self.add(f"long context fp32 batch 1, prompt {long_prompt} (tokens/s)", long_new / t["ours"],
                 long_new / t["hf"], "tok/s")
        # prefill: time to the first new token of one long prompt
        n_prefill = min(1000, self.ours.config.n_positions - 1)
        ids = self.prompt(1, n_prefill)
        t = interleaved({"ours": self.ours_gen(self.ours, ids, 1), "hf": self.hf_gen(ids, 1),
                         "ours_bf16": self.ours_gen(self.ours_bf16, ids, 1)}, a.runs)
        self.add(f"prefill fp32 {n_prefill} tokens (time to first token, s)", t["ours"], t["hf"], "s",
                 higher_is_better=False)
        self.add(f"prefill bf16 {n_prefill} tokens vs transformers fp32 (s)", t["ours_bf16"], t["hf"], "s",
                 higher_is_better=False)
        # reference: no KV cache at all, batch 1
        self.add("naive loop without KV cache fp32 batch 1 (tokens/s)", self.naive(16, 16 if a.quick else 64), None,
                 "tok/s")
        self.kernel_rows()
        self.memory_rows()

    def naive(self, prompt: int, new: int) -> float:
        """Greedy decoding that re-runs the whole sequence each step (what a cache saves)."""
        ids = self.prompt(1, prompt)

        def run() -> None:
            seq = ids
            with torch.inference_mode():
                for _ in range(new):
                    seq = torch.cat([seq, self.ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)

        return new / statistics.median(timed(run) for _ in range(max(1, self.args.runs - 1)))

    def kernel_rows(self) -> None:
        """Per candidate kernel: passes/s of x @ W over every weight matrix at batch 1."""
        for key, model in (("fp32", self.ours), ("bf16", self.ours_bf16)):
            passes = kernel_passes(model)
            gb = matrix_bytes(model) / 1e9
            self.extra[f"kernels_{key}"] = {"passes_per_s": passes}
            for k, v in passes.items():
                self.add(f"GEMV pass over all matrices, {key}, kernel {k} (passes/s, {v * gb:.1f} GB/s)", v, None,
                         "1/s")
        # The choices the generate calls above made (measured on first use, or from the cache file).
        chosen = {k.split(" | ", 2)[2]: v for k, v in kernels.decisions().items()}
        self.extra["chosen_kernels"] = chosen
        for k, v in sorted(chosen.items()):
            print(f"  chosen: {v:10s} for {k}")

    def memory_rows(self) -> None:
        for key, model in (("fp32", self.ours), ("bf16", self.ours_bf16)):
            w = sum(p.numel() * p.element_size() for p in model.parameters())
            self.add(f"fast-path resident memory, {key} (x weight bytes)", fast.extra_bytes(model) / w, None, "x")
        directory = self.args.checkpoint_dir
        r = load_peak_rss(directory)
        self.extra["load_rss"] = {self.args.size: r}
        self.add(f"load peak RSS, {self.args.size} shape (x weight bytes)", r["multiple"], None, "x",
                 higher_is_better=False)
        if not self.args.quick and not self.args.skip_large:
            with tempfile.TemporaryDirectory(prefix="minigpt2-large-") as d:
                write_zero_checkpoint(Path(d), "large")
                r = load_peak_rss(Path(d))
            self.extra["load_rss"]["large"] = r
            self.add("load peak RSS, gpt2-large shape (x weight bytes)", r["multiple"], None, "x",
                     higher_is_better=False)


def training_rows(bench: Bench) -> None:
    """The training engineer's row (scripts/bench_training.py), when that file exists."""
    path = REPO_ROOT / "scripts" / "bench_training.py"
    if not path.is_file():
        return
    spec = importlib.util.spec_from_file_location("bench_training", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    size = {"gpt2": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large", "xl": "gpt2-xl"}.get(bench.args.size)
    if size is None:  # the tiny smoke shape has no preset: skip, training has its own tests
        return
    kw = dict(batch=1, block=32, steps=1) if bench.args.quick else dict(steps=3)
    for precision in ("fp32", "bf16"):
        r = mod.training_row(size=size, precision=precision, device="cpu", **kw)
        bench.extra[f"training_{precision}"] = r
        bench.add(f"training step {precision}, batch {r['batch']} x {r['block']} (tokens/s)", r["minigpt2_tok_s"],
                  r["transformers_tok_s"], "tok/s")


# --------------------------------------------------------------------------- the limit
def limits(bench: Bench) -> dict[str, float]:
    """tokens/s at batch 1 that the read bandwidth allows, fp32 and half precision (bf16 and
    f16 weights have the same bytes): the best summing rate of the run / the matrix bytes."""
    out = {}
    for key, model, dtype in (("fp32", bench.ours, torch.float32), ("half", bench.ours_bf16, torch.bfloat16)):
        nbytes = matrix_bytes(model)
        bw = max(bench.extra.get(f"bw_{'fp32' if key == 'fp32' else 'bf16'}", []) + [bandwidth(nbytes, dtype)])
        out[key] = bw / nbytes
        out[f"{key}_GBps"] = bw / 1e9
        out[f"{key}_bytes"] = nbytes
    return out


# --------------------------------------------------------------------------- prefill floor
def prefill_floor(model: Any, n_tokens: int) -> float:
    """Seconds for a prompt's unavoidable work alone: every block's four products on
    n_tokens rows through the kernels the fast path runs for prompts, causal attention over
    the prompt per layer (the SDPA kernel the fast path calls), and the unembedding of the
    last row. What a prefill costs beyond this is everything else (norms, GELU, cache, ...)."""
    import torch.nn.functional as F

    c = model.config
    p = fast._prepared.get(model)
    if p is None:  # prepare the kernels as generate does
        model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=1)
        p = fast._prepared[model]
    g = torch.Generator().manual_seed(0)
    x_in = {n: torch.randn(n_tokens, n, generator=g).to(model.dtype) for n in (c.n_embd, c.inner_dim)}
    q = torch.randn(1, c.n_head, n_tokens, c.head_dim, generator=g).to(model.dtype)
    last = torch.randn(1, c.n_embd, generator=g).to(model.dtype)
    total = 0.0
    with torch.inference_mode():
        for i in range(c.n_layer):
            for j, mm in enumerate(p.rows[4 * i : 4 * i + 4]):
                x = x_in[c.inner_dim if j == 3 else c.n_embd]
                total += timed(lambda mm=mm, x=x: mm(x))
            total += timed(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
        total += timed(lambda: p.unembed.mm(last))
    return total


def floor_rows(bench: Bench) -> None:
    """The prefill against its own floor (prefill_floor), fp32 and bf16, interleaved in
    rounds: time to the first token of a 1000-token prompt (generate, max_new_tokens=1)."""
    n = min(100 if bench.args.quick else 1000, bench.ours.config.n_positions - 1)
    ids = bench.prompt(1, n)
    fns = {
        "fp32": bench.ours_gen(bench.ours, ids, 1),
        "fp32 floor": lambda: prefill_floor(bench.ours, n),
        "bf16": bench.ours_gen(bench.ours_bf16, ids, 1),
        "bf16 floor": lambda: prefill_floor(bench.ours_bf16, n),
    }
    floors: dict[str, list[float]] = {"fp32 floor": [], "bf16 floor": []}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(bench.args.runs):
        for k, f in fns.items():
            if k in floors:
                floors[k].append(f())  # its own sum of kernel times
            else:
                times[k].append(timed(f))
    for key in ("fp32", "bf16"):
        t, fl = statistics.median(times[key]), statistics.median(floors[f"{key} floor"])
        bench.floor[key] = {"tokens": n, "prefill_s": t, "floor_s": fl, "share": t / fl,
                            "kernel": fast.kernel_names(bench.ours if key == "fp32" else bench.ours_bf16)["prefill"]}
        bench.add(f"prefill {key} {n} tokens against its floor (GEMMs + SDPA alone {fl:.3f} s; prefill / floor)",
                  t / fl, None, "x", higher_is_better=False)
    ratio = statistics.median(times["bf16"]) / statistics.median(times["fp32"])
    bench.floor["bf16_over_fp32"] = ratio
    bench.add(f"prefill bf16 / prefill fp32, {n} tokens (kernel {bench.floor['bf16']['kernel']})", ratio, None, "x",
              higher_is_better=False)


# --------------------------------------------------------------------------- peers
def peer_rows(bench: Bench, workdir: Path) -> None:
    """minigpt2 against ONNX Runtime and llama.cpp at batch 1, the issue's table: tokens/s
    (prompt 16, 128 new), share of the bandwidth limit, prefill of a 1000-token prompt. Every
    engine's greedy tokens are checked against transformers' before it is timed, then all
    run interleaved in rounds (median of --peer-runs)."""
    import bench_peers as bp

    a = bench.args
    new = 16 if a.quick else 128
    prompt = bench.prompt(1, 16)
    long = bench.prompt(1, min(100 if a.quick else 1000, bench.ours.config.n_positions - 1))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        want = bench.hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=bench.eos)[0, 16:].tolist()

    def ours(model: Any) -> dict[str, Any]:
        return {"greedy": lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new)[0, 16:].tolist(),
                "decode": bench.ours_gen(model, prompt, new), "prefill": bench.ours_gen(model, long, 1)}

    # (engine, weights) -> greedy / decode / prefill callables
    engines: dict[tuple[str, str], dict[str, Any]] = {
        ("minigpt2", "fp32"): ours(bench.ours),
        ("minigpt2", "bf16"): ours(bench.ours_bf16),
        ("transformers", "fp32"): {"greedy": lambda: want, "decode": bench.hf_gen(prompt, new),
                                   "prefill": bench.hf_gen(long, 1)},
    }
    cache = Path.home() / ".cache" / "minigpt2" / "peers"
    converter: list[Path] = []
    converter_failed: list[str] = []  # said once, not fetched again for the next llama.cpp row

    def llama(outtype: str, fa: bool) -> Any:
        if not converter:
            try:
                converter.append(bp.find_converter(a.gguf_converter, cache))
            except bp.PeerUnavailable as e:
                converter_failed.append(str(e))
                raise
        return bp.LlamaCppPeer(a.checkpoint_dir, workdir, outtype, fa, threads, converter[0],
                               n_ctx=bench.ours.config.n_positions)

    # (label, the modules it needs, how to make it)
    makers = [
        ("ONNX Runtime (torch.onnx export) fp32", ("onnxruntime", "onnx", "onnxscript"),
         lambda: bp.OnnxRuntimePeer(bench.ours, workdir, threads)),
        ("llama.cpp f32", ("llama_cpp", "gguf"), lambda: llama("f32", False)),
        ("llama.cpp (flash attention) f32", ("llama_cpp", "gguf"), lambda: llama("f32", True)),
        ("llama.cpp (flash attention) f16", ("llama_cpp", "gguf"), lambda: llama("f16", True)),
    ]
    # What is not installed is said once, in one line naming the extra, for every peer it skips.
    absent = bp.missing(*dict.fromkeys(m for _, mods, _ in makers for m in mods))
    if absent:
        skipped = [label for label, mods, _ in makers if bp.missing(*mods)]
        print(f"# peers skipped ({', '.join(skipped)}): {absent}")
    peers: list[Any] = []
    for label, mods, make in makers:
        reason = bp.missing(*mods) or (converter_failed[0] if converter_failed and mods[0] == "llama_cpp" else None)
        if reason is None:
            try:
                peer = make()
            except bp.PeerUnavailable as e:
                reason = str(e)
                print(f"# peer {label}: skipped: {e}")
        if reason is not None:
            bench.peers.append({"engine": label, "skipped": reason})
            continue
        peers.append(peer)
        engines[(peer.name, peer.weights)] = {
            "greedy": lambda p=peer: p.greedy(prompt[0].tolist(), new),
            "decode": lambda p=peer: p.greedy(prompt[0].tolist(), new),
            "prefill": lambda p=peer: p.prefill(long[0].tolist()),
            "prepare_s": peer.prepare_s,
        }
    for e in engines.values():
        e["first_difference"] = bp.first_difference(e["greedy"](), want)
    probes = {"fp32": Probe(matrix_bytes(bench.ours), torch.float32),
              "half": Probe(matrix_bytes(bench.ours_bf16), torch.bfloat16)}
    times, bws = rounds({k: e["decode"] for k, e in engines.items()}, a.peer_runs, probes)
    del probes
    decode = {k: statistics.median(v) for k, v in times.items()}
    for key, bw in bws.items():
        bench.extra.setdefault(f"bw_{'fp32' if key == 'fp32' else 'bf16'}", []).append(max(bw))
    prefill = interleaved({k: e["prefill"] for k, e in engines.items()}, a.peer_runs)
    lim = limits(bench)
    print(f"\n# peers: batch 1, prompt 16, {new} new tokens, {threads} threads, median of {a.peer_runs}; limits "
          f"{lim['fp32']:.1f} tok/s fp32 ({lim['fp32_GBps']:.1f} GB/s), {lim['half']:.1f} tok/s bf16 / f16 "
          f"({lim['half_GBps']:.1f} GB/s)")
    print(f"| engine | weights | tok/s | share of the limit | share of its own round's limit | prefill, "
          f"{long.shape[1]} tokens (s) | greedy vs transformers |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for (engine, weights), e in engines.items():
        tps = new / decode[(engine, weights)]
        key = "fp32" if weights in ("fp32", "f32") else "half"
        limit = lim[key]
        own = same_round_share(times[(engine, weights)], bws[key], new, lim[f"{key}_bytes"])
        diff = e["first_difference"]
        same = f"all {new} equal" if diff is None else f"differ from step {diff}"
        row = {"engine": engine, "weights": weights, "tok_s": tps, "share": tps / limit, "share_own_round": own,
               "prefill_s": prefill[(engine, weights)], "greedy": same, "prepare_s": e.get("prepare_s")}
        table[(engine, weights)] = row
        bench.peers.append(row)
        print(f"| {engine} | {weights} | {tps:.1f} | {100 * tps / limit:.0f}% | {100 * own:.0f}% | "
              f"{row['prefill_s']:.3f} | {same} |")
    print(f"# own round: each round's decode against that round's probe ({min(bws['fp32']) / 1e9:.0f}-"
          f"{max(bws['fp32']) / 1e9:.0f} GB/s fp32 over the rounds)")
    for (engine, weights), r in table.items():
        if engine.startswith(("ONNX", "llama")):
            mine = table[("minigpt2", "fp32" if weights in ("fp32", "f32") else "bf16")]
            for what, ours_v, theirs_v, unit, hib in (("decode batch 1", mine["tok_s"], r["tok_s"], "tok/s", True),
                                                      (f"prefill {long.shape[1]} tokens", mine["prefill_s"],
                                                       r["prefill_s"], "s", False)):
                ratio = ours_v / theirs_v if hib else theirs_v / ours_v
                row = {"figure": f"{what}, minigpt2 {mine['weights']} vs {engine} {weights} ({unit})",
                       "minigpt2": ours_v, "transformers": None, "peer": theirs_v, "unit": unit, "ratio": ratio}
                bench.rows.append(row)
                print(f"| {row['figure']} | {_fmt(ours_v)} | peer {_fmt(theirs_v)} | {ratio:.2f}x |")
    for p in peers:
        p.close()


# --------------------------------------------------------------------------- gpt2-xl shape
def write_random_checkpoint(directory: Path, size: str, seed: int = 0) -> int:
    """A checkpoint of the given shape with random weights (N(0, 0.02) matrices, LayerNorms
    near 1, small biases), streamed to model.safetensors one tensor at a time so that even
    the xl shape (6.2 GB) never sits in memory whole. Returns the weight bytes."""
    import struct

    config = minigpt2.GPT2Config(**SIZES[size])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in minigpt2.GPT2(config).state_dict().items() if k != "lm_head.weight"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, shape in shapes.items():
        n = 4 * int(torch.Size(shape).numel())
        header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for k, shape in shapes.items():
            t = torch.randn(shape, generator=g)
            if k.endswith(".bias"):
                t.mul_(0.01)
            elif ".ln_" in k or k.startswith("transformer.ln_f"):
                t.mul_(0.01).add_(1.0)
            else:
                t.mul_(0.02)
            f.write(t.numpy().tobytes())
    (directory / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "gpt2"}))
    return offset


def xl_rows(bench: Bench) -> None:
    """gpt2-xl shape (1.56B parameters): decode at batch 1 in fp32 and bf16 (prompt 16, 64
    new tokens) with its share of the bandwidth limit, the load's peak memory, and fp32
    decode with ``assistant_model`` (a random gpt2-shape draft, 4 drafts a round, interleaved
    with the target alone: with random weights almost no draft is accepted, so this row is
    what the assisted machinery costs an xl target, not what a trained pair gains; see
    scripts/bench_assisted.py for the speed-up formula)."""
    n_new = 64
    with tempfile.TemporaryDirectory(prefix="minigpt2-xl-") as d:
        t = time.perf_counter()
        write_random_checkpoint(Path(d), "xl")
        print(f"# xl checkpoint written in {time.perf_counter() - t:.0f} s")
        r = load_peak_rss(Path(d))
        bench.xl["load_rss"] = r
        bench.add("xl: load peak RSS, fp32 (x weight bytes)", r["multiple"], None, "x", higher_is_better=False)
        ids = bench.prompt(1, 16)
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            model = minigpt2.GPT2.from_pretrained(d, device="cpu", dtype=dtype)
            nbytes = matrix_bytes(model)
            bw = bandwidth(nbytes, dtype)
            fns = {key: bench.ours_gen(model, ids, n_new)}
            small = None
            if key == "fp32":
                small = minigpt2.GPT2.from_pretrained(bench.args.checkpoint_dir, device="cpu")
                fns["assisted"] = bench.ours_gen(model, ids, n_new, assistant_model=small, num_assistant_tokens=4,
                                                 assistant_confidence_threshold=0.0)
            times = interleaved(fns, max(1, bench.args.runs))
            tps = n_new / times[key]
            bw = max(bw, bandwidth(nbytes, dtype))
            limit = bw / nbytes
            bench.xl[key] = {"tok_s": tps, "limit_tok_s": limit, "GBps": bw / 1e9, "share": tps / limit,
                             "kernels": fast.kernel_names(model)}
            bench.add(f"xl: decode {key} batch 1 (tokens/s; {100 * tps / limit:.0f}% of the {limit:.1f} tok/s limit)",
                      tps, None, "tok/s")
            if "assisted" in times:
                tps_a = n_new / times["assisted"]
                bench.xl["fp32_assisted"] = {"tok_s": tps_a, "over_alone": tps_a / tps}
                bench.add(f"xl: decode fp32 batch 1 with assistant_model (gpt2 shape, 4 drafts; random weights, "
                          f"few accepted; {tps_a / tps:.2f}x the target alone)", tps_a, None, "tok/s")
            del model, small
            gc.collect()


# --------------------------------------------------------------------------- assisted decoding
def assisted_rows(bench: Bench) -> None:
    """The assisted-decoding rows (scripts/bench_assisted.py): a gpt2-large-shape target alone,
    with a small assistant, as its own assistant, and the speed-up the step costs imply."""
    path = REPO_ROOT / "scripts" / "bench_assisted.py"
    if not path.is_file() or bench.args.skip_assisted:
        return
    spec = importlib.util.spec_from_file_location("bench_assisted", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    bench.extra["assisted"] = mod.assisted_rows(bench.add, quick=bench.args.quick, runs=bench.args.runs)


# --------------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _print_row(r: dict[str, Any]) -> None:
    ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
    print(f"| {r['figure']} | {_fmt(r.get('minigpt2'))} | {_fmt(r.get('transformers'))} | {ratio} |", flush=True)


def host() -> dict[str, Any]:
    return {"cpu": kernels.host_id(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def plot(path: Path, bench: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [b for b in (1, 8) if f"decode_b{b}" in bench.extra]
    for key, label in (("ours", "minigpt2 fp32"), ("ours_bf16", "minigpt2 bf16"), ("hf", "transformers fp32")):
        ax.plot(batches, [bench.extra[f"decode_b{b}"][key] for b in batches], marker="o", label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s (whole generate call)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{bench.args.size}, {host()['cpu'][:40]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="gpt2", help="checkpoint shape (default: 124M gpt2)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per figure, after one warm-up (median)")
    p.add_argument("--quick", action="store_true", help="short smoke run: fewer tokens, one run, no large-shape load")
    p.add_argument("--skip-large", action="store_true", help="skip the gpt2-large load-memory figure")
    p.add_argument("--skip-peers", action="store_true", help="skip ONNX Runtime and llama.cpp")
    p.add_argument("--skip-xl", action="store_true", help="skip the gpt2-xl shape rows")
    p.add_argument("--peer-runs", type=int, default=5, help="timed runs per engine in the peer table (median)")
    p.add_argument("--gguf-converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py (default: fetched)")
    p.add_argument("--skip-assisted", action="store_true", help="skip the assisted-decoding rows (gpt2-large target)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--plot", type=Path, help="draw tokens/s against batch size and dtype (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.peer_runs = 1, 1
    h = host()
    print(f"# minigpt2 bench: {args.size}; CPU {h['cpu']}; {h['cores']} cores; torch {h['torch']}; "
          f"load average {h['load_average']}")
    print("| figure | minigpt2 | transformers | ratio |\n|---|---|---|---|")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minigpt2-bench-") as d:
        args.checkpoint_dir = make_checkpoint(Path(d), args.size)
        bench = Bench(args, args.checkpoint_dir)
        bench.run()
        floor_rows(bench)
        if args.size == "tiny":
            print("# peers: skipped for the tiny shape (its vocabulary is not GPT-2's, which llama.cpp's converter needs)")
        elif not args.skip_peers:
            peer_rows(bench, Path(d))
        del bench.hf
        gc.collect()
        training_rows(bench)
        assisted_rows(bench)
        if not args.skip_xl and not args.quick:
            del bench.ours, bench.ours_bf16
            gc.collect()
            xl_rows(bench)
    elapsed = time.perf_counter() - start
    print(f"# total {elapsed:.0f} s")
    if args.json:
        out = {"host": h, "size": args.size, "runs": args.runs, "quick": args.quick, "seconds": elapsed,
               "rows": bench.rows, "details": bench.extra, "peers": bench.peers, "floor": bench.floor,
               "xl": bench.xl, "bandwidth_by_pages_GBps": BANDWIDTH_BY_PAGES}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    if args.plot:
        plot(args.plot, bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
