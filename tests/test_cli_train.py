"""``minigpt2 train`` through subprocesses: a run, its errors, Ctrl-C, resume, and torchrun.

Tiny model (GPT-2's vocabulary, 1 layer, width 32), one thread per process (the CI machine
has 2 shared cores), a few steps per run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from conftest import assert_close_or_none
from minigpt2.training import TrainConfig, read_log, train

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
TEXT = "the quick brown fox jumps over the lazy dog. " * 300


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return {"data": str(tmp_path / "text.txt"), "config": str(tmp_path / "config.json"), "dir": tmp_path}


def _args(files: dict[str, Any], out: str, *extra: str) -> list[str]:
    return [
        "train", "--data", files["data"], "--config", files["config"], "--out", str(files["dir"] / out),
        "--batch-size", "4", "--block-size", "16", "--lr", "1e-2", "--warmup", "2", "--eval-batches", "2",
        "--sample-tokens", "4", "--cache-dir", str(files["dir"] / "cache"), "--no-progress", *extra,
    ]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "minigpt2", *args], env=ENV, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out)]


def test_train_command_writes_a_model_directory(files: dict[str, Any]) -> None:
    plot = files["dir"] / "curves.png"
    r = _run(_args(files, "out", "--steps", "6", "--eval-every", "3", "--plot", str(plot)))
    assert r.returncode == 0, r.stderr
    assert "trained to step 6" in r.stdout and "val loss" in r.stdout
    out = files["dir"] / "out"
    assert [rec["step"] for rec in read_log(out)] == [1, 2, 3, 4, 5, 6]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # The same directory again: refused without --resume, continued with it.
    again = _run(_args(files, "out", "--steps", "8"))
    assert again.returncode == 1 and again.stderr.startswith("minigpt2: error:") and "--resume" in again.stderr
    assert "Traceback" not in again.stderr
    resumed = _run(_args(files, "out", "--steps", "8", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert [rec["step"] for rec in read_log(out)] == list(range(1, 9))


BAD = {
    "missing data": (["--data", "nope.txt"], "nope.txt"),
    "empty data": (["--data", "{dir}/empty.txt"], "empty"),
    "shorter than a block": (["--data", "{dir}/short.txt"], "fewer than one block"),
    "block > n_positions": (["--block-size", "64"], "n_positions=32"),
    "vocab too small": (["--config", "{dir}/small_vocab.json"], "vocab_size=1000"),
    "not GPT-2": (["--config", "{dir}/bert.json"], "bert"),
    "out holds something else": (["--out", "{dir}/other"], "other files"),
    "model and config": (["--model", "gpt2"], "not allowed with"),
    "bad precision": (["--precision", "fp8"], "precision"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_step(files: dict[str, Any], case: str) -> None:
    d = files["dir"]
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("too short")
    (d / "small_vocab.json").write_text(json.dumps({**TINY, "vocab_size": 1000}))
    (d / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    (d / "other").mkdir()
    (d / "other" / "keep.txt").write_text("mine")
    extra, message = BAD[case]
    args = _args(files, "out", "--steps", "2") + [a.format(dir=d) for a in extra]  # later flags win
    r = _run(args)
    assert r.returncode in (1, 2), r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt2: error:"), r.stderr
    assert message in lines[0]
    assert not (d / "out" / "log.jsonl").exists()
    assert (d / "other" / "keep.txt").read_text() == "mine" and len(list((d / "other").iterdir())) == 1


def test_sigint_saves_a_checkpoint_and_resume_continues_exactly(files: dict[str, Any]) -> None:
    """Ctrl-C once the log shows step 3: the process saves, exits 0; --resume then gives the
    losses of an uninterrupted run."""
    out = files["dir"] / "run"
    schedule = ["--decay-steps", "10000"]  # the same learning rates whatever --steps says
    proc = subprocess.Popen([sys.executable, "-m", "minigpt2", *_args(files, "run", "--steps", "10000", *schedule)],
                            env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "log.jsonl").is_file() and any(r["step"] >= 3 for r in _read_partial(out / "log.jsonl")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout
    state = json.loads((out / "training_state.json").read_text())
    stopped = state["step"]
    assert 3 <= stopped < 10000
    assert [r["step"] for r in read_log(out)] == list(range(1, stopped + 1))
    assert (out / "model.safetensors").is_file() and (out / "training_state.safetensors").is_file()

    r = _run(_args(files, "run", "--steps", str(stopped + 2), "--resume", *schedule))
    assert r.returncode == 0, r.stderr
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same reductions
    try:
        ref = train(TrainConfig(data=files["data"], config=files["config"], out=str(files["dir"] / "ref"),
                                steps=stopped + 2, decay_steps=10000, batch_size=4, block_size=16, lr=1e-2,
                                warmup=2, eval_batches=2, sample_tokens=4, cache_dir=str(files["dir"] / "cache"),
                                progress=False))
    finally:
        torch.set_num_threads(n)
    assert _losses(out) == [loss for _, loss in ref.losses]


def _read_partial(path: Path) -> list[dict[str, Any]]:
    """log.jsonl lines written so far (the last one may be half-written)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def test_torchrun_two_processes_match_one(files: dict[str, Any]) -> None:
    """DDP with 2 gloo processes on CPU: the same global batch, the same losses (1e-4 relative).

    Only with dropout off (TINY sets every *_pdrop to 0): each process draws its own masks."""
    args = ["--steps", "4", "--grad-accum", "2", "--eval-every", "2"]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "minigpt2", *_args(files, "ddp", *args)],
        env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("trained to step 4") == 1  # only rank 0 prints
    single = _run(_args(files, "single", *args))
    assert single.returncode == 0, single.stderr
    a, b = read_log(files["dir"] / "ddp"), read_log(files["dir"] / "single")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert b[-1]["loss"] < b[0]["loss"] - 0.1  # it trains: the comparison is not of constants
    assert [("val_loss" in r) for r in a] == [("val_loss" in r) for r in b] == [False, True, False, True]
    for ra, rb in zip(a, b):
        assert_close_or_none(ra["loss"], rb["loss"], rel=1e-4, what=f"loss at step {ra['step']}")
        assert_close_or_none(ra.get("val_loss"), rb.get("val_loss"), rel=1e-4, what=f"val_loss at step {ra['step']}")
    state = json.loads((files["dir"] / "ddp" / "training_state.json").read_text())
    assert state["world_size"] == 2


def test_resume_keeps_the_saved_flags_and_refuses_another_source(files: dict[str, Any]) -> None:
    d = files["dir"]
    r = _run(_args(files, "out", "--steps", "3", "--warmup", "3", "--min-lr-ratio", "0.5"))
    assert r.returncode == 0, r.stderr
    out = d / "out"
    # Another --config (or any --model) than the run's own: one line naming both, exit 2.
    (d / "small_vocab.json").write_text(json.dumps({**TINY, "vocab_size": 1000}))
    for flag, value in (("--config", str(d / "small_vocab.json")), ("--model", "gpt2")):
        args = ["train", "--data", files["data"], "--out", str(out), "--steps", "5", "--resume", flag, value,
                "--cache-dir", str(d / "cache"), "--no-progress"]
        bad = _run(args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("minigpt2: error:"), bad.stderr
        assert value in lines[0] and files["config"] in lines[0]
    # Flags left out come from the saved run (no default warmup / lr / batch size), silently.
    resumed = _run(["train", "--data", files["data"], "--out", str(out), "--steps", "5", "--resume",
                    "--cache-dir", str(d / "cache"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "note" not in resumed.stderr
    saved = json.loads((out / "training_state.json").read_text())["train_config"]
    assert (saved["warmup"], saved["min_lr_ratio"], saved["lr"], saved["batch_size"]) == (3, 0.5, 1e-2, 4)
    assert saved["config"] == files["config"]
    # A flag the user does change still gets the note.
    changed = _run(["train", "--data", files["data"], "--out", str(out), "--steps", "6", "--resume", "--lr", "2e-2",
                    "--cache-dir", str(d / "cache"), "--no-progress"])
    assert changed.returncode == 0 and "note: lr changed" in changed.stderr, changed.stderr
