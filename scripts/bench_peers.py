"""The engines a user would pick instead of minigpt2 for CPU inference, on the same weights.

Used by scripts/bench.py (the peer rows); nothing of their code is part of minigpt2:

- **ONNX Runtime**: the checkpoint's forward exported by ``torch.onnx.export`` (the
  torch.export-based exporter) with the KV cache as graph inputs and outputs (one past key and
  one past value per layer, grown by concatenation each step, the usual way an ONNX decoder
  carries its cache), run by ``onnxruntime.InferenceSession`` with every graph optimisation
  on and the same number of threads as torch.
- **llama.cpp** through llama-cpp-python: the checkpoint converted to GGUF by llama.cpp's own
  ``convert_hf_to_gguf.py`` (f32 or f16 weights), decoded with or without flash attention.

Each peer decodes greedily with an argmax over its logits in numpy (what a user's loop
does), one sequence, and can time a prompt's prefill alone. Greedy tokens are compared with
transformers' before any timing: a peer that does not reproduce them is reported, not timed
silently.

Install: ``pip install -e ".[bench]"`` (onnxruntime, onnx, onnxscript, gguf,
llama-cpp-python; the last compiles llama.cpp, ~10 minutes on 2 cores). The converter script
is not in llama-cpp-python's wheel: it is taken from the same version's source distribution
(``pip download --no-binary :all: llama-cpp-python==VERSION``, which vendors llama.cpp) and
kept in ``~/.cache/minigpt2/peers``; ``--gguf-converter PATH`` or ``MINIGPT2_GGUF_CONVERTER``
points at another copy of ``convert_hf_to_gguf.py`` (its ``gguf-py`` and ``conversion``
folders beside it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

INSTALL = 'pip install -e ".[bench]"'


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says what to install or set."""


def missing(*modules: str) -> str | None:
    """None if every module imports, else the line saying what to install."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return None if not absent else f"{', '.join(absent)} not installed ({INSTALL})"


# --------------------------------------------------------------------------- ONNX Runtime
class _OnnxStep(torch.nn.Module):
    """GPT-2's forward with an explicit cache, in ops torch.onnx can export: input_ids [B, T],
    position_ids [B, T] and, per layer, past keys and values [B, nh, P, hs]; returns the last
    position's logits [B, V] and the present keys and values [B, nh, P + T, hs]. The same
    arithmetic as minigpt2's model (and transformers'), on the minigpt2 model's modules."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple:
        t, c = self.model.transformer, self.model.config
        B, T = input_ids.shape
        nh, hs, C = c.n_head, c.head_dim, c.n_embd
        x = t.wte(input_ids) + t.wpe(position_ids)
        presents = []
        for i, block in enumerate(t.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q = q.view(B, T, nh, hs).transpose(1, 2)
            k = torch.cat([past[2 * i], k.view(B, T, nh, hs).transpose(1, 2)], dim=2)  # (B, nh, P + T, hs)
            v = torch.cat([past[2 * i + 1], v.view(B, T, nh, hs).transpose(1, 2)], dim=2)
            presents += [k, v]
            S = k.shape[2]
            causal = torch.arange(S)[None, :] <= (torch.arange(T) + (S - T))[:, None]  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=block.attn.scale)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))
        return (self.model.lm_head(t.ln_f(x[:, -1])), *presents)


class OnnxRuntimePeer:
    """ONNX Runtime on a torch.onnx export of the checkpoint (fp32), KV cache carried."""

    def __init__(self, model: Any, workdir: Path, threads: int) -> None:
        reason = missing("onnxruntime", "onnx", "onnxscript")
        if reason:
            raise PeerUnavailable(reason)
        import onnxruntime as ort

        self.name, self.weights = "ONNX Runtime (torch.onnx export)", "fp32"
        c = model.config
        self.n_layer, self.nh, self.hs = c.n_layer, c.n_head, c.head_dim
        path = workdir / "model.onnx"
        t = time.perf_counter()
        self._export(model, path)
        self.prepare_s = time.perf_counter() - t
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _export(self, model: Any, path: Path) -> None:
        import logging
        import warnings

        c = model.config
        step = _OnnxStep(model).eval()
        B, T, P = 1, 3, 2
        past = tuple(torch.zeros(B, c.n_head, P, c.head_dim) for _ in range(2 * c.n_layer))
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.arange(P, P + T)[None]
        batch, seq, plen = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: plen} for _ in past))
        names = ["input_ids", "position_ids"] + [f"past_{i}" for i in range(len(past))]
        outputs = ["logits"] + [f"present_{i}" for i in range(len(past))]
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(step, (ids, pos, *past), str(path), dynamo=True, dynamic_shapes=shapes,
                              input_names=names, output_names=outputs, external_data=True)

    def _run(self, ids: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.inputs, [ids, positions, *past])))

    def _empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.nh, 0, self.hs), np.float32) for _ in range(2 * self.n_layer)]

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        ids = np.asarray([prompt], dtype=np.int64)
        positions = np.arange(len(prompt), dtype=np.int64)[None]
        past, out = self._empty_past(), []
        for step in range(n):
            logits, *past = self._run(ids, positions, past)
            out.append(int(logits[0].argmax()))
            ids = np.asarray([[out[-1]]], dtype=np.int64)
            positions = positions[:, -1:] + 1
        return out

    def prefill(self, prompt: Sequence[int]) -> int:
        ids = np.asarray([prompt], dtype=np.int64)
        logits = self._run(ids, np.arange(len(prompt), dtype=np.int64)[None], self._empty_past())[0]
        return int(logits[0].argmax())

    def close(self) -> None:
        del self.session


# --------------------------------------------------------------------------- llama.cpp
ENV_CONVERTER = "MINIGPT2_GGUF_CONVERTER"


def find_converter(explicit: Path | None, cache_dir: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, of the installed llama-cpp-python's version.

    ``explicit`` (a flag), then ``$MINIGPT2_GGUF_CONVERTER``, then the copy cached under
    ``cache_dir``; else the script (with the ``gguf-py`` and ``conversion`` folders it
    imports) is taken from that version's source distribution, fetched with pip.
    """
    for p in (explicit, os.environ.get(ENV_CONVERTER)):
        if p:
            p = Path(p)
            if not p.is_file():
                raise PeerUnavailable(f"{p} is not a file (convert_hf_to_gguf.py expected)")
            return p
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise PeerUnavailable(f"llama-cpp-python not installed ({INSTALL})") from None
    home = cache_dir / f"llama.cpp-{version}"
    script = home / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory(prefix="minigpt2-sdist-") as tmp:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps", "--no-binary",
             ":all:", "--quiet", "-d", tmp],
            capture_output=True, text=True,
        )  # fmt: skip
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise PeerUnavailable(
                f"could not fetch llama-cpp-python {version}'s source for convert_hf_to_gguf.py "
                f"(pass --gguf-converter PATH or set {ENV_CONVERTER}): {r.stderr.strip()[-300:]}"
            )
        prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
        staging = Path(tmp) / "out"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(wanted)]  # fmt: skip
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise PeerUnavailable(f"llama-cpp-python {version}'s source has no vendor/llama.cpp/convert_hf_to_gguf.py")
        home.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.move(str(staging), str(home))
    return script


def convert_to_gguf(checkpoint: Path, out: Path, outtype: str, converter: Path) -> None:
    """The checkpoint as GGUF, by llama.cpp's converter. It reads GPT-2's original config key
    ``n_ctx`` (transformers 5 no longer writes it) and the tokenizer files, so it runs on a
    staging folder: the weights linked, config.json with n_ctx, GPT-2's vocab and merges."""
    import minigpt2

    with tempfile.TemporaryDirectory(prefix="minigpt2-gguf-") as tmp:
        stage = Path(tmp)
        for f in checkpoint.iterdir():
            if f.name != "config.json":
                (stage / f.name).symlink_to(f.resolve())
        config = json.loads((checkpoint / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        (stage / "config.json").write_text(json.dumps(config))
        data = Path(minigpt2.__file__).parent / "data"  # GPT-2's vocab.json, merges.txt, as bundled
        for f in data.iterdir():
            if not (stage / f.name).exists():
                shutil.copy(f, stage / f.name)
        r = subprocess.run([sys.executable, str(converter), str(stage), "--outfile", str(out), "--outtype", outtype],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0 or not out.is_file():
            raise PeerUnavailable(f"convert_hf_to_gguf.py failed: {r.stderr.strip()[-500:]}")


class LlamaCppPeer:
    """llama.cpp (llama-cpp-python) on the checkpoint converted to GGUF by llama.cpp itself."""

    def __init__(self, checkpoint: Path, workdir: Path, outtype: str, flash_attn: bool, threads: int,
                 converter: Path, n_ctx: int) -> None:  # fmt: skip
        reason = missing("llama_cpp", "gguf")
        if reason:
            raise PeerUnavailable(reason)
        import llama_cpp

        self.name = "llama.cpp" + (" (flash attention)" if flash_attn else "")
        self.weights = outtype
        gguf = workdir / f"model-{outtype}.gguf"
        t = time.perf_counter()
        if not gguf.is_file():
            convert_to_gguf(checkpoint, gguf, outtype, converter)
        self.prepare_s = time.perf_counter() - t
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
            n_threads_batch=threads, flash_attn=flash_attn, verbose=False,
        )  # fmt: skip
        self._lib = llama_cpp
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(prompt))
        out: list[int] = []
        for step in range(n):
            out.append(int(self._last_logits().argmax()))
            if step < n - 1:
                self.llm.eval([out[-1]])
        return out

    def prefill(self, prompt: Sequence[int]) -> int:
        self.llm.reset()
        self.llm.eval(list(prompt))
        return int(self._last_logits().argmax())

    def close(self) -> None:
        self.llm.close()


class _quiet:
    """Silence a library's prints to stdout (the ONNX exporter's progress lines)."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self._saved = os.dup(1)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 1)

    def __exit__(self, *exc: Any) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
        os.close(self._null)


def first_difference(got: Sequence[int], want: Sequence[int]) -> int | None:
    """The first step where two greedy continuations differ (None: equal)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))
