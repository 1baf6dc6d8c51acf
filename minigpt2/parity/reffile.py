"""The reference file: one safetensors file holding everything a GPT-2 forward and backward
pass computes, by minigpt2's names, so another implementation can be held against it.

Tensors (docs/parity.md has the full table with shapes and layouts):

- ``input_ids`` [B, T] int64 and ``targets`` [B, T] int64 (input_ids shifted left by one,
  -100 where a position has no next token);
- every activation name (``embed``, ``h.N.ln_1``, ``h.N.attn.q``, ...), float32;
- ``logits`` [B, T, V] float32 and ``loss`` (0-dim float32, mean cross-entropy over targets
  that are not -100);
- ``grad.<parameter name>`` for every parameter (transformers' names, e.g.
  ``grad.transformer.h.0.attn.c_attn.weight``), float32, shaped as the parameter.

Metadata (safetensors' string-to-string ``__metadata__``): ``format`` = ``minigpt2-parity``,
``format_version``, ``config`` (the checkpoint's config.json, as JSON) and ``header`` (JSON:
versions, who computed it, the input text, and every tensor's dtype and shape in order).

A dump from another implementation is the same kind of file with any subset of those names
and no metadata required.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..hub import atomic_write
from .capture import Capture

FORMAT = "minigpt2-parity"
FORMAT_VERSION = "1"
GRAD_PREFIX = "grad."
_SPECIAL = ("input_ids", "targets", "logits", "loss")


def save_reference(
    capture: Capture,
    path: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    text: str | None = None,
    producer: str | None = None,
) -> Path:
    """Write ``capture`` as a reference file (see the module docstring); returns its path.

    config: the checkpoint's config.json mapping, stored in the metadata.
    text: the text the input ids came from, if any (stored for people, not read back).
    producer: who computed the tensors (default ``capture.source``).
    The file is written under a temporary name and renamed into place. Raises
    FileNotFoundError when the directory does not exist.
    """
    from safetensors.torch import save_file

    from .. import __version__

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory for the reference file not found: {path.parent}")
    tensors: dict[str, torch.Tensor] = {}
    if capture.input_ids is not None:
        tensors["input_ids"] = capture.input_ids.long()
    if capture.targets is not None:
        tensors["targets"] = capture.targets.long()
    tensors.update(capture.activations)
    if capture.logits is not None:
        tensors["logits"] = capture.logits
    if capture.loss is not None:
        tensors["loss"] = capture.loss.reshape(())
    tensors.update({GRAD_PREFIX + n: g for n, g in capture.grads.items()})
    # safetensors refuses views that share memory (q, k, v are views of one c_attn output).
    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
    versions = {"minigpt2": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    header = {
        "producer": producer or capture.source,
        "dtype": str(capture.dtype).removeprefix("torch.") if capture.dtype is not None else None,
        "versions": versions,
        "text": text,
        "targets": "input_ids shifted left by one; -100 = no target (the last position)",
        "loss": "mean cross-entropy of logits against targets, positions with target -100 left out",
        "names": list(tensors),
        "shapes": {n: list(t.shape) for n, t in tensors.items()},
        "dtypes": {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()},
    }
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config or {}, sort_keys=True),
        "header": json.dumps(header),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's metadata with ``config`` and ``header`` parsed ({} where absent)."""
    meta = _open(Path(path), lambda f: f.metadata() or {})
    out: dict[str, Any] = dict(meta)
    for key in ("config", "header"):
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise ValueError(f"{path}: its {key!r} metadata is not valid JSON") from None
    return out


def load_reference(path: str | os.PathLike[str], *, grads: bool = True, require_input_ids: bool = True) -> Capture:
    """Read a reference file (or another implementation's dump) into a :class:`Capture`.

    grads: also read the ``grad.*`` tensors (they are as large as the model; skip them when
        gradients are not compared).
    require_input_ids: a reference must say what it was run on; a dump need not.
    Tensors keep their stored dtype; comparisons happen in float64. A 1-D ``input_ids`` /
    ``targets`` is one row. Raises FileNotFoundError for a missing file and ValueError for
    a file that is not readable safetensors or whose ids are not integer token ids.
    """
    path = Path(path).expanduser()

    def read(f: Any) -> dict[str, torch.Tensor]:
        return {k: f.get_tensor(k) for k in f.keys() if grads or not k.startswith(GRAD_PREFIX)}

    tensors = _open(path, read)
    meta = read_metadata(path)
    ids = tensors.pop("input_ids", None)
    targets = tensors.pop("targets", None)
    if ids is None and require_input_ids:
        raise ValueError(f"{path} holds no input_ids: a reference must say which tokens it was computed on")
    ids, targets = _ids(path, "input_ids", ids), _ids(path, "targets", targets, allow_negative=True)
    if ids is not None and targets is not None and targets.shape != ids.shape:
        raise ValueError(f"{path}: targets shape {list(targets.shape)} != input_ids shape {list(ids.shape)}")
    logits, loss = tensors.pop("logits", None), tensors.pop("loss", None)
    if loss is not None and loss.numel() != 1:
        raise ValueError(f"{path}: loss must hold one number, it has shape {list(loss.shape)}")
    grad = {k.removeprefix(GRAD_PREFIX): t for k, t in tensors.items() if k.startswith(GRAD_PREFIX)}
    acts = {k: t for k, t in tensors.items() if not k.startswith(GRAD_PREFIX)}
    header = meta.get("header") if isinstance(meta.get("header"), dict) else {}
    dtype_name = header.get("dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not isinstance(dtype, torch.dtype):  # a foreign dump: what its tensors are stored in
        stored = logits if logits is not None else next(iter(acts.values()), None)
        dtype = stored.dtype if stored is not None else None
    producer = header.get("producer") or "unknown"
    return Capture(
        input_ids=ids,
        activations=_in_forward_order(acts),
        logits=logits,
        targets=targets,
        loss=loss.reshape(()).float() if loss is not None else None,
        grads=grad,
        dtype=dtype,
        source=f"{path.name} ({producer})",
    )


def _open(path: Path, fn: Any) -> Any:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return fn(f)
    except Exception as e:  # safetensors' own errors name neither the file nor the problem
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _ids(path: Path, name: str, t: torch.Tensor | None, allow_negative: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{path}: {name} must be integer token ids, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{path}: {name} must be [batch, seq], got shape {list(t.shape)}")
    t = t.long()
    low = int(t.min())
    if low < 0 and not (allow_negative and bool(((t >= 0) | (t == -100)).all())):
        raise ValueError(f"{path}: {name} holds {low}, not a token id" + (" or -100" if allow_negative else ""))
    return t


def _in_forward_order(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Activations sorted as the forward computes them (a dump may store them in any order);
    names that are not minigpt2's keep their place after the known ones."""
    from .capture import activation_names

    layers = [int(n.split(".")[1]) for n in acts if n.startswith("h.") and n.split(".")[1].isdigit()]
    order = {n: i for i, n in enumerate(activation_names(max(layers) + 1 if layers else 0))}
    return dict(sorted(acts.items(), key=lambda kv: order.get(kv[0], len(order))))
