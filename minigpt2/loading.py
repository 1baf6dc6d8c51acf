"""Checkpoints in and out: local directories, the Hugging Face Hub, safetensors.

Loading aligns keys explicitly and loudly (nanoGPT's rule): every parameter of the model
must be found with its exact shape, and anything else in the file is an error, except
the few known non-parameters (the old causal-mask buffers ``attn.bias`` /
``attn.masked_bias`` and the tied ``lm_head.weight``). The only renaming is the optional
``transformer.`` prefix, which the official ``gpt2`` repo leaves out.

Memory: the model is built on the meta device (no storage), each parameter is then
allocated once in its final dtype and device and filled tensor by tensor straight from
the file, so at no point are two full copies of the weights in memory.

Nothing here unpickles code: safetensors and JSON; a ``pytorch_model.bin`` only through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import GPT2Config, is_official
from .generation_config import GenerationConfig
from .hub import HubRepo, atomic_write, local_dir, read_json
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .model import GPT2

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

# Buffers older transformers versions saved beside the parameters: not weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# safetensors' dtype names -> torch dtypes (the ones a GPT-2 checkpoint can hold).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


# ------------------------------------------------------------------------- devices
def get_device() -> torch.device:
    """The best available device: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype from a dtype or a name ("bfloat16", "bf16", ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """torch device from a device, a name ("cuda", "cpu", "mps", "cuda:1"), or None (best)."""
    if device is None or device == "auto":
        return get_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a valid device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


# ------------------------------------------------------------------ where the files are
def resolve_checkpoint(name_or_path: str | os.PathLike[str], revision: str | None = None) -> tuple[Path, list[Path]]:
    """(config.json path, weight files) for a local directory or a Hub repo id.

    A local directory is used as it is. Anything else is taken as a Hub repo id and
    fetched with huggingface_hub (:mod:`minigpt2.hub`): only config.json and the weights
    (safetensors first), into the standard cache, so a second load (or HF_HUB_OFFLINE=1)
    needs no network.
    """
    path = local_dir(name_or_path)
    if path is not None:
        return _local_checkpoint(path)
    return _hub_checkpoint(HubRepo(os.fspath(name_or_path), revision))


def _local_checkpoint(path: Path) -> tuple[Path, list[Path]]:
    config = path / CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"no {CONFIG} in checkpoint directory {path}")
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        if (path / single).is_file():
            return config, [path / single]
        if (path / index).is_file():
            return config, [path / f for f in _shards(path / index)]
    raise FileNotFoundError(
        f"no weights in {path}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} or {PYTORCH_BIN_INDEX}"
    )


def _shards(index_file: Path) -> list[str]:
    """Shard file names of a sharded checkpoint, in order, from its index.json."""
    files = _shards_listed(index_file)
    for f in files:
        if not (index_file.parent / f).is_file():
            raise FileNotFoundError(f"shard {f} listed in {index_file} not found")
    return files


def _hub_checkpoint(repo: HubRepo) -> tuple[Path, list[Path]]:
    config = repo.file(CONFIG)
    if config is None:
        raise repo.error()
    repo.file(GENERATION_CONFIG)  # optional: fetched beside config.json when the repo has one
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        found = repo.file(single)
        if found is not None:
            return config, [found]
        found = repo.file(index)
        if found is not None:
            shards = []
            for name in _shards_listed(found):
                shard = repo.file(name)
                if shard is None:
                    raise repo.error() if repo.not_cached else ValueError(
                        f"shard {name} listed in {index} of Hub repo {repo.repo_id!r} is not in the repo"
                    )
                shards.append(shard)
            return config, shards
    if repo.not_cached:
        raise repo.error()
    raise ValueError(f"Hub repo {repo.repo_id!r} has no {SAFETENSORS} or {PYTORCH_BIN} weights")


def _shards_listed(index_file: Path) -> list[str]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        return sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index_file} is not a valid shard index ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------- reading tensors
class _TensorSource:
    """One tensor in a weights file: its shape and dtype now, its data on demand."""

    def __init__(self, file: Path, shape: tuple[int, ...], dtype: torch.dtype, read: Any) -> None:
        self.file, self.shape, self.dtype, self._read = file, shape, dtype, read

    def read_into(self, out: torch.Tensor) -> None:
        self._read(out)


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header: (entries, offset of the data section)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file: it is {size} bytes long")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path} is truncated or corrupt: its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} is corrupt: bad header entry for {key!r}") from None
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise ValueError(f"{path} is corrupt: {key!r} has {end - begin} bytes for shape {list(shape)}")
        if data_start + end > size:
            raise ValueError(
                f"{path} is truncated: {key!r} ends at byte {data_start + end}, the file has {size} bytes"
            )
        info["_torch"] = (dtype, shape, data_start + begin)
    return header, data_start


def _safetensors_sources(path: Path) -> Iterator[tuple[str, _TensorSource]]:
    """Tensors of a .safetensors file, read with plain file reads into the destination's
    memory (no mmap: mapped pages would count as a second copy of the weights)."""
    # Let the safetensors library vouch for the file too; wrap its error in plain words.
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    header, _ = _safetensors_header(path)
    for key, info in header.items():
        dtype, shape, offset = info["_torch"]

        def read(out: torch.Tensor, dtype: torch.dtype = dtype, shape: tuple[int, ...] = shape, offset: int = offset) -> None:
            direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
            buf = out if direct else torch.empty(shape, dtype=dtype)
            view = buf.view(torch.uint8).reshape(-1) if buf.numel() else buf
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(view.numpy()))  # type: ignore[arg-type]
            if got != view.numel():
                raise ValueError(f"{path} is truncated: short read for {key!r}")
            if not direct:
                out.copy_(buf.reshape(out.shape))

        yield key, _TensorSource(path, shape, dtype, read)


def _bin_sources(path: Path) -> Iterator[tuple[str, _TensorSource]]:
    """Tensors of a pytorch_model.bin, via torch.load(weights_only=True): no code runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" in str(e):  # the legacy (non-zip) format cannot be mapped
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e2:
                raise ValueError(f"{path} could not be loaded safely ({type(e2).__name__}: {e2})") from None
        else:
            raise ValueError(f"{path} could not be loaded safely ({type(e).__name__}: {e})") from None
    except Exception as e:  # UnpicklingError for anything that would run code, EOF, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path} could not be loaded safely ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is not a tensor")
        yield key, _TensorSource(path, tuple(t.shape), t.dtype, lambda out, t=t: out.copy_(t))


def _sources(files: list[Path]) -> Iterator[tuple[str, _TensorSource]]:
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weights file not found: {f}")
        yield from (_bin_sources(f) if f.suffix == ".bin" else _safetensors_sources(f))


# --------------------------------------------------------------------------- loading
def load_state_from_files(model: GPT2, files: list[Path]) -> None:
    """Fill every parameter of ``model`` (already allocated) from ``files``, checking names
    and shapes; ValueError lists missing / unexpected keys or the mismatched shape."""
    params = dict(model.named_parameters())  # the tied head appears once, as wte
    found: dict[str, _TensorSource] = {}
    unexpected: list[str] = []
    for key, src in _sources(files):
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith(_IGNORED_SUFFIXES) and name not in params:
            continue
        if name == "lm_head.weight":
            found.setdefault("__lm_head__", src)
            continue
        if name not in params:
            unexpected.append(key)
            continue
        found[name] = src
    lm_head = found.pop("__lm_head__", None)
    wte = params["transformer.wte.weight"]
    if lm_head is not None and tuple(lm_head.shape) != tuple(wte.shape):
        # The head is tied to wte and not loaded on its own, but a stored one must fit.
        raise ValueError(
            f"shape mismatch for lm_head.weight in {lm_head.file}: checkpoint has {list(lm_head.shape)}, "
            f"the config needs {list(wte.shape)} (tied to transformer.wte.weight)"
        )
    if lm_head is not None and "transformer.wte.weight" not in found:
        found["transformer.wte.weight"] = lm_head  # head stored, embedding left out: same tensor
    missing = [n for n in params if n not in found]
    if missing or unexpected:
        where = ", ".join(str(f) for f in files)
        parts = []
        if missing:
            parts.append(f"missing keys: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short_list(unexpected)}")
        raise ValueError(f"checkpoint {where} does not match the config: " + "; ".join(parts))
    for name, p in params.items():
        src = found[name]
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(
                f"shape mismatch for {name} in {src.file}: checkpoint has {list(src.shape)}, "
                f"the config needs {list(p.shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            found[name].read_into(p.data)


def _short_list(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_pretrained(
    cls: type[GPT2],
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> GPT2:
    """Build a model from a checkpoint directory or Hub repo id; eval mode, params require grad."""
    dtype = resolve_dtype(dtype) or torch.float32
    dev = resolve_device(device)
    config_file, weight_files = resolve_checkpoint(name_or_path, revision)
    config = GPT2Config.from_json_file(config_file)
    with torch.device("meta"):
        model = cls(config)
    # Allocate each parameter once, in its final dtype and place (dtype first: on the meta
    # device converting costs nothing); the file then fills it.
    model = model.to(dtype).to_empty(device=dev)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty re-creates; re-tie
    load_state_from_files(model, weight_files)
    model.generation_config = _generation_config(config_file)
    model.name_or_path = os.fspath(name_or_path)
    return model.eval()


def read_generation_config(name_or_path: str | os.PathLike[str], revision: str | None = None) -> GenerationConfig:
    """A checkpoint's generation settings, as transformers finds them: its
    generation_config.json, else derived from its config.json (a local directory or a Hub
    repo id; from the Hub, only those two small files are fetched). An official checkpoint
    (gpt2, ..., distilgpt2) that the Hub cannot give (offline, not cached) is derived from its
    packaged preset, which is what its generation_config.json holds (bos / eos 50256)."""
    path = local_dir(name_or_path)
    if path is not None:
        config_file = path / CONFIG
        if not config_file.is_file() and not (path / GENERATION_CONFIG).is_file():
            raise FileNotFoundError(f"no {GENERATION_CONFIG} or {CONFIG} in checkpoint directory {path}")
    else:
        name = os.fspath(name_or_path)
        repo = HubRepo(name, revision)
        found = repo.file(GENERATION_CONFIG)
        if found is not None:
            return GenerationConfig.from_json_file(found)
        config_file = repo.file(CONFIG)
        if config_file is None:
            if repo.not_cached and revision is None and is_official(name):
                return GenerationConfig.from_model_config(GPT2Config.from_preset(name).to_dict())
            raise repo.error()
    return _generation_config(config_file)


def _generation_config(config_file: Path) -> GenerationConfig:
    """generation_config.json beside ``config_file`` (a Hub download puts it there), else
    what transformers derives from config.json itself."""
    gen = config_file.parent / GENERATION_CONFIG
    if gen.is_file():
        return GenerationConfig.from_json_file(gen)
    return GenerationConfig.from_model_config(read_json(config_file))


# --------------------------------------------------------------------------- saving
def save_pretrained(model: GPT2, directory: str | os.PathLike[str], **card: Any) -> None:
    """Write a checkpoint transformers' GPT2LMHeadModel, AutoTokenizer and minigpt2 load.

    Files: model.safetensors (transformers' key layout, tied lm_head left out as
    transformers itself saves it), config.json, generation_config.json, the tokenizer
    files, and a README.md model card when ``card`` fields are given (base_model, data,
    steps, losses, ...). ``directory`` may exist if it is empty or a previous checkpoint.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    gen = getattr(model, "generation_config", None)
    if not isinstance(gen, GenerationConfig):  # never set, or set to a plain dict by hand
        gen = GenerationConfig.from_dict(gen) if isinstance(gen, dict) else GenerationConfig.from_model_config(
            model.config.to_dict()
        )
    gen.validate(vocab_size=model.config.vocab_size)  # before any file: a config generate refuses is not saved
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        name = name.removeprefix("module.").removeprefix("_orig_mod.")
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties on load
        tensors[name] = t.detach().to("cpu").contiguous()
    atomic_write(out / SAFETENSORS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = model.config.to_dict()
    # transformers v5 reads "dtype", v4 "torch_dtype": write both, so a "dtype" carried over
    # from the source config.json (in config.extra) cannot contradict the saved weights.
    config["dtype"] = config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    atomic_write(out / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen.save_pretrained(out)
    tokenizer = getattr(model, "tokenizer", None) or Tokenizer.from_pretrained(getattr(model, "name_or_path", None))
    tokenizer.save_pretrained(out)
    if card:
        atomic_write(out / "README.md", model_card(model, **card))


def model_card(model: GPT2, **fields: Any) -> str:
    """A short README.md model card recording where the weights came from."""
    c = model.config
    lines = [
        "---",
        "library_name: transformers",
        "tags: [gpt2, minigpt2]",
        "---",
        "",
        f"# {fields.pop('title', 'GPT-2 checkpoint')}",
        "",
        "Saved by minigpt2 in the layout of transformers' `GPT2LMHeadModel`.",
        "",
        f"- architecture: GPT-2, n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
        f"n_positions={c.n_positions}, vocab_size={c.vocab_size}",
    ]
    for key, value in fields.items():
        lines.append(f"- {key.replace('_', ' ')}: {value}")
    return "\n".join(lines) + "\n"
