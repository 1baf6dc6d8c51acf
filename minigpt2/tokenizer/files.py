"""A checkpoint's tokenizer files -> :class:`TokenizerSpec`, and back.

The Hub and transformers know two layouts, and a checkpoint may hold either or both:

* ``tokenizer.json`` (the ``tokenizers`` library's file: ``model.vocab``, ``model.merges``,
  ``added_tokens`` with their flags, pre-tokenizer, post-processor). transformers 5 writes only
  this and ``tokenizer_config.json``;
* ``vocab.json`` + ``merges.txt`` (GPT-2's own files), with ``added_tokens.json`` and
  ``special_tokens_map.json`` beside them in older saves.

``tokenizer_config.json`` holds the rest: the named special tokens (``eos_token``,
``pad_token``, ...), ``add_prefix_space``, ``added_tokens_decoder``, ``model_max_length``.

:func:`read_files` decides as transformers 5 does when it loads GPT-2's tokenizer
(``GPT2Tokenizer`` / ``TokenizersBackend`` and ``PreTrainedTokenizerBase._from_pretrained``):

* vocabulary and merges from tokenizer.json when there is one, else vocab.json + merges.txt;
* added tokens from ``added_tokens_decoder`` when the config has it, else from
  added_tokens.json and tokenizer.json's ``added_tokens``; then every named special token that
  is not yet an added token is added (``special``, not normalized), and every added token named
  as a special token is special. A ``<|...|>`` entry of vocab.json that nothing declares stays a
  plain vocabulary entry: ``"<|pad|>"`` in text is BPE-encoded, as in transformers;
* ids: an added token keeps its vocabulary id; one not in the vocabulary gets the next free id
  (the vocabulary size, or one past the largest added id), in declared-id order, which is what
  tokenizers' ``AddedVocabulary.add_tokens`` assigns (it does not keep a declared id past a gap);
* ``tokenizer_class`` ``GPT2Tokenizer`` (or none): GPT-2's pre-tokenizer with the config's
  ``add_prefix_space`` (tokenizer.json's pre-tokenizer is not read); ``PreTrainedTokenizerFast``
  / ``TokenizersBackend``: tokenizer.json's own ByteLevel pre-tokenizer, checked to be byte-level;
* the special tokens a call adds (BOS/EOS templates): tokenizer.json's post-processor, or without
  tokenizer.json the config's ``add_bos_token`` / ``add_eos_token``.

:func:`write_files` writes tokenizer.json + tokenizer_config.json (what transformers 5 writes)
and vocab.json + merges.txt + special_tokens_map.json (+ added_tokens.json) for older readers, so
a saved directory loads in both with the same ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..hub import atomic_write, read_json
from .added_tokens import AddedToken
from .bytelevel import ByteLevelBPE

__all__ = [
    "TOKENIZER_FILES", "SPECIAL_TOKEN_NAMES", "VERY_LARGE_INTEGER", "TokenizerSpec", "read_files", "write_files",
    "packaged_files",
]  # fmt: skip

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
CONFIG_JSON = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_JSON = "special_tokens_map.json"
ADDED_TOKENS_JSON = "added_tokens.json"
#: Every file name that belongs to a tokenizer; a checkpoint with none of them has no tokenizer.
TOKENIZER_FILES = (TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, CONFIG_JSON, SPECIAL_TOKENS_MAP_JSON, ADDED_TOKENS_JSON)

#: transformers' named special tokens (``SPECIAL_TOKENS_ATTRIBUTES``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GPT2_DEFAULT_TOKEN = "<|endoftext|>"  # GPT2Tokenizer's default unk / bos / eos
#: transformers' model_max_length when a config sets none ("no limit").
VERY_LARGE_INTEGER = int(1e30)
_GPT2_CLASSES = (None, "GPT2Tokenizer", "GPT2TokenizerFast")

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so tables derived from it can be cached
class TokenizerSpec:
    """Everything that decides a tokenizer's ids, resolved from its files."""

    bpe: ByteLevelBPE
    added_tokens: dict[int, AddedToken]  # {id: token}, ids assigned as transformers assigns them
    special_tokens_map: dict[str, str]  # {"eos_token": "<|endoftext|>", ...}: named, resolved, set
    extra_special_tokens: tuple[str, ...] = ()  # additional_special_tokens
    add_prefix_space: bool = False
    use_regex: bool = True  # ByteLevel pre-tokenizer's regex (False: each segment is one piece)
    prefix_ids: tuple[int, ...] = ()  # what a call with add_special_tokens=True puts first ...
    suffix_ids: tuple[int, ...] = ()  # ... and last
    model_max_length: int = VERY_LARGE_INTEGER
    padding_side: str = "right"
    truncation_side: str = "right"
    split_special_tokens: bool = False
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FileRef:
    """A file as a cache key: equal when the contents are (a copy of a checkpoint's tokenizer.json
    elsewhere, or the one every training checkpoint writes, is parsed once)."""

    path: Path = field(compare=False)
    digest: str


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_ref(path: Path) -> _FileRef:
    resolved = path.expanduser().resolve()
    st = resolved.stat()
    stat_key = (str(resolved), st.st_size, st.st_mtime_ns)  # an edited file is hashed again
    digest = _DIGESTS.get(stat_key)
    if digest is None:
        if len(_DIGESTS) > 1024:
            _DIGESTS.clear()
        digest = _DIGESTS[stat_key] = hashlib.blake2b(resolved.read_bytes(), digest_size=16).hexdigest()
    return _FileRef(resolved, digest)


def _parse_merges(raw: Sequence[Any], source: str) -> list[tuple[str, str]]:
    """Merges as ``(left, right)`` from merges.txt lines (``"a b"``) or tokenizer.json entries
    (``"a b"`` or ``["a", "b"]``)."""
    merges = []
    for entry in raw:
        parts = entry.split(" ") if type(entry) is str else entry
        if type(parts) not in (list, tuple) or len(parts) != 2 or type(parts[0]) is not str or type(parts[1]) is not str:
            raise ValueError(f"{source}: malformed merge {entry!r} (expected two tokens)")
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=8)
def _vocab_merges_bpe(vocab: _FileRef, merges: _FileRef) -> ByteLevelBPE:
    vocab_path, merges_path = vocab.path, merges.path
    vocab = read_json(vocab_path)
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    raw = [line.rstrip("\r") for i, line in enumerate(lines) if line.strip() and not (i == 0 and line.startswith("#version"))]
    return ByteLevelBPE(vocab, _parse_merges(raw, str(merges_path)), source=str(vocab_path.parent))


@dataclass(frozen=True)
class _TokenizerJson:
    """The parts of a tokenizer.json minigpt2 reads (the vocabulary parsed once, cached)."""

    bpe: ByteLevelBPE
    model: dict[str, Any]  # the "model" entry without vocab / merges
    added_tokens: tuple[tuple[int, AddedToken], ...]
    normalizer: Any
    pre_tokenizer: Any
    post_processor: Any
    decoder: Any


@functools.lru_cache(maxsize=8)
def _tokenizer_json(ref: _FileRef) -> _TokenizerJson:
    path = ref.path
    data = read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ValueError(f"{path}: 'model' must hold a BPE 'vocab' object and a 'merges' list")
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE; minigpt2 reads byte-level BPE tokenizers")
    bpe = ByteLevelBPE(model["vocab"], _parse_merges(model["merges"], str(path)), source=str(path))
    added = []
    for i, entry in enumerate(data.get("added_tokens") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise ValueError(f"{path}: added_tokens[{i}] needs an integer 'id', got {entry!r}")
        added.append((entry["id"], AddedToken.from_json(entry, where=f"{path}: added_tokens[{i}]")))
    return _TokenizerJson(
        bpe=bpe,
        model={k: v for k, v in model.items() if k not in ("vocab", "merges")},
        added_tokens=tuple(added),
        normalizer=data.get("normalizer"),
        pre_tokenizer=data.get("pre_tokenizer"),
        post_processor=data.get("post_processor"),
        decoder=data.get("decoder"),
    )


def _byte_level_pre_tokenizer(pre: Any, source: str) -> tuple[bool, bool]:
    """(add_prefix_space, use_regex) of a tokenizer.json pre-tokenizer that must be byte-level."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or len(steps) != 1 or not isinstance(steps[0], dict) or steps[0].get("type") != "ByteLevel":
        kind = pre.get("type") if isinstance(pre, dict) else pre
        raise ValueError(
            f"{source}: pre_tokenizer {kind!r} is not GPT-2's ByteLevel pre-tokenizer; minigpt2 reads byte-level BPE tokenizers"
        )
    return bool(steps[0].get("add_prefix_space", True)), bool(steps[0].get("use_regex", True))


def _check_generic(tj: _TokenizerJson, source: str) -> None:
    """A tokenizer.json used as it is (not rebuilt as GPT-2's) must be one minigpt2 runs exactly."""
    if tj.normalizer is not None:
        kind = tj.normalizer.get("type") if isinstance(tj.normalizer, dict) else tj.normalizer
        raise ValueError(f"{source}: normalizer {kind!r} is not supported (GPT-2's tokenizer has none)")
    if tj.decoder is not None and not (isinstance(tj.decoder, dict) and tj.decoder.get("type") == "ByteLevel"):
        kind = tj.decoder.get("type") if isinstance(tj.decoder, dict) else tj.decoder
        raise ValueError(f"{source}: decoder {kind!r} is not GPT-2's ByteLevel decoder")
    m = tj.model
    unsupported = {
        "dropout": m.get("dropout") not in (None, 0, 0.0),
        "continuing_subword_prefix": m.get("continuing_subword_prefix") not in (None, ""),
        "end_of_word_suffix": m.get("end_of_word_suffix") not in (None, ""),
        "ignore_merges": bool(m.get("ignore_merges")),
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{source}: BPE {name}={m.get(name)!r} is not supported (GPT-2 uses the default)")


def _template(post: Any, source: str) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) a tokenizer.json post-processor puts around a single sequence."""
    if post is None:
        return [], []
    kind = post.get("type") if isinstance(post, dict) else None
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        prefix: list[int] = []
        suffix: list[int] = []
        for step in post.get("processors") or []:
            p, s = _template(step, source)
            prefix, suffix = p + prefix, suffix + s
        return prefix, suffix
    if kind == "TemplateProcessing":
        specials = post.get("special_tokens") or {}
        prefix, suffix, seen_sequence = [], [], False
        for item in post.get("single") or []:
            if "Sequence" in item:
                seen_sequence = True
            elif "SpecialToken" in item:
                name = item["SpecialToken"].get("id")
                entry = specials.get(name)
                if not isinstance(entry, dict) or not isinstance(entry.get("ids"), list):
                    raise ValueError(f"{source}: post_processor template uses {name!r}, which its special_tokens lack")
                (suffix if seen_sequence else prefix).extend(int(i) for i in entry["ids"])
        return prefix, suffix
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [int(post["cls"][1])], [int(post["sep"][1])]
    raise ValueError(f"{source}: post_processor {kind!r} is not supported")


def _named(value: Any, where: str) -> AddedToken | None:
    """A named special token's value (string or AddedToken dict) as a special AddedToken."""
    if value is None:
        return None
    return AddedToken.from_json({k: v for k, v in value.items() if k != "__type"} if isinstance(value, dict) else value,
                                special=True, where=where)  # fmt: skip


def _token_id(value: Any, where: str) -> int:
    try:
        idx = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: token id {value!r} is not an integer") from None
    if idx < 0:
        raise ValueError(f"{where}: token id {idx} is negative")
    return idx


def _assign_ids(bpe: ByteLevelBPE, tokens: Sequence[AddedToken], initial: Sequence[AddedToken] = ()) -> dict[int, AddedToken]:
    """Ids for added tokens, in order, as tokenizers' ``AddedVocabulary.add_tokens`` gives them:
    a token already added takes the new flags and keeps its id; one in the vocabulary takes its
    vocabulary id; any other the next id, len(vocab) or one past the largest added id."""
    by_content: dict[str, int] = {}
    decoder: dict[int, AddedToken] = {}
    vocab_size = len(bpe.vocab)
    for token in [*initial, *tokens]:
        if not token.content:
            continue
        idx = by_content.get(token.content, bpe.vocab.get(token.content))
        if idx is None:
            largest = max(decoder, default=-1)
            idx = largest + 1 if largest >= vocab_size else vocab_size
        if idx in decoder and decoder[idx].content != token.content:
            raise ValueError(f"{bpe.source}: added token {token.content!r} would take id {idx}, already {decoder[idx].content!r}")
        by_content[token.content] = idx
        decoder[idx] = token
    return decoder


def read_files(
    files: Mapping[str, Path],
    source: str,
    *,
    add_prefix_space: bool | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    added_tokens: Sequence[AddedToken] = (),
) -> TokenizerSpec:
    """Resolve a checkpoint's tokenizer files (``{file name: path}``, any of
    :data:`TOKENIZER_FILES`) into a :class:`TokenizerSpec`, as transformers 5 does (module doc).

    The keyword arguments act as transformers' ``from_pretrained`` keyword arguments do:
    ``add_prefix_space`` and ``special_tokens`` (``{"eos_token": "...", "pad_token": ...}``)
    override the files, ``added_tokens`` are added after the files' own.

    Raises:
        ValueError: no vocabulary (neither tokenizer.json nor vocab.json + merges.txt), a file that
            is not valid JSON or not the expected shape, or a tokenizer.json that is not byte-level
            BPE (another model, pre-tokenizer, normalizer or decoder), naming ``source`` and the part.
    """
    key = tuple(sorted((name, _file_ref(path)) for name, path in files.items() if name in TOKENIZER_FILES))
    overrides = tuple(sorted((special_tokens or {}).items()))
    return _read_files_cached(key, source, add_prefix_space, overrides, tuple(added_tokens))


@functools.lru_cache(maxsize=32)
def _read_files_cached(
    key: tuple[tuple[str, _FileRef], ...],
    source: str,
    add_prefix_space: bool | None,
    overrides: tuple[tuple[str, str | None], ...],
    more_tokens: tuple[AddedToken, ...],
) -> TokenizerSpec:
    keys = dict(key)
    paths = {name: ref.path for name, ref in keys.items()}
    config: dict[str, Any] = read_json(paths[CONFIG_JSON]) if CONFIG_JSON in paths else {}

    tj = _tokenizer_json(keys[TOKENIZER_JSON]) if TOKENIZER_JSON in keys else None
    if tj is not None:
        bpe = tj.bpe
    elif VOCAB_JSON in keys and MERGES_TXT in keys:
        bpe = _vocab_merges_bpe(keys[VOCAB_JSON], keys[MERGES_TXT])
    elif VOCAB_JSON in keys or MERGES_TXT in keys:  # half of the slow tokenizer's pair: name the other half
        have, missing = (VOCAB_JSON, MERGES_TXT) if VOCAB_JSON in keys else (MERGES_TXT, VOCAB_JSON)
        raise ValueError(f"{source} has {have} but no {missing}: a vocabulary needs both (or tokenizer.json)")
    else:
        have = ", ".join(sorted(keys)) or "no tokenizer file"
        raise ValueError(f"{source} has {have} but no vocabulary: it needs tokenizer.json, or vocab.json + merges.txt")

    tokenizer_class = config.get("tokenizer_class")
    rebuilt_as_gpt2 = tj is None or tokenizer_class in _GPT2_CLASSES

    # Named special tokens: the config (special_tokens_map.json overrides it when the config has
    # no added_tokens_decoder), GPT2Tokenizer's defaults for unk / bos / eos.
    init = dict(config)
    has_decoder = "added_tokens_decoder" in config
    if not has_decoder and SPECIAL_TOKENS_MAP_JSON in paths:
        init.update(read_json(paths[SPECIAL_TOKENS_MAP_JSON]))
    for name, value in overrides:
        if name not in SPECIAL_TOKEN_NAMES and not name.endswith("_token"):
            raise ValueError(f"{name!r} is not a special token name ({', '.join(SPECIAL_TOKEN_NAMES)}, or another *_token)")
        init[name] = value
    if rebuilt_as_gpt2:
        for name in ("unk_token", "bos_token", "eos_token"):
            init.setdefault(name, GPT2_DEFAULT_TOKEN)
    named: dict[str, AddedToken] = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = _named(init.get(name), f"{source}: {name}")
        if token is not None:
            named[name] = token
    for name, value in init.items():  # model-specific ones, e.g. "image_token": "<image>"
        if name.endswith("_token") and name not in SPECIAL_TOKEN_NAMES and isinstance(value, str):
            named[name] = AddedToken(value, normalized=False, special=True)
    extras_raw = init.get("extra_special_tokens") or init.get("additional_special_tokens") or []
    if isinstance(extras_raw, str):
        extras_raw = [extras_raw]
    if isinstance(extras_raw, dict):
        for name, value in extras_raw.items():
            token = _named(value, f"{source}: extra_special_tokens")
            if token is not None:
                named[str(name)] = token
        extras_raw = []
    extras = [t for t in (_named(v, f"{source}: additional_special_tokens") for v in extras_raw) if t is not None]
    special_contents = {t.content for t in named.values()} | {t.content for t in extras}

    # Added tokens, in the order transformers adds them.
    declared: dict[int, AddedToken] = {}
    if has_decoder:
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise ValueError(f"{source}: added_tokens_decoder must be an object of id -> token")
        for idx, entry in decoder.items():
            where = f"{source}: added_tokens_decoder[{idx!r}]"
            declared[_token_id(idx, where)] = AddedToken.from_json(entry, where=where)
    else:
        if ADDED_TOKENS_JSON in paths:
            for content, idx in read_json(paths[ADDED_TOKENS_JSON]).items():
                is_special = content in special_contents
                where = f"{paths[ADDED_TOKENS_JSON]}: {content!r}"
                declared[_token_id(idx, where)] = AddedToken(content, normalized=not is_special, special=is_special)
        if tj is not None:
            declared.update(dict(tj.added_tokens))
    to_add = [declared[i] for i in sorted(declared)]
    initial: list[AddedToken] = []
    if not rebuilt_as_gpt2 and tj is not None:  # tokenizer.json's own added tokens come first
        initial = [t for _, t in tj.added_tokens]
        to_add = [declared[i] for i in sorted(declared)] if has_decoder else []
    present = {t.content for t in [*initial, *to_add]}
    for token in [*named.values(), *extras]:
        if token.content not in present:
            to_add.append(token)
            present.add(token.content)
    to_add += more_tokens  # added after loading, as tokenizer.add_tokens would
    to_add = [AddedToken(**{**t.to_json(), "special": True}) if t.content in special_contents else t for t in to_add]
    added = _assign_ids(bpe, to_add, initial)

    if rebuilt_as_gpt2:
        aps = bool(config.get("add_prefix_space", False))
        use_regex = True
    else:
        assert tj is not None
        _check_generic(tj, source)
        aps, use_regex = _byte_level_pre_tokenizer(tj.pre_tokenizer, source)
    if add_prefix_space is not None:
        aps = add_prefix_space

    content_id = {t.content: i for i, t in added.items()}
    if tj is not None:
        prefix, suffix = _template(tj.post_processor, source)
    else:  # without tokenizer.json transformers builds the template from these flags
        prefix = [content_id[named["bos_token"].content]] if config.get("add_bos_token") and "bos_token" in named else []
        suffix = [content_id[named["eos_token"].content]] if config.get("add_eos_token") and "eos_token" in named else []

    def side(name: str) -> str:
        value = config.get(name, "right")
        if value not in ("left", "right"):
            raise ValueError(f"{source}: {name}={value!r} must be 'left' or 'right'")
        return value

    max_len = config.get("model_max_length", VERY_LARGE_INTEGER)
    return TokenizerSpec(
        bpe=bpe,
        added_tokens=added,
        special_tokens_map={name: t.content for name, t in named.items()},
        extra_special_tokens=tuple(t.content for t in extras),
        add_prefix_space=aps,
        use_regex=use_regex,
        prefix_ids=tuple(prefix),
        suffix_ids=tuple(suffix),
        model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len > 0 else VERY_LARGE_INTEGER,
        padding_side=side("padding_side"),
        truncation_side=side("truncation_side"),
        split_special_tokens=bool(config.get("split_special_tokens", False)),
        source=source,
    )


def find_files(directory: Path) -> dict[str, Path]:
    """The tokenizer files present in ``directory``: ``{file name: path}``."""
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def packaged_files() -> dict[str, Path]:
    """GPT-2's own tokenizer files, shipped in ``minigpt2/data``."""
    return find_files(_DATA_DIR)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _post_processor(spec: TokenizerSpec) -> dict[str, Any]:
    """A TemplateProcessing that adds ``spec``'s prefix and suffix ids (none: just the sequence,
    as transformers 5 writes for GPT-2)."""
    id_to_token = {i: t for t, i in spec.bpe.vocab.items()} | {i: t.content for i, t in spec.added_tokens.items()}

    def template(sequence: str, type_id: int) -> list[dict[str, Any]]:
        def special(i: int) -> dict[str, Any]:
            return {"SpecialToken": {"id": id_to_token[i], "type_id": type_id}}

        return [*map(special, spec.prefix_ids), {"Sequence": {"id": sequence, "type_id": type_id}}, *map(special, spec.suffix_ids)]

    used = sorted(set(spec.prefix_ids) | set(spec.suffix_ids))
    specials = {id_to_token[i]: {"id": id_to_token[i], "ids": [i], "tokens": [id_to_token[i]]} for i in used}
    return {"type": "TemplateProcessing", "single": template("A", 0), "pair": template("A", 0) + template("B", 1),
            "special_tokens": specials}  # fmt: skip


def write_files(directory: str | os.PathLike[str], spec: TokenizerSpec) -> list[Path]:
    """Write ``spec`` as tokenizer.json, tokenizer_config.json, vocab.json, merges.txt,
    special_tokens_map.json and (when some added token is not in the vocabulary)
    added_tokens.json, each through :func:`minigpt2.hub.atomic_write`; an added_tokens.json left
    by an earlier save that this one does not need is removed. Returns the paths written."""
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    bpe = spec.bpe
    added = [{"id": i, **t.to_json()} for i, t in sorted(spec.added_tokens.items())]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": spec.add_prefix_space, "trim_offsets": True,
                          "use_regex": spec.use_regex},
        "post_processor": _post_processor(spec),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": bpe.vocab, "merges": [list(m) for m in bpe.merges],
        },
    }  # fmt: skip
    config: dict[str, Any] = {"add_prefix_space": spec.add_prefix_space}
    bos, eos = spec.special_tokens_map.get("bos_token"), spec.special_tokens_map.get("eos_token")
    ids = {t.content: i for i, t in spec.added_tokens.items()}
    if bos is not None and spec.prefix_ids == (ids.get(bos),):
        config["add_bos_token"] = True  # for readers without tokenizer.json (it holds the template)
    if eos is not None and spec.suffix_ids == (ids.get(eos),):
        config["add_eos_token"] = True
    config["added_tokens_decoder"] = {str(i): t.to_json() for i, t in sorted(spec.added_tokens.items())}
    config.update(spec.special_tokens_map)
    if spec.extra_special_tokens:
        config["additional_special_tokens"] = list(spec.extra_special_tokens)
    config.update(clean_up_tokenization_spaces=False, errors="replace", model_max_length=spec.model_max_length)
    for name in ("padding_side", "truncation_side"):
        if getattr(spec, name) != "right":
            config[name] = getattr(spec, name)
    if spec.split_special_tokens:
        config["split_special_tokens"] = True
    config["tokenizer_class"] = "GPT2Tokenizer" if spec.use_regex else "PreTrainedTokenizerFast"

    special_map: dict[str, Any] = dict(spec.special_tokens_map)
    if spec.extra_special_tokens:
        special_map["additional_special_tokens"] = list(spec.extra_special_tokens)
    beyond_vocab = {t.content: i for i, t in sorted(spec.added_tokens.items()) if t.content not in bpe.vocab}

    def dump(value: Any) -> str:
        return json.dumps(value, indent=2, ensure_ascii=False) + "\n"

    files = {
        TOKENIZER_JSON: json.dumps(tokenizer_json, ensure_ascii=False),
        CONFIG_JSON: dump(config),
        VOCAB_JSON: json.dumps(bpe.vocab, ensure_ascii=False),
        MERGES_TXT: "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in bpe.merges),
        SPECIAL_TOKENS_MAP_JSON: dump(special_map),
    }
    if beyond_vocab:
        files[ADDED_TOKENS_JSON] = json.dumps(beyond_vocab, ensure_ascii=False)
    elif (out / ADDED_TOKENS_JSON).is_file():
        (out / ADDED_TOKENS_JSON).unlink()
    for name, text in files.items():
        atomic_write(out / name, text)
    return [out / name for name in files]
