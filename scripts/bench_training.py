"""Training-step throughput: minigpt2 against transformers, interleaved in one process.

One optimizer step = forward, backward, AdamW step (and zero_grad) on a batch of random
tokens. minigpt2 runs the path ``minigpt2 train`` runs (``accumulate_gradients`` + the AdamW
of ``make_optimizer``, decay on matrices only); transformers runs ``GPT2LMHeadModel(ids,
labels=ids).loss.backward()`` with ``torch.optim.AdamW``. Same config, same initial weights,
dropout as the config says (0.1: a real training step). The two alternate step by step (and
swap which goes first), so load on a shared machine hits both alike; the row reports the
median over steps.

    python scripts/bench_training.py                      # gpt2 (124M), 4 x 256, fp32 and bf16
    python scripts/bench_training.py --size distilgpt2 --steps 3

``scripts/bench.py`` imports ``training_row``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt2 import GPT2, GPT2Config  # noqa: E402
from minigpt2.training import TrainConfig, accumulate_gradients, make_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_row(
    size: str = "gpt2",
    batch: int = 4,
    block: int = 256,
    steps: int = 5,
    precision: str = "fp32",
    device: str | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Tokens/s of one optimizer step, minigpt2 vs transformers (median of ``steps`` timed steps each).

    Returns {"row", "size", "batch", "block", "precision", "device", "steps",
    "minigpt2_tok_s", "transformers_tok_s", "ratio"} (ratio > 1: minigpt2 is faster).
    """
    import transformers

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = GPT2Config.from_preset(size)
    torch.manual_seed(0)
    ours = GPT2(config).to(dev).train()
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_dict())).to(dev).train()
    theirs.load_state_dict(ours.state_dict())  # same starting point
    opt_ours = make_optimizer(ours, TrainConfig(data="", out=""))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, block + 1), generator=g).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step_ours() -> None:
        accumulate_gradients(ours, [(x, y)], precision)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs() -> None:
        with amp():
            loss = theirs(input_ids=x, labels=x).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    runs = [("ours", step_ours), ("theirs", step_theirs)]
    for i in range(warmup + steps):
        for name, fn in runs if i % 2 == 0 else runs[::-1]:
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = batch * block
    ours_tps = tokens / statistics.median(times["ours"])
    theirs_tps = tokens / statistics.median(times["theirs"])
    return {
        "row": f"train step ({size}, {batch}x{block}, {precision}, AdamW)",
        "size": size,
        "batch": batch,
        "block": block,
        "precision": precision,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "steps": steps,
        "minigpt2_tok_s": round(ours_tps, 1),
        "transformers_tok_s": round(theirs_tps, 1),
        "ratio": round(ours_tps / theirs_tps, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="gpt2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    a = p.parse_args()
    rows = []
    for precision in (["fp32", "bf16"] if a.precision == "both" else [a.precision]):
        row = training_row(a.size, a.batch, a.block, a.steps, precision, a.device)
        rows.append(row)
        print(f"{row['row']} on {row['device']}: minigpt2 {row['minigpt2_tok_s']:,.0f} tok/s, "
              f"transformers {row['transformers_tok_s']:,.0f} tok/s, ratio {row['ratio']:.2f}x", flush=True)
    if len(rows) == 2:
        print(f"bf16 autocast buys minigpt2 {rows[1]['minigpt2_tok_s'] / rows[0]['minigpt2_tok_s']:.2f}x "
              f"over fp32 (transformers: {rows[1]['transformers_tok_s'] / rows[0]['transformers_tok_s']:.2f}x)")


if __name__ == "__main__":
    main()
