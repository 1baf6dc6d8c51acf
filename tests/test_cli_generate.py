"""``minigpt2 generate`` / ``minigpt2 compare``: output against transformers, exit codes, errors.

A few cases run the real command through a subprocess (the way a user runs it); the
remaining error cases call ``main`` in-process, which is the same code without paying
for a fresh interpreter and torch import each time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt2 import Tokenizer
from minigpt2.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello, my name is"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "minigpt2", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt2: error:"), stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpt(gpt2_tiny_vocab_checkpoint: tuple[Path, Any]) -> tuple[Path, Any]:
    return gpt2_tiny_vocab_checkpoint


def hf_text(hf: Any, prompt: str, seed: int | None = None, **kw: Any) -> str:
    """What the CLI should print for one sample: the prompt, then transformers' continuation."""
    tok = Tokenizer()
    ids = torch.tensor([tok.encode(prompt) if prompt else [tok.eos_token_id]])
    if seed is not None:
        torch.manual_seed(seed)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.eos_token_id, **kw)
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return prompt + tok.decode(new)


# --------------------------------------------------------------------------- subprocess
def test_generate_streams_what_transformers_samples(ckpt: tuple[Path, Any]) -> None:
    d, hf = ckpt
    r = run_cli("generate", PROMPT, "--model", str(d), "--max-new-tokens", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # The CLI samples with transformers' do_sample=True defaults (temperature 1, top-k 50).
    assert r.stdout == hf_text(hf, PROMPT, seed=3, max_new_tokens=12, do_sample=True) + "\n"


def test_generate_greedy_num_samples(ckpt: tuple[Path, Any]) -> None:
    d, hf = ckpt
    r = run_cli("generate", PROMPT, "--model", str(d), "--max-new-tokens", "8", "--greedy", "--num-samples", "2",
                "--repetition-penalty", "1.3")
    assert r.returncode == 0, r.stderr
    expected = hf_text(hf, PROMPT, max_new_tokens=8, repetition_penalty=1.3)
    lines = r.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("---")] == [lines[0], lines[2]] and "1/2" in lines[0]
    assert lines[1] == lines[3] == expected


def test_compare_sections_and_seed(ckpt: tuple[Path, Any]) -> None:
    d, hf = ckpt
    r = run_cli("compare", PROMPT, "--model", str(d), "--max-new-tokens", "6", "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for title in ("Greedy", "Temperature", "Top-k", "Top-p"):
        assert f"=== {title}" in out
    for setting in ("temperature=0.5", "temperature=1.5", "top_k=500", "top_p=0.95", "top_p=0.5"):
        assert setting in out
    lines = out.splitlines()
    outputs = {lines[i].removeprefix("--- "): lines[i + 1] for i, ln in enumerate(lines) if ln.startswith("--- ")}
    assert len(outputs) == 10
    greedy = outputs["do_sample=False (argmax at every step)"]
    assert greedy == hf_text(hf, PROMPT, max_new_tokens=6)
    assert outputs["temperature=1.0, top_k=1, top_p=1.0, do_sample=True"] == greedy  # top-k 1 is greedy
    t05 = "temperature=0.5, top_k=0, top_p=1.0, do_sample=True"
    assert outputs[t05] == hf_text(hf, PROMPT, seed=1, max_new_tokens=6, do_sample=True, temperature=0.5, top_k=0)


def test_usage_error_is_one_line_exit_2() -> None:
    r = run_cli("generate", "hi", "--temperature", "0")
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "temperature")


def test_missing_model_directory_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    r = run_cli("generate", "hi", "--model", str(missing), "--max-new-tokens", "2")
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "no_such_model")
    assert r.stdout == ""


# --------------------------------------------------------------------------- in-process
@pytest.mark.parametrize(
    "args,word",
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "abc"], "temperature"),
        (["--top-p", "1.5"], "top-p"),
        (["--top-p", "0"], "top-p"),
        (["--top-k", "-1"], "top-k"),
        (["--max-new-tokens", "-1"], "max-new-tokens"),
        (["--num-beams", "0"], "num-beams"),
        (["--num-samples", "0"], "num-samples"),
        (["--repetition-penalty", "0"], "repetition-penalty"),
        (["--dtype", "int8"], "dtype"),
    ],
)
def test_bad_values_are_usage_errors(args: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, word)


def test_prompt_too_long_names_the_limit(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = ckpt
    assert main(["generate", "hello " * 100, "--model", str(d), "--max-new-tokens", "200"]) == 2
    assert_one_line_error(capsys.readouterr().err, "n_positions=256", "max-new-tokens")


def test_empty_prompt_is_unconditional(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d, hf = ckpt
    assert main(["generate", "", "--model", str(d), "--max-new-tokens", "5", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "<|endoftext|>" not in out
    assert out == hf_text(hf, "", seed=4, max_new_tokens=5, do_sample=True) + "\n"


def test_beam_search_from_the_cli(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d, hf = ckpt
    assert main(["generate", PROMPT, "--model", str(d), "--max-new-tokens", "6", "--num-beams", "3"]) == 0
    assert capsys.readouterr().out == hf_text(hf, PROMPT, max_new_tokens=6, num_beams=3) + "\n"


def test_stop_string_from_the_cli(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = ckpt
    assert main(["generate", PROMPT, "--model", str(d), "--max-new-tokens", "12", "--seed", "3"]) == 0
    full = capsys.readouterr().out.rstrip("\n")
    continuation = full[len(PROMPT) :]
    stop = continuation[3:5]  # two characters from inside the sampled continuation
    assert main(["generate", PROMPT, "--model", str(d), "--max-new-tokens", "12", "--seed", "3", "--stop", stop]) == 0
    stopped = capsys.readouterr().out.rstrip("\n")
    assert stop in stopped[len(PROMPT) :] and full.startswith(stopped) and len(stopped) < len(full)


def test_unreachable_hub_fails_fast_with_one_line(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE unset, the endpoint a closed loopback port: the loader must notice the
    # Hub is unreachable and answer from the (empty) cache at once, in one line, instead of
    # huggingface_hub's retry loop (about 25 s and a page of warnings).
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "minigpt2", "generate", "hi", "--model", "someone/no-such-gpt2",
                        "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "someone/no-such-gpt2")
