"""Training: loss and gradient parity with transformers, accumulation, checkpoints, the loop.

Parity runs in fp32 with dropout off on random checkpoints saved by transformers
(conftest). The loop tests use tiny models (the full 50257 vocabulary, since the GPT-2
tokenizer writes the data) and one thread: the CI machine has 2 shared cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from conftest import assert_close_or_none
from minigpt2 import GPT2, GPT2Config, Tokenizer
from minigpt2.training import (
    TrainConfig,
    accumulate_gradients,
    learning_rate,
    load_tokens,
    make_optimizer,
    next_token_loss,
    plot_log,
    read_log,
    text_chunks,
    train,
    train_batch,
)

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# A model small enough to train in seconds on one thread; the vocabulary is GPT-2's.
TINY_TRAIN = dict(n_embd=32, n_layer=1, n_head=2, n_positions=32)
TEXT = "the quick brown fox jumps over the lazy dog. " * 300


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Two threads on 2 shared cores spin against each other (10x slower here); restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(make_checkpoint: Any, **config: Any) -> tuple[GPT2, Any]:
    """(minigpt2 model, transformers model) with the same random weights, both in train mode."""
    path, hf = make_checkpoint(seed=3, **{**NO_DROPOUT, **config})
    ours = GPT2.from_pretrained(path).train()
    return ours, hf.train()


def _batch(B: int = 3, T: int = 17, vocab: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, a right-padded mask (rows of different lengths) and labels with -100 at the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, B):
        mask[b, T - 4 * b :] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _assert_grads_match(ours: GPT2, hf: Any, rel: float = 1e-4) -> float:
    """Every named parameter's gradient within rel x its largest entry; returns the worst ratio."""
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs)
    worst = 0.0
    for name, p in mine.items():
        ref = theirs[name].grad
        assert p.grad is not None and ref is not None, name
        err = ((p.grad - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
        worst = max(worst, err)
        assert err <= rel, f"{name}: gradient differs by {err:.2e} of its largest entry"
    return worst


# ----------------------------------------------------------------------- parity
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "right-padded"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_loss_and_gradients_match_transformers(make_checkpoint: Any, padded: bool, checkpointing: bool) -> None:
    ours, hf = _pair(make_checkpoint)
    ids, mask, labels = _batch()
    if not padded:
        mask, labels = torch.ones_like(ids), ids
    if checkpointing:
        ours.gradient_checkpointing_enable()
        hf.gradient_checkpointing_enable()
    ours.zero_grad()
    hf.zero_grad()
    ref = hf(ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    loss = ours.loss(ids, attention_mask=mask, labels=labels)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    _assert_grads_match(ours, hf)
    # The tied matrix gets both uses' gradients (embedding + head), as in transformers.
    assert ours.lm_head.weight is ours.transformer.wte.weight
    ours.gradient_checkpointing = False


def test_checkpointing_actually_recomputes(make_checkpoint: Any) -> None:
    """With checkpointing each block starts twice per forward+backward (forward, then recompute)."""
    ours, _ = _pair(make_checkpoint)
    calls = []
    handle = ours.transformer.h[0].register_forward_pre_hook(lambda *a: calls.append(1))
    ids = _batch()[0]
    ours.loss(ids).backward()
    plain = len(calls)
    ours.gradient_checkpointing = True
    calls.clear()
    ours.loss(ids).backward()
    handle.remove()
    assert (plain, len(calls)) == (1, 2)


def test_default_labels_skip_padding_and_sum_reduction(make_checkpoint: Any) -> None:
    ours, hf = _pair(make_checkpoint)
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels).loss
        assert torch.allclose(ours.loss(ids, attention_mask=mask), ref, rtol=1e-5, atol=0)
        n = (labels[:, 1:] != -100).sum()
        total = ours.loss(ids, attention_mask=mask, labels=labels, reduction="sum")
        assert torch.allclose(total, ref * n, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        ours.loss(ids, reduction="none")


def test_left_padding_is_not_counted(gpt2_tiny_vocab_checkpoint: Any) -> None:
    """Labels derived from the mask count a target only when the position predicting it is real,
    so a left-padded row loses exactly what it loses alone (the issue's smallest input first)."""
    path, hf = gpt2_tiny_vocab_checkpoint
    model = GPT2.from_pretrained(path)
    with torch.no_grad():
        padded = model.loss(torch.tensor([[50256, 15496, 11]]), attention_mask=torch.tensor([[0, 1, 1]]), reduction="sum")
        alone = model.loss(torch.tensor([[15496, 11]]), reduction="sum")
        assert torch.allclose(padded, alone, rtol=1e-5, atol=0)  # one target (11), not two
        # A batch of rows of several lengths, left-padded: the sum is the rows' sums alone, and
        # the mean divides by the targets the rows have alone.
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, 50257, (n,), generator=g) for n in (9, 4, 1, 6)]
        T = max(len(r) for r in rows)
        ids = torch.stack([torch.cat([torch.full((T - len(r),), 50256), r]) for r in rows])
        mask = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows])
        sums = [model.loss(r[None], reduction="sum") for r in rows if len(r) > 1]
        assert torch.allclose(model.loss(ids, attention_mask=mask, reduction="sum"), sum(sums), rtol=1e-5, atol=0)
        targets = sum(len(r) - 1 for r in rows)
        assert torch.allclose(model.loss(ids, attention_mask=mask), sum(sums) / targets, rtol=1e-5, atol=0)
        # The same labels passed explicitly give the same loss, and so does transformers on them
        # (every counted target is predicted from a real position, whose logits both define alike).
        counted = mask.bool() & torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1).bool()
        labels = ids.masked_fill(~counted, -100)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(ids, attention_mask=mask, position_ids=position_ids, labels=labels).loss
        assert torch.allclose(model.loss(ids, attention_mask=mask, labels=labels), ref, rtol=1e-5, atol=0)


def test_explicit_labels_count_every_label(gpt2_tiny_vocab_checkpoint: Any) -> None:
    """Explicit labels keep transformers' semantics: every label that is not -100 is a target,
    also the first real token of a left-padded row, predicted from the padding before it."""
    path, _ = gpt2_tiny_vocab_checkpoint
    model = GPT2.from_pretrained(path)
    ids = torch.tensor([[50256, 50256, 15496, 11, 995]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)  # transformers' usual recipe
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        expected = torch.nn.functional.cross_entropy(logits[0, 1:4], labels[0, 2:5], reduction="sum")
        assert torch.allclose(model.loss(ids, attention_mask=mask, labels=labels, reduction="sum"), expected, rtol=1e-5)
        derived = model.loss(ids, attention_mask=mask, reduction="sum")
        assert torch.allclose(derived, torch.nn.functional.cross_entropy(logits[0, 2:4], labels[0, 3:5], reduction="sum"), rtol=1e-5)


def test_dropout_acts_in_train_mode_only(make_checkpoint: Any) -> None:
    path, _ = make_checkpoint(seed=3, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    model = GPT2.from_pretrained(path)
    ids = _batch()[0]
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))  # from_pretrained: eval mode
        model.train()
        assert not torch.allclose(model(ids), model(ids))
    # Attention dropout alone (through SDPA's dropout_p) changes the output too.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m is not model.transformer.h[0].attn.attn_dropout:
            m.p = 0.0
    with torch.no_grad():
        assert not torch.allclose(model(ids), model(ids))


# ----------------------------------------------------------------- accumulation
def test_accumulation_equals_one_big_batch_with_uneven_padding(make_checkpoint: Any) -> None:
    """Micro-batches with very different numbers of counted targets: the accumulated
    gradient is the gradient of the whole batch's mean, not the mean of micro-batch means."""
    ours, _ = _pair(make_checkpoint)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1000, (4, 12), generator=g)
    y = torch.randint(0, 1000, (4, 12), generator=g)
    y[:2, 2:] = -100  # first micro-batch: 4 counted targets; second: 24
    ours.zero_grad()
    big = next_token_loss(ours, x, y) / (y != -100).sum()
    big.backward()
    want = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    loss = accumulate_gradients(ours, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert torch.allclose(loss, big.detach(), rtol=1e-6, atol=0)
    for n, p in ours.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-7 * want[n].abs().max().item()), n
    # The per-micro-batch-mean bug would give a clearly different gradient here.
    ours.zero_grad()
    for xs, ys in [(x[:2], y[:2]), (x[2:], y[2:])]:
        (next_token_loss(ours, xs, ys) / (ys != -100).sum() / 2).backward()
    wte = ours.transformer.wte.weight
    assert not torch.allclose(wte.grad, want["transformer.wte.weight"], rtol=1e-2, atol=0)


# -------------------------------------------------------------------- saving
def test_save_pretrained_round_trips_through_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model.save_pretrained(tmp_path, base_model="none", data="synthetic", steps=7, final_val_loss=1.25)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
        assert (model.eval()(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()
        again = GPT2.from_pretrained(tmp_path)
        assert torch.equal(again(ids), model(ids))
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, this is <|endoftext|> a test"
    assert tok(text)["input_ids"] == Tokenizer.from_pretrained(tmp_path).encode(text)
    card = (tmp_path / "README.md").read_text()
    for needle in ("base model: none", "data: synthetic", "steps: 7", "final val loss: 1.25"):
        assert needle in card
    assert "](http" not in card.replace("](https://huggingface.co/", "")  # no placeholder links
    assert "https://github.com/)" not in card


# ----------------------------------------------------------- optimizer, schedule
def test_weight_decay_on_matrices_only() -> None:
    model = GPT2(GPT2Config(**TINY_TRAIN))
    opt = make_optimizer(model, TrainConfig(data="x", out="y", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_schedule_warmup_then_cosine_to_ten_percent() -> None:
    cfg = TrainConfig(data="x", out="y", lr=1e-3, warmup=10, steps=110)
    lrs = [learning_rate(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[59] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)  # half way 9 -> 109
    assert learning_rate(110, cfg) == pytest.approx(1e-4)
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-12)  # the floor at the last step, not one step later


@pytest.mark.parametrize("warmup", [0, 1, 5, 19, 20])
def test_schedule_peaks_once_and_ends_on_the_floor(warmup: int) -> None:
    # The tester's run: --steps 20 --warmup 5 logged the peak twice and ended at 6.59e-5, not 6e-5.
    cfg = TrainConfig(data="x", out="y", lr=6e-4, warmup=warmup, steps=20)
    lrs = [learning_rate(s, cfg) for s in range(cfg.steps)]
    peak = max(warmup - 1, 0)
    assert lrs[0] == pytest.approx(6e-4 / max(warmup, 1))
    assert lrs[peak] == pytest.approx(6e-4, rel=1e-12)
    assert sum(lr > 6e-4 * (1 - 1e-9) for lr in lrs) == 1  # the peak once
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    if peak < cfg.steps - 1:
        assert lrs[-1] == pytest.approx(6e-5, rel=1e-12)


# ------------------------------------------------------------------------- data
def test_data_folder_cache_and_batches(tmp_path: Path) -> None:
    tok = Tokenizer()
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("first file")
    (folder / "b.txt").write_text("second file")
    tokens, key = load_tokens(folder, tok, tmp_path / "cache")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == tok.encode("first file") + [tok.eos_token_id] + tok.encode("second file")
    cached = next((tmp_path / "cache").iterdir())
    mtime = cached.stat().st_mtime_ns
    assert load_tokens(folder, tok, tmp_path / "cache")[1] == key and cached.stat().st_mtime_ns == mtime
    (folder / "b.txt").write_text("second file, edited")
    assert load_tokens(folder, tok, tmp_path / "cache")[1] != key
    # Batches: blocks of T + 1 consecutive tokens, targets shifted by one, same for the same step.
    data = np.arange(1000, dtype=np.uint16)
    x, y = train_batch(data, step=5, rows=6, block_size=8, seed=0)
    assert x.shape == y.shape == (6, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(6, 7, dtype=torch.long))
    assert torch.equal(train_batch(data, 5, 6, 8, 0)[0], x) and not torch.equal(train_batch(data, 6, 6, 8, 0)[0], x)


def test_chunked_tokenization_equals_the_whole() -> None:
    """Large files are tokenized in chunks; the ids must be those of the whole text."""
    tok = Tokenizer()
    text = ("A line.\nAnother line,\n\nafter a blank line\n  indented\n\tTab\n<|endoftext|>next\n"
            "don't\nstop\u00a0here\n \nend") * 20
    for size in (1, 5, 40, 10**6):
        chunks = text_chunks(text, size)
        assert "".join(chunks) == text
        assert [i for c in chunks for i in tok.encode(c)] == tok.encode(text), size
    assert len(text_chunks(text, 5)) > 20


# ------------------------------------------------------------------------ loop
def _config_file(tmp_path: Path, **overrides: Any) -> str:
    text = json.dumps({**TINY_TRAIN, **overrides})
    path = tmp_path / f"config-{abs(hash(text))}.json"
    path.write_text(text)
    return str(path)


def _cfg(tmp_path: Path, out: str = "out", **kw: Any) -> TrainConfig:
    data = tmp_path / "text.txt"
    if not data.exists():
        data.write_text(TEXT)
    defaults = dict(
        data=str(data), out=str(tmp_path / out), config=_config_file(tmp_path), batch_size=4, block_size=16,
        lr=1e-2, warmup=5, eval_every=0, eval_batches=2, sample_tokens=4, cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    return TrainConfig(**{**defaults, **kw})


def test_training_from_scratch_learns_repeating_text(tmp_path: Path) -> None:
    result = train(_cfg(tmp_path, steps=150, eval_every=50, plot=str(tmp_path / "loss.png")))
    assert result.step == 150 and not result.interrupted
    assert len(result.val_losses) == 3
    assert result.val_losses[0][1] < math.log(50257) - 5  # 10.8 -> well below
    assert result.val_loss < 1.0, result.val_losses
    records = read_log(result.out)
    assert [r["step"] for r in records] == list(range(1, 151))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if r.get("val_loss") is not None] == [50, 100, 150]
    assert_close_or_none(records[49]["val_loss"], result.val_losses[0][1], what="val_loss at step 50")
    assert "sample" in records[49]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    # The output directory is a model directory transformers loads, with the same logits.
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(result.out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = GPT2.from_pretrained(result.out)
    ids = torch.tensor([Tokenizer().encode("the quick brown fox")])
    with torch.no_grad():
        assert (ours(ids) - hf.eval()(ids).logits).abs().max() <= 1e-4 * ours(ids).abs().max()
    card = (result.out / "README.md").read_text()
    assert "steps: 150" in card and "final val loss" in card
    state = json.loads((result.out / "training_state.json").read_text())
    assert state["step"] == 150


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """N steps, then resume to 2N: the same losses (exactly, fp32 on CPU) as 2N in one go.
    Dropout stays on, so the restored RNG state is tested too."""
    common = dict(decay_steps=16, config=_config_file(tmp_path, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    full = train(_cfg(tmp_path, out="full", steps=16, **common))
    first = train(_cfg(tmp_path, out="split", steps=8, **common))
    assert first.step == 8
    with pytest.raises(ValueError, match="--resume"):
        train(_cfg(tmp_path, out="split", steps=16, **common))
    with pytest.raises(ValueError, match="already at step 8"):
        train(_cfg(tmp_path, out="split", steps=8, resume=True, **common))
    second = train(_cfg(tmp_path, out="split", steps=16, resume=True, **common))
    assert first.losses + second.losses == full.losses
    assert [r["loss"] for r in read_log(tmp_path / "split")] == [loss for _, loss in full.losses]
    a, b = GPT2.from_pretrained(tmp_path / "full"), GPT2.from_pretrained(tmp_path / "split")
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_finetune_from_checkpoint_with_grad_accum_and_bf16(tmp_path: Path, make_checkpoint: Any) -> None:
    """--model path: weights load, train in bf16 autocast with accumulation; weights and AdamW stay fp32."""
    path, _ = make_checkpoint(seed=4, vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    cfg = _cfg(tmp_path, config=None, model=str(path), steps=3, grad_accum=2, precision="bf16", lr=1e-3)
    result = train(cfg)
    assert result.step == 3 and math.isfinite(result.train_loss)
    model = GPT2.from_pretrained(result.out)
    assert model.dtype == torch.float32
    from safetensors.torch import load_file

    state = load_file(result.out / "training_state.safetensors")
    assert state["optimizer.transformer.wte.weight.exp_avg"].dtype == torch.float32
    assert json.loads((result.out / "training_state.json").read_text())["train_config"]["precision"] == "bf16"


def test_plot_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 5.0 / i, "lr": 1e-3, **({"val_loss": 6.0 / i} if i % 2 == 0 else {})}) + "\n" for i in range(1, 9)))
    plot_log(log, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ bad input
def _expect(cfg: TrainConfig, exc: type[Exception], match: str) -> None:
    cfg.steps = cfg.steps and 2  # should it not raise, fail fast
    with pytest.raises(exc, match=match):
        train(cfg)
    assert not (Path(cfg.out) / "log.jsonl").exists()  # nothing ran


def test_bad_inputs_fail_before_any_step(tmp_path: Path) -> None:
    _expect(_cfg(tmp_path, data=str(tmp_path / "nope.txt")), FileNotFoundError, "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    _expect(_cfg(tmp_path, data=str(tmp_path / "empty.txt")), ValueError, "empty")
    (tmp_path / "empty_dir").mkdir()
    _expect(_cfg(tmp_path, data=str(tmp_path / "empty_dir")), ValueError, "no .txt")
    (tmp_path / "short.txt").write_text("just a few words " * 3)
    _expect(_cfg(tmp_path, data=str(tmp_path / "short.txt")), ValueError, "fewer than one block")
    _expect(_cfg(tmp_path, block_size=64), ValueError, "block_size=64 exceeds .*n_positions=32")
    _expect(_cfg(tmp_path, config=_config_file(tmp_path, vocab_size=1000)), ValueError, "vocab_size=1000 .* 50257")
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    _expect(_cfg(tmp_path, config=str(tmp_path / "bert.json")), ValueError, "bert")
    _expect(_cfg(tmp_path, config=None), ValueError, "model .* or config")
    _expect(_cfg(tmp_path, model="x", config="y"), ValueError, "not both")
    _expect(_cfg(tmp_path, steps=0), ValueError, "steps=0")
    _expect(_cfg(tmp_path, precision="fp16"), ValueError, "precision")
    _expect(_cfg(tmp_path, val_fraction=1.0), ValueError, "val_fraction")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    _expect(_cfg(tmp_path, out="other"), ValueError, "other files")
    _expect(_cfg(tmp_path, out="fresh", resume=True), ValueError, "nothing to resume")
    assert (other / "notes.md").read_text() == "mine"
