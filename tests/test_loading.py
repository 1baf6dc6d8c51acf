"""Checkpoint loading and saving: every file layout GPT-2 checkpoints come in, and every
way a checkpoint can be broken (each must be a ValueError / FileNotFoundError naming
the file or value, never a library exception). Expected logits come from transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import TINY
from minigpt2 import GPT2
from minigpt2.loading import resolve_checkpoint, resolve_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def assert_matches(model: GPT2, hf: Any, tol: float = RTOL) -> None:
    """model's logits equal transformers' on a fixed batch (within tol x max |logit|)."""
    ids = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) <= tol


def hf_state(hf: Any) -> dict[str, torch.Tensor]:
    """transformers' state dict as plain contiguous tensors, tied lm_head left out."""
    return {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def new_checkpoint(tmp_path: Path, src: Path, name: str = "ckpt") -> Path:
    """A copy of ``src``'s config files (no weights) in a fresh directory."""
    out = tmp_path / name
    out.mkdir()
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, out / f)
    return out


@pytest.fixture
def tiny(tiny_checkpoint):
    return tiny_checkpoint


# ------------------------------------------------------------------ file layouts
def test_safetensors(tiny):
    path, hf = tiny
    model = GPT2.from_pretrained(path, device="cpu")
    assert_matches(model, hf)
    assert model.generation_config.eos_token_id == hf.generation_config.eos_token_id == hf.config.eos_token_id
    assert model.name_or_path == os.fspath(path)
    # Exact: every parameter equals transformers' bit for bit.
    ref = hf.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_eval_mode_and_requires_grad(tiny):
    model = GPT2.from_pretrained(tiny[0], device="cpu")
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(p.is_meta for p in model.parameters())


def test_sharded_safetensors(tiny, tmp_path):
    path, hf = tiny
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_matches(GPT2.from_pretrained(tmp_path, device="cpu"), hf)


def test_pytorch_model_bin(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    torch.save(hf_state(hf), ckpt / "pytorch_model.bin")
    assert_matches(GPT2.from_pretrained(ckpt, device="cpu"), hf)


def test_legacy_non_zip_bin(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    torch.save(hf_state(hf), ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_matches(GPT2.from_pretrained(ckpt, device="cpu"), hf)


def test_sharded_bin(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    state = hf_state(hf)
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for file, ks in shards.items():
        torch.save({k: state[k] for k in ks}, ckpt / file)
        weight_map.update({k: file for k in ks})
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_matches(GPT2.from_pretrained(ckpt, device="cpu"), hf)


def test_safetensors_preferred_over_bin(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    save_file(hf_state(hf), ckpt / "model.safetensors")
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    assert_matches(GPT2.from_pretrained(ckpt, device="cpu"), hf)


def test_official_layout_without_prefix_with_buffers(tiny, tmp_path):
    """The official gpt2 repo: no ``transformer.`` prefix, no lm_head, the old
    attn.bias (causal mask) and attn.masked_bias buffers present."""
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    n = TINY["n_positions"]
    state = {k.removeprefix("transformer."): v for k, v in hf_state(hf).items()}
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, ckpt / "model.safetensors")
    assert_matches(GPT2.from_pretrained(ckpt, device="cpu"), hf)


def test_tied_head_present(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    state = hf_state(hf)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, ckpt / "model.safetensors")
    model = GPT2.from_pretrained(ckpt, device="cpu")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_matches(model, hf)


def test_only_head_stored(tiny, tmp_path):
    """Some exports keep lm_head.weight and drop the tied wte: the same tensor."""
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    state = hf_state(hf)
    state["lm_head.weight"] = state.pop("transformer.wte.weight")
    save_file(state, ckpt / "model.safetensors")
    assert_matches(GPT2.from_pretrained(ckpt, device="cpu"), hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "bfloat16", "fp16"])
def test_dtypes(tiny, dtype):
    path, hf = tiny
    model = GPT2.from_pretrained(path, device="cpu", dtype=dtype)
    want = resolve_dtype(dtype)
    assert model.dtype == want and model.device == torch.device("cpu")
    assert all(p.dtype == want for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_matches(model, hf, tol=RTOL if want == torch.float32 else 0.03)


def test_fp16_checkpoint_loads_as_float32(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    save_file({k: v.half() for k, v in hf_state(hf).items()}, ckpt / "model.safetensors")
    model = GPT2.from_pretrained(ckpt, device="cpu")
    assert model.dtype == torch.float32
    for name, t in model.state_dict().items():
        assert torch.equal(t, hf.state_dict()[name].half().float()), name


def test_bad_dtype_and_device(tiny):
    with pytest.raises(ValueError, match="int8"):
        GPT2.from_pretrained(tiny[0], device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="float64"):
        GPT2.from_pretrained(tiny[0], device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="gpu0"):
        GPT2.from_pretrained(tiny[0], device="gpu0")


def test_loading_leaves_torch_state_alone(tiny):
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    with torch.no_grad():
        GPT2.from_pretrained(tiny[0], device="cpu", dtype="bf16")
    GPT2.from_pretrained(tiny[0], device="cpu")
    assert torch.is_grad_enabled()
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype
    assert torch.empty(1).device == torch.device("cpu")  # no lingering meta-device context


def test_untied_config_is_refused(tiny, tmp_path):
    ckpt = new_checkpoint(tmp_path, tiny[0])
    shutil.copy(tiny[0] / "model.safetensors", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GPT2.from_pretrained(ckpt)


# ------------------------------------------------------------------- bad checkpoints
def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        GPT2.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        GPT2.from_pretrained(os.fspath(missing))


def test_weights_file_instead_of_directory(tiny):
    with pytest.raises(ValueError, match="model.safetensors.*not a checkpoint directory"):
        GPT2.from_pretrained(tiny[0] / "model.safetensors")


def test_directory_without_config(tiny, tmp_path):
    path, hf = tiny
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2.from_pretrained(tmp_path)


def test_directory_without_weights(tiny, tmp_path):
    ckpt = new_checkpoint(tmp_path, tiny[0])
    with pytest.raises(FileNotFoundError, match="model.safetensors") as e:
        GPT2.from_pretrained(ckpt)
    assert str(ckpt) in str(e.value)


@pytest.mark.parametrize("config", [{"model_type": "bert"}, {"model_type": "llama", "hidden_size": 64}])
def test_config_of_another_architecture(tiny, tmp_path, config):
    ckpt = new_checkpoint(tmp_path, tiny[0])
    (ckpt / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny[0] / "model.safetensors", ckpt)
    with pytest.raises(ValueError, match=f"model_type '{config['model_type']}' is not GPT-2"):
        GPT2.from_pretrained(ckpt)


@pytest.mark.parametrize(("text", "says"), [("{oops", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list"),
                                             (b"\xff\xfe{}", "not valid JSON")])  # fmt: skip
@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_config_not_json(tiny, tmp_path, name, text, says):
    ckpt = new_checkpoint(tmp_path, tiny[0])
    shutil.copy(tiny[0] / "model.safetensors", ckpt)
    path = ckpt / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"{name}.*{says}"):
        GPT2.from_pretrained(ckpt)


def _broken_weights(tiny: Any, tmp_path: Path, data: bytes) -> Path:
    ckpt = new_checkpoint(tmp_path, tiny[0])
    (ckpt / "model.safetensors").write_bytes(data)
    return ckpt


@pytest.mark.parametrize("how", ["truncated", "half", "corrupt_header", "huge_header", "random", "empty", "tiny"])
def test_broken_safetensors(tiny, tmp_path, how):
    good = (tiny[0] / "model.safetensors").read_bytes()
    n = int.from_bytes(good[:8], "little")
    data = {
        "truncated": good[:-100],
        "half": good[: len(good) // 2],
        "corrupt_header": good[:8] + b"\x00\xff" * 20 + good[48:],
        "huge_header": (2**40).to_bytes(8, "little") + good[8:],
        "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes(),
        "empty": b"",
        "tiny": good[:5],
    }[how]
    assert n < len(good)
    ckpt = _broken_weights(tiny, tmp_path, data)
    with pytest.raises(ValueError, match="model.safetensors"):
        GPT2.from_pretrained(ckpt)


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_broken_bin(tiny, tmp_path, how):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    torch.save(hf_state(hf), ckpt / "pytorch_model.bin")
    good = (ckpt / "pytorch_model.bin").read_bytes()
    data = {"truncated": good[: len(good) // 2], "random": os.urandom(2048), "empty": b""}[how]
    (ckpt / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        GPT2.from_pretrained(ckpt)


def test_wrong_shape(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    state = hf_state(hf)
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 200)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="shape") as e:
        GPT2.from_pretrained(ckpt)
    msg = str(e.value)
    assert "h.1.mlp.c_fc.weight" in msg and "[64, 200]" in msg and "[64, 256]" in msg


def test_wrong_shape_head(tiny, tmp_path):
    """A stored lm_head must have wte's shape too, not be silently dropped."""
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    state = hf_state(hf)
    state["lm_head.weight"] = torch.zeros(999, 64)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="shape") as e:
        GPT2.from_pretrained(ckpt)
    assert "lm_head.weight" in str(e.value) and "[999, 64]" in str(e.value)


def test_missing_and_unexpected_keys(tiny, tmp_path):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    state = hf_state(hf)
    del state["transformer.h.0.ln_2.bias"]
    del state["transformer.wpe.weight"]
    state["transformer.h.0.attn.q_proj.weight"] = torch.zeros(3)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError) as e:
        GPT2.from_pretrained(ckpt)
    msg = str(e.value)
    assert "missing" in msg and "transformer.h.0.ln_2.bias" in msg and "transformer.wpe.weight" in msg
    assert "unexpected" in msg and "h.0.attn.q_proj.weight" in msg


def test_sharded_index_pointing_at_missing_shard(tiny, tmp_path):
    path, hf = tiny
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        GPT2.from_pretrained(tmp_path)


def test_sharded_index_corrupt(tiny, tmp_path):
    path, hf = tiny
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(ValueError, match="index"):
        GPT2.from_pretrained(tmp_path)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
def test_malicious_pickle_does_not_run(tiny, tmp_path, fmt):
    path, hf = tiny
    ckpt = new_checkpoint(tmp_path, path)
    marker = tmp_path / "marker"
    state: dict[str, Any] = dict(hf_state(hf))
    state["transformer.wpe.weight"] = _Payload(str(marker))
    target = ckpt / "pytorch_model.bin"
    if fmt == "raw_pickle":
        import pickle

        target.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, target, _use_new_zipfile_serialization=(fmt == "zip"))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        GPT2.from_pretrained(ckpt)
    assert not marker.exists()


# ----------------------------------------------------------------------- memory
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_loading_does_not_hold_two_copies(gpt2_checkpoint):
    """Peak RSS growth while loading the 124M checkpoint stays well under two copies.

    A fresh process, and VmHWM from /proc rather than getrusage's ru_maxrss, which
    Linux carries over from the parent (pytest, already large) across fork + exec.
    """
    path, _ = gpt2_checkpoint
    weight_bytes = (path / "model.safetensors").stat().st_size
    script = textwrap.dedent(
        f"""
        import torch, minigpt2
        from minigpt2 import GPT2

        def kib(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1])

        torch.ones(1) @ torch.ones(1)
        before = kib("VmRSS")
        model = GPT2.from_pretrained({os.fspath(path)!r}, device="cpu")
        print((kib("VmHWM") - before) * 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"[memory] peak RSS growth {growth / 2**20:.0f} MiB for {weight_bytes / 2**20:.0f} MiB of weights "
          f"({growth / weight_bytes:.2f}x)")
    assert growth < 1.5 * weight_bytes


# -------------------------------------------------------------------------- Hub

def _run_offline(script: str, tmp_path: Path) -> list[str]:
    """stdout lines of ``python -c script`` offline, with an empty Hub cache of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_hub_offline_without_cache_names_the_repo(tmp_path):
    """A repo id that is neither cached nor reachable: ValueError naming it, no library type."""
    script = textwrap.dedent(
        """
        from minigpt2 import GPT2
        from minigpt2.loading import resolve_checkpoint
        for call in (lambda: resolve_checkpoint("gpt2"), lambda: GPT2.from_pretrained("openai-community/gpt2-medium")):
            try:
                call()
            except Exception as e:
                print(type(e).__module__, type(e).__name__, "|", str(e).replace("\\n", " "))
        """
    )
    lines = _run_offline(script, tmp_path)
    assert len(lines) == 2, lines
    for line, repo in zip(lines, ("'gpt2'", "'openai-community/gpt2-medium'")):
        assert line.startswith("builtins ValueError |"), line
        assert repo in line, line


def test_generation_config_of_an_official_name_offline(tmp_path):
    """Offline with an empty cache, an official name's generation config comes from its packaged
    preset and equals what transformers derives from GPT-2's config (the official file's
    values); any other repo id is still the ValueError naming it."""
    script = textwrap.dedent(
        """
        import json
        from minigpt2 import GenerationConfig
        for name in ("gpt2", "distilbert/distilgpt2"):
            print(json.dumps(GenerationConfig.from_pretrained(name).to_diff_dict(), sort_keys=True))
        try:
            GenerationConfig.from_pretrained("someone/gpt2-finetune")
        except ValueError as e:
            print("ValueError", str(e).replace("\\n", " "))
        """
    )
    lines = _run_offline(script, tmp_path)
    # transformers 5 also writes the model-config flags it keeps (use_cache, output_*), which
    # are not generation settings; the official file holds bos / eos and the provenance flag.
    derived = transformers.GenerationConfig.from_model_config(transformers.GPT2Config()).to_diff_dict()
    want = {k: derived[k] for k in ("_from_model_config", "bos_token_id", "eos_token_id")}
    assert [json.loads(line) for line in lines[:2]] == [want, want]
    assert lines[2].startswith("ValueError") and "'someone/gpt2-finetune'" in lines[2]


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does after a download (refs/main -> snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hub_offline_from_the_cache(tiny, tmp_path, monkeypatch, weights):
    """A repo id already in the cache loads with HF_HUB_OFFLINE=1 (safetensors, or only .bin)."""
    import huggingface_hub.constants as hc

    path, hf = tiny
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    files = {"config.json": path / "config.json"}
    if weights == "model.safetensors":
        files[weights] = path / "model.safetensors"
    else:
        torch.save(hf_state(hf), tmp_path / "w.bin")
        files[weights] = tmp_path / "w.bin"
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-gpt2", files)
    model = GPT2.from_pretrained("someone/tiny-gpt2", device="cpu")
    assert model.name_or_path == "someone/tiny-gpt2"
    assert_matches(model, hf)
    # Cached config but no weights: a ValueError naming the repo.
    _fake_hub_cache(tmp_path / "hub", "someone/no-weights", {"config.json": path / "config.json"})
    with pytest.raises(ValueError, match="someone/no-weights"):
        GPT2.from_pretrained("someone/no-weights", device="cpu")


def test_not_a_path_not_a_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        GPT2.from_pretrained("./missing_dir")
    with pytest.raises((ValueError, FileNotFoundError), match="a/b/c"):
        GPT2.from_pretrained("a/b/c")


@pytest.mark.hub
@pytest.mark.skipif(os.environ.get("MINIGPT2_TEST_HUB") != "1", reason="needs the Hub: set MINIGPT2_TEST_HUB=1")
def test_real_gpt2_from_the_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    from minigpt2 import Tokenizer

    model = GPT2.from_pretrained("gpt2", device="cpu")
    hf = transformers.GPT2LMHeadModel.from_pretrained("gpt2").eval()
    text = "Hello, my dog is cute. The quick brown fox <|endoftext|> jumps over 12345 lazy dogs!"
    ours_ids = Tokenizer.from_pretrained("gpt2").encode(text)
    assert ours_ids == transformers.AutoTokenizer.from_pretrained("gpt2")(text)["input_ids"]
    ids = torch.tensor([ours_ids])
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert rel_err(ours, ref) <= RTOL
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


# ----------------------------------------------------------------------- saving
def test_save_pretrained_round_trip(tiny, tmp_path):
    path, hf = tiny
    model = GPT2.from_pretrained(path, device="cpu")
    out = tmp_path / "saved"
    model.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    keys = set(load_file(out / "model.safetensors"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]

    # minigpt2 -> dir -> minigpt2: exact.
    back = GPT2.from_pretrained(out, device="cpu")
    assert back.config == model.config
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1

    # -> transformers: no missing / unexpected keys, same logits.
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_matches(model, loaded.eval())

    # The tokenizer files are ones AutoTokenizer accepts.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]

    # Saving again into the same (previous checkpoint) directory works.
    model.save_pretrained(out)
    assert GPT2.from_pretrained(out, device="cpu").config == model.config


def test_save_bf16_round_trip(tiny, tmp_path):
    model = GPT2.from_pretrained(tiny[0], device="cpu", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    # The config records the saved dtype (the source config said float32).
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert hf.dtype == torch.bfloat16
    back = GPT2.from_pretrained(tmp_path / "bf16", device="cpu", dtype=torch.bfloat16)
    for (n1, t1), (_, t2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(t1, t2), n1


def test_save_into_a_file_path(tiny, tmp_path):
    model = GPT2.from_pretrained(tiny[0], device="cpu")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile"):
        model.save_pretrained(tmp_path / "afile")


def test_resolve_checkpoint_local(tiny):
    config, files = resolve_checkpoint(tiny[0])
    assert config == tiny[0] / "config.json" and files == [tiny[0] / "model.safetensors"]


def test_one_home_for_the_hub():
    """loading.py and tokenizer.py ask minigpt2.hub for files; neither imports the other's Hub code,
    and no module but hub.py calls huggingface_hub's downloader."""
    import ast

    package = REPO_ROOT / "minigpt2"
    imports: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.lstrip("."))
                names.update(f"{node.module.lstrip('.')}.{a.name}" for a in node.names)
        imports[str(path.relative_to(package))] = names
    tokenizer_files = [f for f in imports if f.startswith("tokenizer/")]
    assert tokenizer_files
    for f in tokenizer_files:
        assert not any(n.startswith(("loading", ".loading")) for n in imports[f]), (f, imports[f])
    downloaders = sorted(f for f, names in imports.items() if any("hf_hub_download" in n for n in names))
    assert downloaders == ["hub.py"], downloaders
