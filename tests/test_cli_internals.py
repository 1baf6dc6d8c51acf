"""``minigpt2 inspect | lens | attention | score`` end to end, through a subprocess, against transformers."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt2 import Tokenizer
from minigpt2.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minigpt2", *args],
        capture_output=True, text=True, input=stdin, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt2: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# -------------------------------------------------------------------------- inspect
def test_inspect_tree_parameters_and_config(tiny_checkpoint):
    path, hf = tiny_checkpoint
    proc = run("inspect", "--model", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    theirs = str(hf).splitlines()
    start = out.index("Module tree") + 1
    assert out[start + 1 : start + len(theirs)] == theirs[1:]  # same lines as transformers' print
    total = [ln for ln in out if ln.startswith("total")]
    assert total and total[0].split()[-1] == f"{hf.num_parameters():,}"
    assert any(ln.split() == ["n_layer", str(hf.config.n_layer)] for ln in out)


def test_inspect_explain_annotates_every_part(tiny_checkpoint):
    path, hf = tiny_checkpoint
    proc = run("inspect", "--model", str(path), "--explain")
    assert proc.returncode == 0, proc.stderr
    for line in str(hf).splitlines()[1:]:
        assert line in proc.stdout.splitlines()  # the tree is intact, notes are extra lines
    notes = proc.stdout.lower()
    for word in ("token embedding", "position", "dropout", "blocks", "layernorm", "3 x 64 = 192", "queries",
                 "output projection", "gelu", "4x", "final layernorm", "tied", "[b, t, 1000]"):
        assert word in notes, word


def test_inspect_gpt2_offline_uses_the_packaged_preset(tmp_path):
    proc = run("inspect", "--model", "gpt2", env={"HF_HOME": str(tmp_path)})  # empty cache, no network
    assert proc.returncode == 0, proc.stderr
    assert "preset" in proc.stdout
    total = [ln for ln in proc.stdout.splitlines() if ln.startswith("total")]
    assert total[0].split()[-1] == "124,439,808"


def test_inspect_bad_model_is_one_line_error(tmp_path):
    one_line_error(run("inspect", "--model", str(tmp_path / "missing")), 1, "not found")


# ----------------------------------------------------------------------------- lens
def test_lens_table_last_row_is_the_models_prediction(gpt2_tiny_vocab_checkpoint):
    path, hf = gpt2_tiny_vocab_checkpoint
    prompt = "The cat sat on the"
    proc = run("lens", prompt, "--model", str(path), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in ("input", "embed", "h.0", "h.1")}
    assert set(rows) == {"input", "embed", "h.0", "h.1"}
    tok = Tokenizer()
    ids = tok.encode(prompt)
    with torch.no_grad():
        p = F.softmax(hf(torch.tensor([ids])).logits[0], -1)
    prob, top = p.max(-1)
    last = rows["h.1"]
    pos = 0
    for t, pr in zip(top.tolist(), prob.tolist()):  # each cell: the repr'd token and its probability
        cell = f"{tok.decode([t])!r} {pr:.2f}"
        assert cell in last[pos:], (cell, last)
        pos = last.index(cell, pos) + len(cell)


# ------------------------------------------------------------------------ attention
def test_attention_png_of_the_requested_size(gpt2_tiny_vocab_checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = gpt2_tiny_vocab_checkpoint
    out = tmp_path / "head.png"
    proc = run("attention", "Hello there, my friend", "--model", str(path), "--layer", "1", "--head", "2",
               "--out", str(out), "--size", "640x480")
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (640, 480)
    grid = tmp_path / "grid.png"
    assert main(["attention", "Hello there", "--model", str(path), "--layer", "0", "--out", str(grid)]) == 0
    assert png_size(grid) == (1200, 1200)


def test_attention_bad_inputs(gpt2_tiny_vocab_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = str(gpt2_tiny_vocab_checkpoint[0])
    one_line_error(run("attention", "Hi", "--model", path, "--layer", "2", "--out", str(tmp_path / "a.png")),
                   2, "--layer 2", "0 .. 1")
    cases = [
        (["--layer", "0", "--head", "4"], 2, "--head 4"),
        (["--layer", "0", "--size", "big"], 2, "--size"),
        (["--layer", "0", "--out", str(tmp_path / "nodir" / "a.png")], 1, "not found"),
    ]
    for extra, code, word in cases:
        argv = ["attention", "Hi", "--model", path, "--out", str(tmp_path / "a.png"), *extra]
        assert main(argv) == code
        err = capsys.readouterr().err
        assert err.startswith("minigpt2: error: ") and word in err and err.count("\n") == 1
    assert main(["attention", "", "--model", path, "--layer", "0", "--out", str(tmp_path / "a.png")]) == 2
    assert "empty" in capsys.readouterr().err


def test_attention_without_matplotlib_says_how_to_install(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None\n"
        "from minigpt2.cli import main\n"
        f"sys.exit(main(['attention', 'Hi', '--layer', '0', '--out', {str(tmp_path / 'a.png')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"})
    one_line_error(proc, 1, "matplotlib is not installed: pip install minigpt2[viz]")


# ---------------------------------------------------------------------------- score
TEXT = "It was a bright cold day in April, and the clocks were striking thirteen."


def hf_perplexity(hf, text: str) -> float:
    ids = torch.tensor([Tokenizer().encode(text)])
    with torch.no_grad():
        return math.exp(float(hf(ids, labels=ids).loss))


def test_score_text_and_json(gpt2_tiny_vocab_checkpoint, tmp_path):
    path, hf = gpt2_tiny_vocab_checkpoint
    expected = hf_perplexity(hf, TEXT)
    proc = run("score", TEXT, "--model", str(path))
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    assert float(last.split()[1]) == pytest.approx(expected, rel=1e-5)

    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    proc = run("score", "--file", str(f), "--model", str(path), "--json", "--stride", "64")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"tokens", "logprobs", "nll", "perplexity"}
    assert "".join(data["tokens"]) == TEXT
    assert data["logprobs"][0] is None and len(data["logprobs"]) == len(data["tokens"])
    assert data["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert None not in data["logprobs"][1:]  # stride < n_positions: every token but the first is scored
    assert -sum(data["logprobs"][1:]) == pytest.approx(data["nll"], rel=1e-6)


def test_score_bad_inputs(gpt2_tiny_vocab_checkpoint, tmp_path, capsys):
    path = str(gpt2_tiny_vocab_checkpoint[0])
    one_line_error(run("score", "--model", path), 2, "TEXT or --file")
    cases = [
        (["score", "a b", "--file", "x.txt"], 2, "not both"),
        # values the user typed are usage errors (2); a file's problems are 1
        (["score", "", "--model", path], 2, "at least 2 tokens"),
        (["score", "Hello world again", "--model", path, "--stride", "0"], 2, "--stride 0"),
        (["score", "Hello world again", "--model", path, "--stride", "257"], 2, "n_positions=256"),
        (["score", "--file", str(tmp_path / "missing.txt"), "--model", path], 1, "not found"),
        (["score", "--file", str(tmp_path), "--model", path], 2, "is a directory"),
        (["lens", "hello " * 300, "--model", path], 2, "exceeds n_positions=256"),
    ]
    for argv, code, word in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.startswith("minigpt2: error: ") and word in err and err.count("\n") == 1, err
