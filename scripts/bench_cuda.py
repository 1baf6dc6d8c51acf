"""Decoding speed on a CUDA GPU: minigpt2 eager and compiled against transformers, in one run.

The same random weights for every engine:

    python scripts/bench_cuda.py                         # the 124M shape, fp32 and bf16
    python scripts/bench_cuda.py --shape xl --dtype bf16  # the gpt2-xl shape (1.5B)
    python scripts/bench_cuda.py --json out.json

Engines: minigpt2 eager, minigpt2 ``compile=True`` (CUDA graphs of the one-token step against
a static cache, compiled.GraphStep), transformers' eager ``generate`` and transformers with its
static cache (``cache_implementation="static"``, which its ``generate`` compiles with
``mode="reduce-overhead"`` on CUDA). Batch 1, a 16-token prompt, 128 new tokens (greedy, EOS
ignored); decode tokens/s = 127 / (time of 128 new tokens - time of 1 new token), median of
``--repeats`` after a warm-up that also compiles (its seconds are reported). Every engine's 128
greedy tokens are compared with transformers' eager ones (fp32: equal expected; bf16: the
matching prefix is reported). The limit is the weights' bytes over the GPU's measured read
bandwidth: at batch 1 a small model is bound by launches and latency, far from it.

Needs a CUDA GPU; exits with one line where there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--shape", nargs="+", default=["124M"], choices=["124M", "xl"], help="model shapes (default: 124M)")
parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="weight dtypes (default: fp32 bf16)")
parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine (median; default 5)")
parser.add_argument("--new", type=int, default=128, help="new tokens per run (default 128)")
parser.add_argument("--no-hf-static", action="store_true", help="skip transformers' compiled static cache")
parser.add_argument("--engine", nargs="+", default=None, help="run only the engines whose names contain one of these")
parser.add_argument("--json", default=None, help="write the rows as JSON here (rewritten after each row)")
parser.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same code as a smoke test")
args = parser.parse_args()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

if args.device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("bench_cuda.py: needs a CUDA GPU (none found); --device cpu runs it as a smoke test")

import transformers  # noqa: E402

import minigpt2  # noqa: E402
from minigpt2 import compiled  # noqa: E402

dev = torch.device(args.device)


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name() -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"

SHAPES = {"124M": dict(n_embd=768, n_layer=12, n_head=12), "xl": dict(n_embd=1600, n_layer=48, n_head=25)}
rows: list[dict] = []


def read_bandwidth() -> float:
    """Bytes/s of a reduction over 2 GiB (read once), best of 5."""
    x = torch.empty(2**29 if dev.type == "cuda" else 2**26, device=dev, dtype=torch.float32).normal_()
    best = float("inf")
    for _ in range(6):
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def checkpoint(shape: str, dtype: torch.dtype, root: str) -> str:
    """A random-weight checkpoint of the shape (transformers' init), saved in ``dtype``."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[shape])
    with torch.device(dev):
        hf = transformers.GPT2LMHeadModel(cfg).to(dtype)
    path = os.path.join(root, f"{shape}-{str(dtype).split('.')[1]}")
    hf.save_pretrained(path)
    del hf
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return path


def timed(fn, ids: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(decode tok/s, seconds of the warm-up calls, the 128 tokens) of fn(ids, n_new)."""
    t = time.perf_counter()
    out = fn(ids, args.new)
    fn(ids, 1)
    sync()
    warm = time.perf_counter() - t
    rates = []
    for _ in range(args.repeats):
        times = []
        for n in (args.new, 1):
            sync()
            t = time.perf_counter()
            fn(ids, n)
            sync()
            times.append(time.perf_counter() - t)
        rates.append((args.new - 1) / (times[0] - times[1]))
    return statistics.median(rates), warm, out[0, ids.shape[1]:]


def run(shape: str, dtype: torch.dtype, root: str, bandwidth: float) -> None:
    path = checkpoint(shape, dtype, root)
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    ones = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=50256)
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=dtype).to(dev).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    limit = bandwidth / weight_bytes
    ours = minigpt2.GPT2.from_pretrained(path, device=dev, dtype=dtype)
    graphs = minigpt2.GPT2.from_pretrained(path, device=dev, dtype=dtype, compile=True)

    def hf_eager(x, n):
        with torch.no_grad():
            return hf.generate(x, attention_mask=ones, max_new_tokens=n, min_new_tokens=n, **kw)

    def hf_static(x, n):
        with torch.no_grad():
            return hf.generate(x, attention_mask=ones, max_new_tokens=n, min_new_tokens=n,
                               cache_implementation="static", **kw)

    engines = [("transformers eager", hf_eager), ("minigpt2 eager", lambda x, n: ours.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)),
               ("minigpt2 compile=True (CUDA graphs)", lambda x, n: graphs.generate(x, max_new_tokens=n, min_new_tokens=n, **kw))]  # fmt: skip
    if not args.no_hf_static and shape == "124M":
        engines.append(("transformers static cache, compiled", hf_static))
    if args.engine:  # transformers eager always runs: the tokens every engine is checked against
        engines = [e for e in engines if e[0] == "transformers eager" or any(k in e[0] for k in args.engine)]
    reference = None
    for name, fn in engines:
        row = dict(shape=shape, dtype=str(dtype).split(".")[1], engine=name, device=device_name())
        try:
            rate, warm, tokens = timed(fn, ids)
            reference = tokens if reference is None else reference
            same = (tokens == reference).int().cumprod(0).sum().item()
            row.update(tok_s=round(rate, 1), ms_per_token=round(1000 / rate, 3), share_of_limit=round(rate / limit, 4),
                       warmup_s=round(warm, 2), tokens_equal_to_transformers=f"{same}/{len(reference)}")  # fmt: skip
            if "compile=True" in name:
                row["compile_seconds"] = {k: round(v, 2) for k, v in compiled.compile_seconds(graphs).items()}
        except Exception as e:  # a peer that fails is reported, not fatal
            row["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-400:]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(limit_note="weight bytes / read bandwidth", bandwidth_GBps=round(bandwidth / 1e9, 1),
                               torch=torch.__version__, transformers=transformers.__version__, rows=rows), f, indent=1)  # fmt: skip


def main() -> None:
    bw = read_bandwidth()
    print(f"{device_name()}: read bandwidth {bw / 1e9:.0f} GB/s; torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)  # fmt: skip
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as root:
        for shape in args.shape:
            for name in args.dtype:
                run(shape, dtypes[name], root, bw)  # its models are freed on return
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{'shape':5} {'dtype':8} {'engine':40} {'tok/s':>8} {'ms/tok':>7} {'warm-up s':>9}  tokens = transformers")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:5} {r['dtype']:8} {r['engine']:40} failed: {r['error']}")
        else:
            print(f"{r['shape']:5} {r['dtype']:8} {r['engine']:40} {r['tok_s']:8.1f} {r['ms_per_token']:7.2f} "
                  f"{r['warmup_s']:9.1f}  {r['tokens_equal_to_transformers']}")  # fmt: skip


if __name__ == "__main__":
    main()
