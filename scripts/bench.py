"""minigpt2 against transformers, in one process, on one random-weight checkpoint.

    python scripts/bench.py                      # 124M gpt2 shape, full run (< 10 min on 2 cores)
    python scripts/bench.py --size medium        # medium / large / xl shapes
    python scripts/bench.py --quick              # a short smoke run (fewer tokens, one run)
    python scripts/bench.py --json out.json --plot out.png

What is timed is the path a user takes: ``GPT2.from_pretrained(dir)`` (or with
``dtype=torch.bfloat16``) and ``model.generate(...)`` with no extra flags, against
transformers' ``GPT2LMHeadModel.from_pretrained(dir).generate(...)``; tokens/s = batch x
new tokens / wall time of the whole call (prefill and cache set-up included). EOS never
stops either side (min_new_tokens = max_new_tokens). minigpt2 and transformers run
interleaved, so machine drift hits both; each figure is the median of the runs after a
warm-up. The memory-bandwidth limit of batch-1 decoding (read bandwidth / weight bytes:
every weight matrix is read once per token) is measured in the same run, by summing a
buffer of the weights' size and dtype around the decode runs (best of several).
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
from minigpt2 import fast, kernels  # noqa: E402

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


def interleaved(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median wall time of each fn over ``runs`` rounds after one warm-up, fns interleaved."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def bandwidth(nbytes: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: sum a buffer of ``nbytes`` of ``dtype``, best of ``repeats``."""
    buf = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
    best = min(timed(buf.sum) for _ in range(repeats))
    return nbytes / best


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
        t = interleaved(fns, self.args.runs)
        tps = {k: batch * new / v for k, v in t.items()}
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
    p.add_argument("--skip-assisted", action="store_true", help="skip the assisted-decoding rows (gpt2-large target)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--plot", type=Path, help="draw tokens/s against batch size and dtype (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
    h = host()
    print(f"# minigpt2 bench: {args.size}; CPU {h['cpu']}; {h['cores']} cores; torch {h['torch']}; "
          f"load average {h['load_average']}")
    print("| figure | minigpt2 | transformers | ratio |\n|---|---|---|---|")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minigpt2-bench-") as d:
        args.checkpoint_dir = make_checkpoint(Path(d), args.size)
        bench = Bench(args, args.checkpoint_dir)
        bench.run()
        del bench.hf
        gc.collect()
        training_rows(bench)
        assisted_rows(bench)
    elapsed = time.perf_counter() - start
    print(f"# total {elapsed:.0f} s")
    if args.json:
        out = {"host": h, "size": args.size, "runs": args.runs, "quick": args.quick, "seconds": elapsed,
               "rows": bench.rows, "details": bench.extra}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    if args.plot:
        plot(args.plot, bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
