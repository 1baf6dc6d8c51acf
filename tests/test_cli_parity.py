"""``minigpt2 parity`` end to end: the table, exit codes, faulty checkpoints, reference files.

Two runs go through a subprocess, the way a user runs it (a fresh interpreter, and one
without transformers); the rest call ``main`` in-process, the same code without paying for
a new interpreter and torch import each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from faults import EXPECTED, write_faulty_checkpoint
from minigpt2 import GPT2
from minigpt2.cli import main
from minigpt2.cli.parity import SAMPLE_TEXT
from minigpt2.parity import capture_minigpt2

REPO_ROOT = Path(__file__).resolve().parents[1]
IDS = "5 17 300 2 999 41 7 7 512 88 61 0 3 250"


def run_cli(*args: str, block_transformers: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    if block_transformers:  # as if `pip install minigpt2` without the [parity] extra
        code = ("import sys, minigpt2, minigpt2.testing, minigpt2.parity, minigpt2.cli.parity\n"
                "assert 'transformers' not in sys.modules, 'importing minigpt2 imported transformers'\n"
                "sys.modules['transformers'] = None\n"
                "from minigpt2.cli import main; sys.exit(main())")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "minigpt2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, *words: str) -> None:
    assert "Traceback" not in err
    # A warning of its own line may come first (a checkpoint without tokenizer files says so).
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("minigpt2: warning:")]
    assert len(lines) == 1 and lines[0].startswith("minigpt2: error:"), err
    for w in words:
        assert w in lines[0], lines[0]


def table_rows(out: str) -> list[list[str]]:
    """The activation table's rows: [name, max diff, max ref, ratio, result]."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("activation"))
    rows = []
    for ln in lines[start + 1:]:
        parts = ln.split()
        if len(parts) < 5 or parts[4] not in ("pass", "FAIL"):
            break
        rows.append(parts[:5])
    return rows


# ------------------------------------------------------------------------------ runs
def test_parity_of_a_checkpoint_as_a_user_runs_it(gpt2_tiny_vocab_checkpoint):
    path, hf = gpt2_tiny_vocab_checkpoint
    proc = run_cli("parity", "--model", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr  # no progress bars
    rows = table_rows(proc.stdout)
    assert [r[0] for r in rows] == ["embed", "h.0.resid_mid", "h.0.resid_post", "h.1.resid_mid", "h.1.resid_post",
                                    "ln_f", "logits"]
    assert all(r[4] == "pass" and float(r[3]) <= 1e-4 for r in rows)
    assert "input: the built-in sample text" in proc.stdout
    assert proc.stdout.rstrip().endswith("PASS: everything within tolerance")


def test_json_all_grad_generate(capsys, tiny_checkpoint):
    path, hf = tiny_checkpoint
    code, out, err = cli(capsys, "parity", "--model", str(path), "--ids", IDS, "--all", "--grad", "--generate", "5",
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    model = GPT2.from_pretrained(path, device="cpu")
    assert report["passed"] is True and report["first_failure"] is None
    assert [r["name"] for r in report["rows"]] == model.activation_names() + ["logits"]
    assert all(r["shown"] and r["passed"] for r in report["rows"])
    assert report["input_shape"] == [1, len(IDS.split())] and report["rtol"] == 1e-4
    assert {g["name"] for g in report["grads"]} == {n for n, _ in model.named_parameters()}
    assert len(report["worst_grads"]) == 5
    assert report["loss"]["passed"] and report["loss"]["reference"] == pytest.approx(
        hf(torch.tensor([[int(i) for i in IDS.split()]]), labels=torch.tensor([[int(i) for i in IDS.split()]])).loss.item(),
        rel=1e-6)
    gen = report["generation"]
    assert gen["first_diff_step"] is None and gen["ours"] == gen["reference"] and len(gen["ours"]) <= 5


def test_half_precision_reports_top1_agreement(capsys, gpt2_tiny_vocab_checkpoint):
    path, _ = gpt2_tiny_vocab_checkpoint
    code, out, err = cli(capsys, "parity", "--model", str(path), "--dtype", "bfloat16", "--text", SAMPLE_TEXT[:80])
    assert code == 0, out + err
    assert "top-1 agreement" in out and "worst margin" in out and "half precision" in out
    assert "5e-02" in out  # the bf16 tolerance, not float32's


# --------------------------------------------------------------- faulty checkpoints
@pytest.mark.parametrize("fault", ["ln_2 bias dropped in block 1", "c_attn weight transposed in block 1",
                                   "unscaled attention"])
def test_converted_checkpoint_against_its_original(capsys, tmp_path, tiny_checkpoint, fault):
    """A faulty conversion held against the original with --reference: named where it breaks."""
    path, _ = tiny_checkpoint
    bad = write_faulty_checkpoint(path, tmp_path / "converted", fault)
    first_shown, first_any = EXPECTED[fault]
    code, out, err = cli(capsys, "parity", "--model", str(bad), "--reference", str(path), "--ids", IDS)
    assert code == 1, err
    assert f"FAIL: first past tolerance: {first_shown}" in out
    assert first_any == first_shown or f"narrowed down over every compared activation: {first_any}" in out
    code, out, _ = cli(capsys, "parity", "--model", str(bad), "--reference", str(path), "--ids", IDS, "--all")
    assert code == 1 and f"FAIL: first past tolerance: {first_any}" in out
    # The converted checkpoint alone: both libraries run the same (faulty) weights and agree.
    code, out, _ = cli(capsys, "parity", "--model", str(bad), "--ids", IDS)
    assert code == 0 and "not the weights" in out


def test_stale_head_in_the_file_shows_at_the_logits(capsys, tmp_path, tiny_checkpoint):
    """A checkpoint that stores an lm_head.weight unlike wte: transformers unties and uses it,
    minigpt2 unembeds with wte. The two part at the logits, not before, and the note says why."""
    path, _ = tiny_checkpoint
    bad = write_faulty_checkpoint(path, tmp_path / "stale", "untied head with a stale copy")
    code, out, err = cli(capsys, "parity", "--model", str(bad), "--ids", IDS, "--generate", "3")
    assert code == 1, err
    assert [r[0] for r in table_rows(out) if r[4] == "FAIL"] == ["logits"]
    assert "FAIL: first past tolerance: logits" in out and "did not tie lm_head to wte" in out


# ----------------------------------------------------------------- reference files
@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    """(checkpoint, reference file) of the TINY checkpoint on IDS, written by --export."""
    path, _ = tiny_checkpoint
    ref = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    assert main(["parity", "--model", str(path), "--ids", IDS, "--export", str(ref)]) == 0
    return path, ref


def test_export_then_hold_checkpoints_against_it(capsys, tmp_path, exported):
    path, ref = exported
    code, out, err = cli(capsys, "parity", "--against", str(ref), "--model", str(path), "--grad")
    assert code == 0, out + err
    assert "gradients: 28 parameters, 0 past the tolerance" in out
    bad = write_faulty_checkpoint(path, tmp_path / "bad", "wpe off by one position")
    code, out, _ = cli(capsys, "parity", "--against", str(ref), "--model", str(bad), "--json")
    report = json.loads(out)
    assert code == 1 and report["first_failure"] == "embed" and "wpe" in report["hint"]


def test_another_implementations_dump(capsys, monkeypatch, tmp_path, exported):
    """A port writes some tensors under the reference's names; the verdict needs no transformers."""
    path, ref = exported
    ids = torch.tensor([[int(i) for i in IDS.split()]])
    model = GPT2.from_pretrained(path, device="cpu")
    with torch.no_grad():  # the port's bug: block 0's MLP output projection has no bias
        model.transformer.h[0].mlp.c_proj.bias.zero_()
    cap = capture_minigpt2(model, ids)
    dump = tmp_path / "theirs.safetensors"
    names = ["h.0.attn.out", "h.0.mlp.act", "h.0.mlp.out", "h.0.resid_post", "ln_f"]
    save_file({**{n: cap.activations[n].contiguous() for n in names}, "logits": cap.logits}, str(dump))
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    code, out, err = cli(capsys, "parity", "--against", str(ref), "--dump", str(dump), "--all")
    assert code == 1, err
    assert [r[0] for r in table_rows(out)] == names + ["logits"]
    assert "FAIL: first past tolerance: h.0.mlp.out" in out
    assert "last activation still within tolerance: h.0.mlp.act" in out
    assert "mlp.c_proj" in out and "not provided (not compared): embed" in out


def test_without_transformers_one_line_names_the_extra(tiny_checkpoint):
    """Also: importing minigpt2, minigpt2.testing and minigpt2.parity does not import transformers."""
    path, _ = tiny_checkpoint
    proc = run_cli("parity", "--model", str(path), "--ids", IDS, block_transformers=True)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, 'pip install "minigpt2[parity]"')


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, words", [
    (["--dump", "x.safetensors"], ["--dump needs --against"]),
    (["--against", "r.safetensors"], ["exactly one of --model", "--dump"]),
    (["--against", "r.safetensors", "--model", "m", "--dump", "d"], ["exactly one"]),
    (["--against", "r.safetensors", "--model", "m", "--text", "hi"], ["--text cannot be used with --against"]),
    (["--against", "r.safetensors", "--model", "m", "--generate", "3"], ["--generate cannot be used with --against"]),
    (["--against", "r.safetensors", "--model", "m", "--export", "e"], ["--export cannot be used with --against"]),
    (["--text", "hi", "--ids", "1 2"], ["give one input"]),
    (["--rtol", "-1"], ["--rtol", "positive"]),
    (["--generate", "0"], ["--generate", ">= 1"]),
    (["--dtype", "int8"], ["--dtype", "invalid choice"]),
])
def test_usage_errors_exit_2(capsys, tiny_checkpoint, args, words):
    path, _ = tiny_checkpoint
    if "--model" not in args and "--against" not in args:
        args = ["--model", str(path), *args]
    code, _, err = cli(capsys, "parity", *args)
    assert code == 2
    assert_one_line_error(err, *words)


def test_errors_exit_1(capsys, tmp_path, tiny_checkpoint, exported):
    path, ref = exported
    cases = [
        (["--model", str(path), "--ids", "1 2 1000"], ["token id 1000", "vocabulary [0, 1000)"]),
        (["--model", str(path), "--text", "hello there"], ["outside this checkpoint's vocabulary", "--ids"]),
        (["--model", str(path), "--ids", IDS, "--generate", "120"], ["exceeds n_positions=128"]),
        (["--model", str(path), "--file", str(tmp_path / "missing.txt")], ["file not found"]),
        (["--model", str(tmp_path / "nowhere")], ["not found", "nowhere"]),
        (["--model", str(path), "--export", str(tmp_path / "no" / "ref.safetensors")], ["directory for --export"]),
        (["--model", str(path), "--export", str(tmp_path)], ["is a directory"]),
        (["--against", str(tmp_path / "missing.safetensors"), "--model", str(path)], ["missing.safetensors"]),
    ]
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    cases.append((["--against", str(tmp_path / "corrupt.safetensors"), "--model", str(path)],
                  ["corrupt.safetensors", "not a readable safetensors file"]))
    nograd = tmp_path / "nograd.safetensors"
    save_file({"input_ids": torch.tensor([[1, 2, 3]]), "logits": torch.zeros(1, 3, 1000)}, str(nograd))
    cases.append((["--against", str(nograd), "--model", str(path), "--grad"], ["holds no gradients"]))
    for args, words in cases:
        code, _, err = cli(capsys, "parity", *args)
        assert code == 1, (args, err)
        assert_one_line_error(err, *words)


# ------------------------------------------------------------------- the real gpt2
@pytest.mark.hub
@pytest.mark.skipif(os.environ.get("MINIGPT2_TEST_HUB") != "1", reason="needs the Hub: set MINIGPT2_TEST_HUB=1")
def test_real_gpt2(capsys, monkeypatch, tmp_path):
    """The official checkpoint, trained weights: every activation, gradients, 20 greedy tokens,
    then bfloat16 (whose per-row limits follow transformers' own bf16 run), then a file."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    code, out, err = cli(capsys, "parity", "--model", "gpt2", "--all", "--grad", "--generate", "20")
    assert code == 0, out + err
    code, out, err = cli(capsys, "parity", "--model", "gpt2", "--dtype", "bfloat16", "--generate", "20")
    assert code == 0, out + err
    ref = tmp_path / "gpt2.safetensors"
    assert main(["parity", "--model", "gpt2", "--export", str(ref)]) == 0
    code, out, err = cli(capsys, "parity", "--against", str(ref), "--model", "gpt2", "--grad")
    assert code == 0, out + err
