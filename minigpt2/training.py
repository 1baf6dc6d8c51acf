"""Training and fine-tuning GPT-2, top to bottom.

    from minigpt2.training import TrainConfig, train
    result = train(TrainConfig(data="input.txt", out="runs/shakespeare", model="gpt2", steps=500))

Reading order: ``TrainConfig`` (every knob, with its default), the data (text -> a uint16
memmap of token ids, cached), the batches (random contiguous blocks, drawn from the step
number, so any step's batch can be re-drawn), the optimizer (AdamW, decay on matrices only),
the schedule (linear warmup, cosine to 10%), the loss and gradient accumulation, evaluation
and samples, ``train`` (the loop), checkpoints (``--out`` is a model directory plus the
training state), and the helpers for ``torchrun`` (DistributedDataParallel).

References: nanoGPT's ``train.py`` (karpathy) for the shape of the loop; the GPT-3 paper
(Brown et al., 2020, appendix B) for AdamW betas (0.9, 0.95), weight decay 0.1, gradient
clipping at 1.0 and cosine decay to 10% of the peak learning rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import GPT2Config
from .loading import resolve_device
from .model import GPT2
from .tokenizer import Tokenizer


# ============================================================================ config
@dataclass
class TrainConfig:
    """Everything a training run needs. The CLI flags are these fields (``--batch-size`` ...)."""

    data: str  # a .txt file, or a folder of .txt files (joined with <|endoftext|> between files)
    out: str  # output directory: a model directory at every checkpoint, + training state + log.jsonl
    model: str | None = None  # fine-tune this checkpoint (Hub id or directory) ...
    config: str | None = None  # ... or train from scratch with this config.json (absent keys: GPT-2's)
    steps: int = 1000  # optimizer steps to train to (counted from the start of the run, not of this call)
    batch_size: int = 8  # rows of block_size tokens per micro-batch (over all processes under torchrun)
    block_size: int = 256  # tokens per row (context length); at most the model's n_positions
    grad_accum: int = 1  # micro-batches per optimizer step: one step sees batch_size * grad_accum rows
    lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of lr (GPT-3: 10%)
    warmup: int = 100  # steps of linear warmup from lr / warmup to lr
    decay_steps: int | None = None  # length of warmup + cosine; None: steps (after it, lr stays at the floor)
    weight_decay: float = 0.1  # AdamW's decoupled decay, on weight matrices and embeddings only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay (GPT-3's 0.95, steadier than 0.999)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    val_fraction: float = 0.1  # the last fraction of the tokens is held out for validation (0: none)
    eval_every: int = 100  # validation loss and a sample every this many steps, and at the end (0: end only)
    eval_batches: int = 10  # batches of batch_size rows in one validation measurement
    save_every: int = 500  # checkpoint every this many steps, and at the end (0: end only)
    sample_prompt: str = "\n"  # the prompt of the sample printed at each evaluation
    sample_tokens: int = 32  # tokens in that sample (0: no samples)
    seed: int = 1337  # one seed for initialisation, batches, dropout and samples
    device: str | None = None  # cpu, cuda, cuda:N, mps; None: the best available (cuda:LOCAL_RANK under torchrun)
    precision: str | None = None  # fp32 or bf16 (autocast; weights and AdamW state stay fp32); None: bf16 on CUDA that supports it, else fp32
    dropout: float | None = None  # override embd/attn/resid_pdrop of the model's config (None: keep them)
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, same gradients
    resume: bool = False  # continue the run saved in out (weights, AdamW, step, RNG, log)
    cache_dir: str | None = None  # where token memmaps are kept; None: $XDG_CACHE_HOME/minigpt2/tokens
    plot: str | None = None  # draw train / val loss against steps into this .png at each checkpoint
    progress: bool = True  # show a progress bar (rank 0, on stderr)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # free-form notes copied into the model card


@dataclass
class TrainResult:
    """What ``train`` returns."""

    step: int  # optimizer steps done (in the whole run, resumed parts included)
    train_loss: float | None  # mean loss of the last step
    val_loss: float | None  # last validation loss (None without a validation split)
    losses: list[tuple[int, float]]  # (step, train loss) of every step of this call
    val_losses: list[tuple[int, float]]  # (step, val loss) measured in this call
    out: Path  # the output directory (a loadable model directory)
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT) after saving a checkpoint


# ============================================================================== data
def text_files(data: str | os.PathLike[str]) -> list[Path]:
    """The text files of ``data``: the file itself, or the .txt files under a folder, sorted."""
    path = Path(data).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"data folder {path} holds no .txt files")
        return files
    raise FileNotFoundError(f"data not found: {path}")


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Changes when the tokenizer would give other ids (another vocabulary, added tokens or flags)."""
    probe = "Hello world, 123 ünïcödé <|endoftext|> tokens\n\n  end"
    added = sorted((i, t.to_json()) for i, t in tokenizer.added_tokens_decoder.items())
    return json.dumps([tokenizer.n_vocab, tokenizer.eos_token_id, added, tokenizer.add_prefix_space,
                       tokenizer.encode(probe)])


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "minigpt2" / "tokens"


def load_tokens(
    data: str | os.PathLike[str], tokenizer: Tokenizer, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, str]:
    """All tokens of ``data`` as a read-only memmap, and the cache key (a hash of text + tokenizer).

    The text is tokenized once into ``cache_dir/<key>.bin`` (uint16 ids while they fit, as
    nanoGPT does: half the disk and page cache of int32); later runs on unchanged text map
    that file instead. Files of a folder are joined with <|endoftext|>, GPT-2's document
    separator, so no block reads across two files without being told.
    """
    files = text_files(data)
    digest = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode())
    for f in files:
        raw = f.read_bytes()
        digest.update(f"{len(raw)}:".encode())
        digest.update(raw)
    key = digest.hexdigest()[:32]
    dtype = np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"{key}.{np.dtype(dtype).name}.bin"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache)
        try:
            with os.fdopen(fd, "wb") as out:
                for i, f in enumerate(files):
                    try:
                        text = f.read_text(encoding="utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{f} is not UTF-8 text ({e})") from None
                    if i > 0:
                        out.write(np.asarray([tokenizer.eos_token_id], dtype=dtype).tobytes())
                    for ids in tokenizer.encode_batch(text_chunks(text)):
                        out.write(np.asarray(ids, dtype=dtype).tobytes())
            if os.path.getsize(tmp) == 0:
                raise ValueError(f"data {data} is empty")
            os.replace(tmp, path)  # another process may have written the same file: same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if path.stat().st_size == 0:
        raise ValueError(f"data {data} is empty")
    return np.memmap(path, dtype=dtype, mode="r"), key


_CHUNK_END = re.compile(r"(?<=\S)\n(?=\S)")


def text_chunks(text: str, size: int = 1 << 20) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters that tokenize to exactly the
    tokens of the whole (so a large file is tokenized in parallel, without one huge list).

    Each cut falls right after a lone newline between two non-space characters: GPT-2's
    pre-tokenizer makes that newline a piece of its own, in the whole text as at the end of
    a chunk, and BPE never merges across pieces. (After a run of whitespace it would not:
    "\n\n" ends a text as one token but is two before a word.)
    """
    chunks, start = [], 0
    while start < len(text):
        m = _CHUNK_END.search(text, start + size)
        end = m.end() if m else len(text)
        chunks.append(text[start:end])
        start = end
    return chunks


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last ``val_fraction`` of the tokens is the validation split."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


# =========================================================================== batches
def blocks(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets from blocks of block_size + 1 tokens: x = block[:-1], y = block[1:]."""
    rows = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]  # (B, T), (B, T)


def train_batch(tokens: np.ndarray, step: int, rows: int, block_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of optimizer step ``step``: ``rows`` random contiguous blocks.

    Drawn from a generator seeded by (seed, step) alone, so it does not depend on the
    number of processes, and a resumed run draws exactly the batches it would have drawn:
    the data position is the step number.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block_size, size=rows)  # block needs block_size + 1 tokens
    return blocks(tokens, starts, block_size)


def val_starts(n_tokens: int, block_size: int, n_rows: int) -> np.ndarray:
    """Fixed, evenly spaced blocks over the whole validation split (the same at every evaluation)."""
    return np.linspace(0, n_tokens - block_size - 1, n_rows).round().astype(np.int64)


def shard(x: Any, rank: int, world: int) -> Any:
    """This process's contiguous slice of the global batch's rows."""
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per]


# ========================================================================= optimizer
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (Conv1D weights, wte, wpe), none on biases and LayerNorms.

    Decay pulls weights toward 0; on a LayerNorm gain (around 1) or a bias that is a
    pull toward a meaningless value, hence the GPT-3 / nanoGPT split by dimension.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel on CPU and CUDA (one pass over each
    parameter instead of several: about 4x faster a step than the default on CPU)."""
    device = next(model.parameters()).device
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cpu", "cuda"))


# ========================================================================== schedule
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Linear warmup to ``lr`` over ``warmup`` steps (``lr / warmup`` at step 0, ``lr`` at step
    ``warmup - 1``, once), then a half cosine from there down to ``min_lr_ratio * lr`` at the
    last step of ``decay_steps`` (default: the last step, ``steps - 1``), then flat.
    nanoGPT's shape, with its 0-based off-by-ones removed (there the peak is used twice and
    the last step stays above the floor).
    """
    total = cfg.decay_steps if cfg.decay_steps is not None else cfg.steps
    floor = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    peak = max(cfg.warmup - 1, 0)  # the step at lr: warmup's last, or step 0 without warmup
    if step >= total - 1:
        return floor if step > peak else cfg.lr
    progress = (step - peak) / (total - 1 - peak)  # 0 at the peak -> 1 at the last step
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)


# ====================================================================== loss, grads
def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (matmuls in bf16, weights and their gradients stay fp32), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the targets ``y`` (already shifted: y[t] follows x[..t]); -100 is ignored.

    (``GPT2.loss`` shifts labels itself; the loop's blocks come shifted, so every one of the
    T inputs gets a target.)
    """
    logits = model(x)  # (B, T, V) fp32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "fp32",
) -> torch.Tensor:
    """Backward through every micro-batch; the ``.grad`` fields then hold the gradient of ONE
    mean: the summed loss over every counted target of all micro-batches (of all processes
    under DDP) divided by the number of those targets. Returns that mean loss (detached).

    Averaging each micro-batch's own mean instead would weight a token of a short
    (heavily padded) micro-batch more than one of a full micro-batch: the gradient
    accumulation bug that transformers' Trainer had until 2024.
    """
    device = micro_batches[0][0].device
    n_targets = sum((y != -100).sum() for _, y in micro_batches).to(device=device, dtype=torch.float32)
    ddp = isinstance(model, DDP)
    world = dist.get_world_size() if ddp else 1
    if ddp:
        dist.all_reduce(n_targets)
    n_targets = n_targets.clamp(min=1.0)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        # DDP averages gradients over processes at the last micro-batch's backward; the
        # factor `world` turns that average back into the sum each term already divides.
        sync = contextlib.nullcontext() if (not ddp or i == len(micro_batches) - 1) else model.no_sync()
        with sync:
            with autocast(device, precision):
                loss_sum = next_token_loss(model, x, y)
            (loss_sum * (world / n_targets)).backward()
        total += loss_sum.detach().float()
    if ddp:
        dist.all_reduce(total)
    return total / n_targets


# ======================================================================= evaluation
@torch.no_grad()
def evaluate(
    model: torch.nn.Module, val: np.ndarray, cfg: TrainConfig, device: torch.device, precision: str, rank: int, world: int
) -> float:
    """Mean loss over ``eval_batches`` fixed blocks of the validation split (model in eval mode)."""
    was_training = model.training
    model.eval()
    starts = val_starts(len(val), cfg.block_size, cfg.eval_batches * cfg.batch_size)
    total = torch.zeros(2, device=device)  # (summed loss, counted targets)
    for i in range(0, len(starts), cfg.batch_size):
        x, y = blocks(val, shard(starts[i : i + cfg.batch_size], rank, world), cfg.block_size)
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            total[0] += next_token_loss(model, x, y).float()
        total[1] += y.numel()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def sample(model: GPT2, tokenizer: Tokenizer, prompt: str, n_tokens: int, seed: int, top_k: int = 40) -> str:
    """A short top-k sample from ``prompt`` (``model.generate``), to watch what the model has learned.

    Its own generator: sampling leaves the training run's random stream untouched.
    """
    was_training = model.training
    model.eval()
    n_positions = model.config.n_positions
    ids = (tokenizer.encode(prompt) or [tokenizer.eos_token_id])[-(n_positions - 1) :]
    x = torch.tensor([ids], device=model.device)
    g = torch.Generator(device=model.device).manual_seed(seed)
    out = model.generate(x, max_new_tokens=min(n_tokens, n_positions - len(ids)), do_sample=True, top_k=top_k,
                         generator=g)
    model.train(was_training)
    return tokenizer.decode(out[0, len(ids) :].tolist())


# ========================================================================= the loop
def train(cfg: TrainConfig) -> TrainResult:
    """Train (or fine-tune) as ``cfg`` says; checkpoints go to ``cfg.out``. See the module docstring.

    Every check (data, sizes, vocabulary, output directory) runs before the first step.
    Under ``torchrun`` each process runs this same function; only rank 0 writes and prints.
    The caller's RNG state is restored on return.
    """
    _check_config(cfg)
    rank, world, local_rank = _dist_env()
    device = _device(cfg.device, local_rank if world > 1 else None)
    precision = _precision(cfg.precision, device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world} processes")
    out = Path(cfg.out).expanduser()
    state = _check_out_dir(out, cfg.resume)
    if state is not None:
        check_resume_source(cfg.model, cfg.config, state.get("train_config") or {}, out)
    if state is not None and cfg.steps <= int(state["step"]):
        raise ValueError(f"the run in {out} is already at step {state['step']}; give --steps > {state['step']} to continue it")
    if cfg.plot:
        _require_matplotlib()
    started_dist = _init_dist(world, device)
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices, device_type=device.type if fork_devices else "cuda"):
            return _train(cfg, out, state, device, precision, rank, world)
    finally:
        if started_dist:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, out: Path, state: dict[str, Any] | None, device: torch.device, precision: str, rank: int, world: int
) -> TrainResult:
    # ---------------------------------------------------------------- the model
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    model, tokenizer, base = _build_model(cfg, out if state is not None else None)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(
            f"the model's vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.n_vocab} token ids; use vocab_size >= {tokenizer.n_vocab}"
        )
    if cfg.block_size > model.config.n_positions:
        raise ValueError(f"block_size={cfg.block_size} exceeds the model's n_positions={model.config.n_positions}")
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.tokenizer = tokenizer  # save_pretrained writes these tokenizer files with every checkpoint

    # ----------------------------------------------------------------- the data
    # Rank 0 tokenizes once; the others wait, then map its cached file. An error on rank 0
    # (empty data, ...) is raised on every process, so none waits forever.
    error: Exception | None = None
    if rank == 0:
        try:
            tokens, data_key = load_tokens(cfg.data, tokenizer, cfg.cache_dir)
        except (ValueError, OSError) as e:
            error = e
    if _any_rank(error is not None, world, device):
        raise error or ValueError(f"could not read the data {cfg.data} (see the first process's error)")
    if rank != 0:
        tokens, data_key = load_tokens(cfg.data, tokenizer, cfg.cache_dir)
    train_tokens, val_tokens = split_tokens(tokens, cfg.val_fraction)
    for name, split in (("training", train_tokens), ("validation", val_tokens)):
        if (name == "training" or cfg.val_fraction > 0) and len(split) < cfg.block_size + 1:
            raise ValueError(
                f"the {name} split of {cfg.data} has {len(split)} tokens, fewer than one block of "
                f"block_size + 1 = {cfg.block_size + 1}; use a smaller --block-size"
                + (" or --val-fraction" if name == "validation" else "")
                + " or more text"
            )

    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    start = 0
    if state is not None:
        start = _load_training_state(out, state, model, optimizer, device, rank, world, data_key, cfg)
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout masks differ between processes
    ddp_model: torch.nn.Module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    # ------------------------------------------------------------------ the loop
    log_path = out / "log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, start)
    rows = cfg.batch_size * cfg.grad_accum  # rows of one optimizer step, all processes together
    losses: list[tuple[int, float]] = []
    val_losses: list[tuple[int, float]] = []
    last_val = state.get("val_loss") if state else None
    last_loss = state.get("train_loss") if state else None
    bar = _progress(cfg, start, rank)
    interrupted = False
    step = start
    with _sigint_flag() as stop_requested:
        for step in range(start + 1, cfg.steps + 1):  # `step` = optimizer steps done after this one
            t0 = time.perf_counter()
            lr = learning_rate(step - 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = train_batch(train_tokens, step, rows, cfg.block_size, cfg.seed)  # (rows, T) each
            x, y = shard(x, rank, world).to(device), shard(y, rank, world).to(device)  # (rows / world, T)
            micro = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
            loss = accumulate_gradients(ddp_model, micro, precision)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss.item()
            tokens_per_s = rows * cfg.block_size / (time.perf_counter() - t0)
            losses.append((step, last_loss))
            record: dict[str, Any] = {"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1)}

            final = step == cfg.steps
            if cfg.val_fraction > 0 and ((cfg.eval_every and step % cfg.eval_every == 0) or final):
                last_val = evaluate(model, val_tokens, cfg, device, precision, rank, world)
                record["val_loss"] = last_val
                val_losses.append((step, last_val))
                if rank == 0 and cfg.sample_tokens > 0:
                    with autocast(device, precision):
                        record["sample"] = sample(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.seed + step)
                    _print(bar, f"step {step}: val loss {last_val:.4f} | sample: {record['sample']!r}")
            if rank == 0:
                _append_log(log_path, record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                bar.update(1)

            interrupted = _any_rank(stop_requested(), world, device)
            if final or interrupted or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(out, model, optimizer, cfg, step, base, data_key, last_loss, last_val, rank, world)
                if rank == 0 and cfg.plot:
                    plot_log(log_path, cfg.plot)
            if interrupted:
                if rank == 0:
                    _print(bar, f"interrupted: checkpoint of step {step} saved in {out}; continue with --resume")
                break
    bar.close()
    return TrainResult(step, last_loss, last_val, losses, val_losses, out, interrupted)


# ---------------------------------------------------------------- building blocks
def _check_config(cfg: TrainConfig) -> None:
    """ValueError for a field out of range, naming the field and the limit."""
    positive = ("steps", "batch_size", "block_size", "grad_accum", "eval_batches")
    for name in positive:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    for name in ("warmup", "eval_every", "save_every", "sample_tokens"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r} must be an integer >= 0")
    if cfg.decay_steps is not None and (not isinstance(cfg.decay_steps, int) or cfg.decay_steps < 1):
        raise ValueError(f"decay_steps={cfg.decay_steps!r} must be a positive integer or None")
    if not cfg.lr > 0:
        raise ValueError(f"lr={cfg.lr!r} must be > 0")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={cfg.min_lr_ratio!r} must be in [0, 1]")
    if not cfg.weight_decay >= 0:
        raise ValueError(f"weight_decay={cfg.weight_decay!r} must be >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be in [0, 1)")
    if not cfg.grad_clip >= 0:
        raise ValueError(f"grad_clip={cfg.grad_clip!r} must be >= 0")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction={cfg.val_fraction!r} must be in [0, 1)")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout={cfg.dropout!r} must be in [0, 1)")
    if cfg.model is not None and cfg.config is not None:
        raise ValueError("give either model (fine-tune a checkpoint) or config (train from scratch), not both")
    if cfg.model is None and cfg.config is None and not cfg.resume:
        raise ValueError("give model (a checkpoint to fine-tune) or config (a config.json to train from scratch)")
    text_files(cfg.data)  # FileNotFoundError / ValueError now, before any model is built


def _device(name: str | None, local_rank: int | None) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and local_rank is not None and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _precision(precision: str | None, device: torch.device) -> str:
    if precision is None:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r} must be 'fp32' or 'bf16'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' is not supported on {torch.cuda.get_device_name(device)}; use fp32")
    return precision


def _build_model(cfg: TrainConfig, resume_dir: Path | None) -> tuple[GPT2, Tokenizer, str]:
    """(model in fp32, its tokenizer, a description of where it came from for the model card)."""
    if resume_dir is not None:
        model = GPT2.from_pretrained(resume_dir)
        return model, Tokenizer.from_pretrained(resume_dir), "resumed"
    if cfg.model is not None:
        model = GPT2.from_pretrained(cfg.model, dtype=torch.float32)
        return model, Tokenizer.from_pretrained(cfg.model), str(cfg.model)
    config = GPT2Config.from_json_file(cfg.config)  # type: ignore[arg-type]
    return GPT2(config), Tokenizer(), f"none (trained from scratch, config {cfg.config})"


def set_dropout(model: GPT2, p: float) -> None:
    """Set every dropout probability (embeddings, attention, residual) to ``p``, config included."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    model.config.embd_pdrop = model.config.attn_pdrop = model.config.resid_pdrop = p


def _progress(cfg: TrainConfig, start: int, rank: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not cfg.progress or rank != 0,
                dynamic_ncols=True, file=sys.stderr)


def _print(bar: Any, message: str) -> None:
    bar.write(message, file=sys.stderr)


@contextlib.contextmanager
def _sigint_flag() -> Iterator[Any]:
    """While inside, the first Ctrl-C only asks the loop to save and stop after the current
    step; a second one interrupts at once. The previous handler is restored on exit."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set  # signals only reach the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print("\nminigpt2: Ctrl-C: saving a checkpoint after this step (again to quit at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


# ====================================================================== checkpoints
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
LOG = "log.jsonl"


def check_resume_source(model: str | None, config: str | None, saved: dict[str, Any], out: str | Path) -> None:
    """Refuse a ``model`` / ``config`` that is not the one the run saved in ``out`` started from.

    ``saved``: that run's train_config (training_state.json). None means "not given". A
    resumed run continues its own weights, so another source would be silently ignored.
    Raises ValueError naming both.
    """
    for name, given in (("model", model), ("config", config)):
        if given is None:
            continue
        was = saved.get(name)
        if was is not None and _same_source(str(given), str(was)):
            continue
        if was is None:
            other = "model" if name == "config" else "config"
            origin = f"--{other} {saved.get(other)}" if saved.get(other) is not None else "another source"
        else:
            origin = f"--{name} {was}"
        raise ValueError(f"--{name} {given} disagrees with the run saved in {out}, which started from {origin}; "
                         f"leave --{name} out to resume it")


def _same_source(a: str, b: str) -> bool:
    """The same Hub id, or two spellings of one local path."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _check_out_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """The saved training state when resuming (None for a new run); refuse a directory that
    holds something else, or a previous run without ``resume``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    if not entries:
        if resume:
            raise ValueError(f"nothing to resume: {out} holds no previous run")
        return None
    if not (out / STATE_JSON).is_file():
        raise ValueError(
            f"--out {out} already holds other files ({', '.join(sorted(entries)[:3])}...); "
            "give a new or empty directory"
        )
    try:
        state = json.loads((out / STATE_JSON).read_text(encoding="utf-8"))
        step = int(state["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{out / STATE_JSON} is not a valid training state ({type(e).__name__}: {e})") from None
    if not resume:
        raise ValueError(
            f"--out {out} holds a previous run (step {step}); pass --resume to continue it, or give another directory"
        )
    if not (out / STATE_TENSORS).is_file():
        raise FileNotFoundError(f"{out / STATE_TENSORS} not found: cannot resume")
    return state


def save_checkpoint(
    out: Path, model: GPT2, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, base: str,
    data_key: str, train_loss: float | None, val_loss: float | None, rank: int, world: int,
) -> None:
    """Write the model directory (weights, config, tokenizer, model card) and the training
    state: AdamW moments, step, every process's RNG state (safetensors), the rest as JSON.

    Every process takes part (RNG states are gathered); only rank 0 writes. The JSON is
    written last, so a state file is never newer than the weights it describes.
    """
    rng = _gather_rng_states(world, model.device)
    if rank != 0:
        _barrier(world)
        return
    from safetensors.torch import save_file

    from .hub import atomic_write

    card = {
        "base_model": base if base != "resumed" else _previous_base(out),
        "data": str(cfg.data),
        "steps": step,
        "tokens_seen": step * cfg.batch_size * cfg.grad_accum * cfg.block_size,
        "final_train_loss": None if train_loss is None else round(train_loss, 4),
        "final_val_loss": None if val_loss is None else round(val_loss, 4),
        **cfg.extra,
    }
    model.save_pretrained(out, title="GPT-2 trained with minigpt2", **card)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for p, s in optimizer.state.items():
        for k, v in s.items():  # step, exp_avg, exp_avg_sq
            tensors[f"optimizer.{names[id(p)]}.{k}"] = v.detach().to("cpu").contiguous()
    for key, t in rng.items():
        tensors[f"rng.{key}"] = t
    atomic_write(out / STATE_TENSORS, lambda p: save_file(tensors, p))
    state = {
        "format": 1,
        "step": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "world_size": world,
        "base_model": card["base_model"],
        "data_key": data_key,
        "train_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"},
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    }
    atomic_write(out / STATE_JSON, json.dumps(state, indent=2) + "\n")
    _barrier(world)


def _previous_base(out: Path) -> str:
    try:
        return str(json.loads((out / STATE_JSON).read_text(encoding="utf-8")).get("base_model", "unknown"))
    except (OSError, ValueError):
        return "unknown"


def _load_training_state(
    out: Path, state: dict[str, Any], model: GPT2, optimizer: torch.optim.Optimizer, device: torch.device,
    rank: int, world: int, data_key: str, cfg: TrainConfig,
) -> int:
    """Restore AdamW's moments, this process's RNG state and return the step to continue from."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(out / STATE_TENSORS)
    except Exception as e:
        raise ValueError(f"{out / STATE_TENSORS} is not a readable training state ({type(e).__name__}: {e})") from None
    # Rebuild AdamW's state dict (parameters are numbered in group order) and let
    # load_state_dict place each tensor where this optimizer keeps it.
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    saved_state = optimizer.state_dict()
    for name, p in model.named_parameters():
        keys = {k: f"optimizer.{name}.{k}" for k in ("step", "exp_avg", "exp_avg_sq")}
        if not all(key in tensors for key in keys.values()):
            raise ValueError(f"{out / STATE_TENSORS} has no AdamW state for {name}: cannot resume")
        saved_state["state"][index[id(p)]] = {k: tensors[key] for k, key in keys.items()}
    optimizer.load_state_dict(saved_state)
    cpu = tensors.get(f"rng.cpu.{rank}")
    if cpu is not None and state.get("world_size") == world:
        torch.set_rng_state(cpu)
        if device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], device)
    else:
        torch.manual_seed(cfg.seed + rank + int(state["step"]))
    saved = state.get("train_config", {})
    changed = [k for k in ("batch_size", "block_size", "grad_accum", "seed", "lr", "warmup", "min_lr_ratio")
               if k in saved and saved[k] != getattr(cfg, k)]
    if rank == 0 and (changed or state.get("data_key") != data_key):
        what = ", ".join(changed + (["the data"] if state.get("data_key") != data_key else []))
        print(f"minigpt2: note: {what} changed since the saved run; the continuation will differ "
              "from an uninterrupted run", file=sys.stderr)
    return int(state["step"])


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (a run that died after its last checkpoint logged steps
    the resumed run will do again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):  # a line cut short by a crash
            continue
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a log.jsonl."""
    p = Path(path)
    if p.is_dir():
        p = p / LOG
    if not p.is_file():
        raise FileNotFoundError(f"training log not found: {p}")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'minigpt2[viz]'") from None


def plot_log(log: str | os.PathLike[str], png: str | os.PathLike[str]) -> None:
    """Draw train and validation loss against steps from a log.jsonl into ``png``.

    Uses a bare matplotlib Figure (no pyplot), so no global backend or state is touched.
    """
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", linewidth=1)
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(png).expanduser().parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(png).expanduser())


# ==================================================================== DDP helpers
def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _init_dist(world: int, device: torch.device) -> bool:
    """Join the process group (nccl on CUDA, gloo on CPU) unless one exists; True if we started it."""
    if world <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every process if it is True on any (so all stop at the same step)."""
    if world <= 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_rng_states(world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's torch RNG states (CPU, and CUDA when used), keyed cpu.RANK / cuda.RANK."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if world <= 1:
        return {f"{k}.0": v for k, v in states.items()}
    comm = device if device.type == "cuda" else torch.device("cpu")
    out = {}
    for k, v in states.items():
        parts = [torch.empty_like(v, device=comm) for _ in range(world)]
        dist.all_gather(parts, v.to(comm))
        out.update({f"{k}.{r}": t.cpu() for r, t in enumerate(parts)})
    return out
