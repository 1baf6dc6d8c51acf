"""``minigpt2 train``: a thin layer over ``minigpt2.training.TrainConfig`` and ``train``.

    minigpt2 train --data input.txt --model gpt2 --out runs/ft --steps 500
    minigpt2 train --data corpus/ --config tiny.json --out runs/scratch --plot loss.png
    torchrun --nproc_per_node 4 -m minigpt2 train --data corpus/ --config tiny.json --out runs/ddp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..training import STATE_JSON, TrainConfig, check_resume_source, train
from . import CLIError, device_name

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_RUN_FLAGS: list[str] = []  # the TrainConfig fields set by opt() flags: a resumed run keeps its own


def _saved_train_config(out: str) -> dict[str, Any] | None:
    """The flags of the run saved in ``out`` (None when there is none: train() then says so)."""
    try:
        state = json.loads((Path(out).expanduser() / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    saved = state.get("train_config") if isinstance(state, dict) else None
    return saved if isinstance(saved, dict) else None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train from scratch or fine-tune on text files",
        description="Train GPT-2 from scratch (--config) or fine-tune a checkpoint (--model) on a text "
        "file or a folder of .txt files. --out becomes a model directory that every command and "
        "transformers load, plus the training state (for --resume) and log.jsonl.",
    )
    p.add_argument("--data", required=True, metavar="PATH", help="a .txt file or a folder of .txt files")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="NAME_OR_PATH", help="fine-tune this checkpoint (Hub id or directory)")
    source.add_argument("--config", metavar="CONFIG.json",
                        help="train from scratch with this config.json (absent keys take GPT-2's defaults)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, empty, or a run to --resume)")

    def opt(flag: str, type_: Any, help_: str, metavar: str | None = None) -> None:
        name = flag.lstrip("-").replace("-", "_")
        default = _DEFAULTS[name]
        if default is not None and "default:" not in help_:
            help_ += f" (default: {default!r})" if isinstance(default, str) else f" (default: {default})"
        # absent unless typed, so that --resume can tell a flag the user gave from one left out
        p.add_argument(flag, type=type_, default=argparse.SUPPRESS, metavar=metavar, help=help_)
        if name not in _RUN_FLAGS:  # register() runs once per parser built
            _RUN_FLAGS.append(name)

    opt("--steps", int, "optimizer steps to train to", "N")
    opt("--batch-size", int, "rows per micro-batch, over all processes", "B")
    opt("--block-size", int, "tokens per row (context length)", "T")
    opt("--grad-accum", int, "micro-batches per optimizer step", "A")
    opt("--lr", float, "peak learning rate", "LR")
    opt("--min-lr-ratio", float, "cosine decays to this fraction of --lr", "R")
    opt("--warmup", int, "linear warmup steps", "W")
    opt("--decay-steps", int, "length of warmup + cosine (default: --steps)", "N")
    opt("--weight-decay", float, "AdamW weight decay on matrices", "WD")
    opt("--grad-clip", float, "clip the gradient norm to this (0: off)", "C")
    opt("--val-fraction", float, "fraction of the tokens held out for validation", "F")
    opt("--eval-every", int, "validation loss and a sample every E steps (0: at the end only)", "E")
    opt("--eval-batches", int, "batches per validation measurement", "N")
    opt("--save-every", int, "checkpoint every S steps (0: at the end only)", "S")
    opt("--sample-prompt", str, "prompt of the samples printed at each evaluation", "TEXT")
    opt("--sample-tokens", int, "tokens per sample (0: no samples)", "N")
    opt("--seed", int, "random seed", "S")
    opt("--dropout", float, "override the config's dropout probabilities (default: the config's)", "P")
    opt("--cache-dir", str, "where tokenized data is cached (default: ~/.cache/minigpt2/tokens)", "DIR")
    p.add_argument("--device", default=None, type=device_name, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="autocast precision; weights and optimizer state stay fp32 (default: bf16 on CUDA, else fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward to save memory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw train / val loss curves into this file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the TrainConfig: typed flags, else (with --resume) the saved run's, else defaults."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    values = {k: _DEFAULTS[k] for k in _RUN_FLAGS}
    if args.resume:
        saved = _saved_train_config(args.out)
        if saved is not None:
            try:
                check_resume_source(args.model, args.config, saved, args.out)
            except ValueError as e:
                raise CLIError(str(e), code=2) from None
            values.update({k: saved[k] for k in _RUN_FLAGS if k in saved})
            for k in ("model", "config"):  # the run's own source, for the model card
                if given.get(k) is None:
                    given[k] = saved.get(k)
    cfg = TrainConfig(**{**values, **given})
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        loss = f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "no step run"
        status = "interrupted at" if result.interrupted else "trained to"
        print(f"{status} step {result.step}: {loss}{val}; model saved in {result.out}", file=sys.stdout)
    return 0
