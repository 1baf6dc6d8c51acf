"""Batches: truncation and padding of token id rows, as transformers' tokenizer call does them.

``Tokenizer.__call__`` encodes each text, then :func:`truncate` and :func:`pad` here turn the
rows into ``input_ids`` + ``attention_mask`` (transformers' ``_get_padding_truncation_strategies``
decides the strategies; :func:`strategies` follows it):

* ``padding``: ``False`` / ``"do_not_pad"`` (rows keep their lengths), ``True`` / ``"longest"``
  (to the longest row), ``"max_length"`` (to ``max_length``, else ``model_max_length``);
  ``pad_to_multiple_of`` rounds the padded length up;
* ``truncation``: ``True`` / ``"longest_first"`` / ``"only_first"`` cut each row to
  ``max_length`` (else ``model_max_length``), special tokens included, on ``truncation_side``;
  ``None`` means "truncate" only when ``max_length`` is given without padding;
* ``padding_side="left"`` puts the padding first, as ``generate`` wants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["BatchEncoding", "strategies", "truncate", "pad", "as_tensors"]

_LARGE_INTEGER = int(1e20)  # transformers: a model_max_length above this means "no limit"


class BatchEncoding(dict):
    """What a tokenizer call returns: ``{"input_ids": ..., "attention_mask": ...}``, readable as
    attributes too (``enc.input_ids``), with :meth:`to` for tensors, as transformers'
    ``BatchEncoding``; ``model(**enc)`` and ``model.generate(**enc)`` take it as it is."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r} (keys: {', '.join(self)})") from None

    def to(self, device: Any) -> BatchEncoding:
        """The same batch with every tensor moved to ``device`` (lists stay lists)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def strategies(
    padding: bool | str, truncation: bool | str | None, max_length: int | None, pad_to_multiple_of: int | None, model_max_length: int
) -> tuple[str, int | None, int | None]:
    """(padding strategy "longest" / "max_length" / "none", padded length or None, truncation
    length or None), decided as transformers decides them.

    Raises:
        ValueError: an unknown padding or truncation value, a max_length or pad_to_multiple_of
            below 1, or a truncation length that pad_to_multiple_of does not divide.
    """
    for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer or None")
    if max_length is not None and padding is False and truncation is None:
        truncation = "longest_first"
    if padding is True or padding == "longest":
        pad_strategy = "longest"
    elif padding is False or padding == "do_not_pad":
        pad_strategy = "none"
    elif padding == "max_length":
        pad_strategy = "max_length"
    else:
        raise ValueError(f"padding={padding!r} must be True, False, 'longest', 'max_length' or 'do_not_pad'")
    if truncation is None or truncation is False or truncation == "do_not_truncate":
        truncate_to = None
    elif truncation is True or truncation in ("longest_first", "only_first"):
        truncate_to = max_length
        if truncate_to is None and model_max_length <= _LARGE_INTEGER:
            truncate_to = model_max_length
    else:
        raise ValueError(
            f"truncation={truncation!r} must be True, False, None, 'longest_first', 'only_first' or 'do_not_truncate' "
            "(one sequence per row: there is no second one to truncate)"
        )
    pad_to = None
    if pad_strategy == "max_length":
        pad_to = max_length
        if pad_to is None:
            if model_max_length > _LARGE_INTEGER:
                pad_strategy = "none"
            else:
                pad_to = model_max_length
    if truncate_to is not None and pad_strategy != "none" and pad_to_multiple_of and truncate_to % pad_to_multiple_of:
        raise ValueError(
            f"truncation to {truncate_to} tokens and padding to a multiple of {pad_to_multiple_of} cannot both hold"
        )
    return pad_strategy, pad_to, truncate_to


def truncate(rows: list[list[int]], limit: int, side: str) -> list[list[int]]:
    """Each row cut to at most ``limit`` ids, dropping from the right or the left."""
    if side == "right":
        return [row[:limit] for row in rows]
    return [row[len(row) - limit :] if len(row) > limit else row for row in rows]


def pad(
    rows: list[list[int]], strategy: str, length: int | None, pad_to_multiple_of: int | None, pad_id: int, side: str
) -> tuple[list[list[int]], list[list[int]]]:
    """(padded rows, attention masks): 1 on real tokens, 0 on padding (``pad_id``), padding on
    ``side``. Rows already longer than the target length are left as they are (transformers)."""
    if strategy == "none" or not rows:
        return rows, [[1] * len(row) for row in rows]
    target = max(map(len, rows)) if strategy == "longest" else int(length or 0)
    if pad_to_multiple_of and target % pad_to_multiple_of:
        target += pad_to_multiple_of - target % pad_to_multiple_of
    ids_out, masks = [], []
    for row in rows:
        n = max(target - len(row), 0)
        if side == "left":
            ids_out.append([pad_id] * n + row)
            masks.append([0] * n + [1] * len(row))
        else:
            ids_out.append(row + [pad_id] * n)
            masks.append([1] * len(row) + [0] * n)
    return ids_out, masks


def as_tensors(rows: Sequence[Sequence[int]], return_tensors: str | None, what: str) -> Any:
    """Rows as a [batch, seq] int64 tensor ("pt") or NumPy array ("np"), or as they are (None).

    Raises:
        ValueError: rows of different lengths (naming them and the fix), or an unknown
            ``return_tensors``.
    """
    if return_tensors is None:
        return [list(r) for r in rows]
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors={return_tensors!r} must be 'pt', 'np' or None")
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(
            f"cannot make one tensor of {what} rows of lengths {lengths[0]}..{lengths[-1]}: pass padding=True "
            "(and truncation=True to cut long rows)"
        )
    import numpy as np

    array = np.array(rows, dtype=np.int64).reshape(len(rows), lengths[0] if lengths else 0)
    if return_tensors == "np":
        return array
    import torch

    return torch.from_numpy(array)
