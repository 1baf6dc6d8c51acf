"""The benchmark's peer engines (scripts/bench_peers.py) reproduce transformers' greedy tokens.

They are optional (``pip install -e ".[bench]"``): each test skips with a line saying what
is missing. llama.cpp's converter comes from llama-cpp-python's source distribution, which
the benchmark fetches with pip; here it is only used when already on disk (the benchmark's
cache, or MINIGPT2_GGUF_CONVERTER), so the suite never reaches for the network.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import pytest
import torch

from minigpt2 import GPT2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_peers as bp  # noqa: E402

GPT2_VOCAB = dict(vocab_size=50257, n_positions=64)  # llama.cpp's converter needs GPT-2's own vocabulary


def _want(hf, ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=50256)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_missing_peer_names_what_to_install() -> None:
    assert bp.missing("json") is None
    assert 'pip install -e ".[bench]"' in bp.missing("no_such_module_xyz")


def test_first_difference() -> None:
    assert bp.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bp.first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert bp.first_difference([1, 2], [1, 2, 3]) == 2


def test_onnxruntime_peer_is_token_exact(make_checkpoint, tmp_path: Path) -> None:
    if bp.missing("onnxruntime", "onnx", "onnxscript"):
        pytest.skip(bp.missing("onnxruntime", "onnx", "onnxscript"))
    directory, hf = make_checkpoint(seed=31, **GPT2_VOCAB)
    peer = bp.OnnxRuntimePeer(GPT2.from_pretrained(directory, device="cpu"), tmp_path, threads=1)
    ids = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(0))
    assert peer.greedy(ids[0].tolist(), 20) == _want(hf, ids, 20)
    assert peer.prefill(ids[0].tolist()) == _want(hf, ids, 1)[0]
    peer.close()


def _local_converter() -> Path | None:
    if os.environ.get(bp.ENV_CONVERTER):
        return Path(os.environ[bp.ENV_CONVERTER])
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    script = Path.home() / ".cache" / "minigpt2" / "peers" / f"llama.cpp-{version}" / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def test_llama_cpp_peer_is_token_exact(make_checkpoint, tmp_path: Path) -> None:
    if bp.missing("llama_cpp", "gguf"):
        pytest.skip(bp.missing("llama_cpp", "gguf"))
    converter = _local_converter()
    if converter is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not on disk (scripts/bench.py fetches it once)")
    directory, hf = make_checkpoint(seed=32, **GPT2_VOCAB)
    peer = bp.LlamaCppPeer(directory, tmp_path, "f32", flash_attn=True, threads=1, converter=converter, n_ctx=256)
    ids = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(1))
    assert peer.greedy(ids[0].tolist(), 20) == _want(hf, ids, 20)
    assert peer.prefill(ids[0].tolist()) == _want(hf, ids, 1)[0]
    peer.close()


def test_converter_given_but_absent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(bp.PeerUnavailable, match="not a file"):
        bp.find_converter(tmp_path / "nope.py", tmp_path)
