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


def _with_generation_config(checkpoint: Path, dest: Path, **settings: Any) -> Path:
    """A copy of ``checkpoint`` at ``dest`` whose generation_config.json has ``settings`` on top."""
    import json
    import shutil

    shutil.copytree(checkpoint, dest)
    path = dest / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    return dest


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


def test_generate_compile_prints_the_same_greedy_text(ckpt: tuple[Path, Any]) -> None:
    """--compile: the compiled decode step (CUDA graphs where a GPU is; here inductor on the
    CPU), the same text as transformers' greedy continuation."""
    d, hf = ckpt
    r = run_cli("generate", PROMPT, "--model", str(d), "--max-new-tokens", "8", "--greedy", "--compile",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout == hf_text(hf, PROMPT, max_new_tokens=8) + "\n"
    r = run_cli("generate", PROMPT, "--model", str(d), "--greedy", "--compile", "--prompt-lookup", "3")
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "--compile", "assisted decoding")


def test_generate_greedy_and_beams_num_samples(ckpt: tuple[Path, Any]) -> None:
    d, hf = ckpt
    r = run_cli("generate", PROMPT, "--model", str(d), "--max-new-tokens", "8", "--greedy",
                "--repetition-penalty", "1.3")
    assert r.returncode == 0, r.stderr
    assert r.stdout == hf_text(hf, PROMPT, max_new_tokens=8, repetition_penalty=1.3) + "\n"
    # --num-samples with beams prints the best beams, as num_return_sequences does.
    r = run_cli("generate", PROMPT, "--model", str(d), "--max-new-tokens", "6", "--num-beams", "3", "--num-samples", "2")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer()
    ids = torch.tensor([tok.encode(PROMPT)])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.eos_token_id, max_new_tokens=6,
                      num_beams=3, num_return_sequences=2)
    beams = [PROMPT + tok.decode([t for t in row[ids.shape[1]:].tolist() if t != tok.eos_token_id]) for row in out]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("---") and "beam 1/2" in lines[0] and "beam 2/2" in lines[2]
    assert [lines[1], lines[3]] == beams and len(lines) == 4


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
    assert len(outputs) == 16  # with the min-p and typical-p sections (test_compare_has_min_p_and_typical_p)
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
        (["--device", "tpu"], "'tpu' is not a device"),  # a typo; a device this machine lacks is exit 1
        (["--device", "cuda:x"], "--device"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--min-p", "1.5"], "min-p"),
        (["--typical-p", "0"], "typical-p"),
        (["--epsilon-cutoff", "1"], "epsilon-cutoff"),
        (["--logprobs", "-1"], "logprobs"),
        (["--num-assistant-tokens", "0"], "num-assistant-tokens"),
        (["--assistant", "x", "--num-beams", "2"], "num-beams"),
        (["--assistant", "x", "--prompt-lookup", "2"], "prompt-lookup"),
        (["--bad-words", ""], "bad-words"),
        (["--stop", ""], "stop"),
        (["--num-assistant-tokens", "3"], "--assistant"),  # would be ignored without an assistant
        (["--greedy", "--temperature", "0.5", "--top-k", "3"], "--temperature, --top-k"),
        (["--num-beams", "2", "--top-p", "0.5"], "--top-p"),
        (["--greedy", "--num-samples", "2"], "--greedy"),  # the same text twice
        (["--num-beams", "2", "--num-samples", "3"], "<= --num-beams 2"),
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


# --------------------------------------------------------------------------- the new settings
def test_new_sampling_flags_sample_what_transformers_samples(ckpt: tuple[Path, Any],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    d, hf = ckpt
    flags = ["--min-p", "0.05", "--typical-p", "0.9", "--epsilon-cutoff", "0.0001", "--top-k", "0"]
    assert main(["generate", PROMPT, "--model", str(d), "--max-new-tokens", "8", "--seed", "3", *flags]) == 0
    expected = hf_text(hf, PROMPT, seed=3, max_new_tokens=8, do_sample=True, min_p=0.05, typical_p=0.9,
                       epsilon_cutoff=0.0001, top_k=0)
    assert capsys.readouterr().out == expected + "\n"


def test_bad_words_are_banned_with_and_without_a_space(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d, hf = ckpt
    tok = Tokenizer()
    base = ["generate", PROMPT, "--model", str(d), "--max-new-tokens", "8", "--greedy"]
    ids = torch.tensor([tok.encode(PROMPT)])
    first = int(hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, pad_token_id=0)[0, -1])
    word = tok.decode([first]).strip()  # what greedy decoding makes first, without its space
    bad = [tok.encode(word), tok.encode(" " + word)]
    assert [first] in bad
    assert main([*base, "--bad-words", word]) == 0
    out = capsys.readouterr().out
    expected = hf_text(hf, PROMPT, max_new_tokens=8, bad_words_ids=bad)
    assert out == expected + "\n" and first not in tok.encode(expected[len(PROMPT) :])


def test_assistant_gives_the_same_greedy_text(ckpt: tuple[Path, Any], make_checkpoint: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = ckpt
    draft, _ = make_checkpoint(seed=9, vocab_size=50257, n_positions=256, n_embd=32, n_layer=1, n_head=2)
    small, _ = make_checkpoint(seed=9, n_layer=1)  # vocab_size 1000: another tokenizer
    capsys.readouterr()
    base = ["generate", PROMPT, "--model", str(d), "--max-new-tokens", "10", "--greedy"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--assistant", str(draft), "--num-assistant-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*base, "--prompt-lookup", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*base, "--assistant", str(small)]) == 1
    assert_one_line_error(capsys.readouterr().err, "vocab_size")


def test_logprobs_lines(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d, hf = ckpt
    tok = Tokenizer()
    assert main(["generate", PROMPT, "--model", str(d), "--max-new-tokens", "4", "--greedy", "--logprobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ids = torch.tensor([tok.encode(PROMPT)])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, return_dict_in_generate=True,
                      output_logits=True, pad_token_id=tok.eos_token_id)
    assert lines[0] == PROMPT and len(lines) == 1 + 4 + 2
    for line, token, logits in zip(lines[1:5], ref.sequences[0, -4:].tolist(), ref.logits):
        logp = torch.log_softmax(logits[0], -1)
        text, value = line.split("[")[0].rsplit(maxsplit=1)
        assert text == repr(tok.decode([token])) and float(value) == pytest.approx(float(logp[token]), abs=1e-3)
        assert line.count(",") >= 1  # two alternatives
    assert lines[-1] == hf_text(hf, PROMPT, max_new_tokens=4)


def test_checkpoint_generation_config_is_the_cli_default(ckpt: tuple[Path, Any], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    d, hf = ckpt
    ft = _with_generation_config(d, tmp_path / "ft", top_k=1, max_new_tokens=6)  # top-k 1 is greedy; 6 new tokens
    assert main(["generate", PROMPT, "--model", str(ft), "--seed", "1"]) == 0
    assert capsys.readouterr().out == hf_text(hf, PROMPT, max_new_tokens=6) + "\n"


def test_compare_has_min_p_and_typical_p(ckpt: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d, hf = ckpt
    assert main(["compare", PROMPT, "--model", str(d), "--max-new-tokens", "5", "--seed", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "=== Min-p (top-k off, temperature 1.0) ===" in lines and "=== Typical-p (top-k off, temperature 1.0) ===" in lines
    outputs = {lines[i].removeprefix("--- "): lines[i + 1] for i, ln in enumerate(lines) if ln.startswith("--- ")}
    assert len(outputs) == 16
    assert outputs["temperature=1.0, top_k=0, min_p=0.1, do_sample=True"] == hf_text(
        hf, PROMPT, seed=2, max_new_tokens=5, do_sample=True, top_k=0, min_p=0.1)
    assert outputs["temperature=1.0, top_k=0, typical_p=0.5, do_sample=True"] == hf_text(
        hf, PROMPT, seed=2, max_new_tokens=5, do_sample=True, top_k=0, typical_p=0.5)


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


def test_a_bad_checkpoint_setting_fails_before_the_prompt_is_echoed(ckpt: tuple[Path, Any], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = ckpt
    bad = _with_generation_config(d, tmp_path / "bad", top_p=5)
    for extra in ([], ["--logprobs", "1"], ["--num-samples", "2"]):
        assert main(["generate", PROMPT, "--model", str(bad), "--max-new-tokens", "2", *extra]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing echoed before the error
        assert_one_line_error(captured.err, "top_p")


def test_a_bad_kernel_setting_fails_before_the_prompt_is_echoed(ckpt: tuple[Path, Any],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """MINIGPT2_KERNEL=bogus: one usage error naming the variable and the kernels, nothing printed
    first (it used to stream the prompt, then fail at the first kernel choice)."""
    d, _ = ckpt
    monkeypatch.setenv("MINIGPT2_KERNEL", "bogus")
    assert main(["generate", PROMPT, "--model", str(d), "--max-new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "MINIGPT2_KERNEL='bogus'", "native")
