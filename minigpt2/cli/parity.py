"""``minigpt2 parity``: hold a checkpoint (or another implementation) against a reference.

    minigpt2 parity --model gpt2                         # minigpt2 vs transformers, same weights
    minigpt2 parity --model gpt2 --all --grad --generate 20
    minigpt2 parity --model converted/ --reference original/     # a conversion against its source
    minigpt2 parity --model gpt2 --dtype bfloat16        # top-1 agreement against fp32
    minigpt2 parity --model gpt2 --export ref.safetensors        # write the reference file
    minigpt2 parity --against ref.safetensors --model my-port/   # no transformers needed
    minigpt2 parity --against ref.safetensors --dump theirs.safetensors   # a C / Rust / JAX port

One table, in forward order, then the verdict; exit 0 when everything passes, 1 when
something fails, 2 for usage errors. The checks themselves live in ``minigpt2.parity``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import DEFAULT_MODEL, CLIError, device_name
from .generate import _int_at_least, _positive_float

#: The input when none is given: the prompt of GPT-2's unicorn sample (Radford et al., 2019).
SAMPLE_TEXT = (
    "In a shocking finding, scientist discovered a herd of unicorns living in a remote, previously "
    "unexplored valley, in the Andes Mountains. Even more surprising to the researchers was the fact "
    "that the unicorns spoke perfect English."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="hold a checkpoint or another implementation against transformers or a reference file",
        description="Run a checkpoint in minigpt2 and in transformers (pip install \"minigpt2[parity]\") on the "
        "same input and print max |ours - reference|, max |reference|, their ratio and pass/fail for each "
        "named activation in forward order, then name the first one past the tolerance. With --against, "
        "hold a checkpoint (--model) or another implementation's dump (--dump) against a reference file "
        "written by --export (transformers is not needed). Exit 0: everything passes; 1: something fails; "
        "2: usage error.",
    )
    what = p.add_argument_group("what to check")
    what.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                      help=f"checkpoint minigpt2 runs: Hub repo id or local directory (default: {DEFAULT_MODEL})")
    what.add_argument("--reference", default=None, metavar="NAME_OR_PATH",
                      help="checkpoint transformers runs as the reference (default: the same as --model); "
                      "e.g. the original of a converted or quantised --model")
    what.add_argument("--device", default=None, type=device_name, help="cpu, cuda, cuda:N or mps, for both (default: the best available)")
    what.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="weights of the model under test; bfloat16/float16 are held against the float32 reference "
                      "by top-1 agreement and worst margin (with --dump: the precision the dump was computed in)")
    inp = p.add_argument_group("input (default: a built-in sample text)")
    inp.add_argument("--text", default=None, help="text to run")
    inp.add_argument("--file", default=None, metavar="F", help="UTF-8 text file to run ('-' for stdin)")
    inp.add_argument("--ids", default=None, metavar="IDS",
                     help="token ids to run, separated by commas or spaces (for checkpoints with their own vocabulary)")
    checks = p.add_argument_group("checks")
    checks.add_argument("--all", action="store_true",
                        help="show every activation (q, k, v, attention patterns, LayerNorms, MLP), not only "
                        "embed, each block's resid_mid / resid_post, ln_f and logits")
    checks.add_argument("--rtol", type=_positive_float, default=None, metavar="R",
                        help="tolerance of every row: max|ours - ref| <= R x max|ref| (default 1e-4; with --dtype "
                        "bfloat16/float16, per row: 4x what that dtype costs transformers' own model)")
    checks.add_argument("--generate", type=_int_at_least(1), default=None, metavar="N",
                        help="greedy-decode N tokens in both; report the first step where they differ and the "
                        "logit margin there (a near-tie is reported as one)")
    checks.add_argument("--grad", action="store_true",
                        help="also compare the loss and every parameter's gradient on the input")
    files = p.add_argument_group("reference files (docs/parity.md)")
    files.add_argument("--export", default=None, metavar="REF.safetensors",
                       help="write transformers' reference for this input: config, input ids, targets, every "
                       "activation, logits, loss and every parameter's gradient")
    files.add_argument("--against", default=None, metavar="REF.safetensors",
                       help="hold --model or --dump against this reference file instead of transformers")
    files.add_argument("--dump", default=None, metavar="THEIRS.safetensors",
                       help="with --against: another implementation's tensors (any subset of the reference's names)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.set_defaults(func=run_parity)


# ---------------------------------------------------------------------------- input
def _parse_ids(text: str) -> list[int]:
    parts = [x for x in re.split(r"[,\s]+", text.strip()) if x]
    if not parts:
        raise CLIError("--ids is empty: give token ids separated by commas or spaces", code=2)
    try:
        ids = [int(x) for x in parts]
    except ValueError:
        bad = next(x for x in parts if not re.fullmatch(r"[+-]?\d+", x))
        raise CLIError(f"--ids: {bad!r} is not an integer token id", code=2) from None
    return ids


def _read_text(args: argparse.Namespace) -> tuple[str | None, str]:
    """(text or None for --ids, where it came from); _check_usage has made sure at most one is given."""
    if args.file is not None:
        if args.file == "-":
            return sys.stdin.read(), "stdin"
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {args.file}")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if args.text is not None:
        return args.text, "--text"
    if args.ids is not None:
        return None, "--ids"
    return SAMPLE_TEXT, "the built-in sample text"


def _input_ids(args: argparse.Namespace, model: Any, tokenizer: Any, extra: int = 0):  # noqa: ANN202 - LongTensor [1, T]
    import torch

    text, source = _read_text(args)
    if text is None:
        ids = _parse_ids(args.ids)
    else:
        ids = tokenizer.encode(text)
        if not ids:
            raise CLIError(f"the text from {source} is empty: give some text", code=2)
    c = model.config
    bad = next((i for i in ids if not 0 <= i < c.vocab_size), None)
    if bad is not None:
        advice = "; pass ids it knows with --ids" if text is not None else ""
        raise ValueError(
            f"token id {bad} (from {source}) is outside this checkpoint's vocabulary [0, {c.vocab_size}){advice}"
        )
    if len(ids) + extra > c.n_positions:
        more = f" + --generate {extra}" if extra else ""
        raise ValueError(f"input of {len(ids)} tokens{more} exceeds n_positions={c.n_positions}")
    return torch.tensor([ids]), text, source


# ------------------------------------------------------------------------------ run
def _check_usage(args: argparse.Namespace) -> None:
    if args.against is not None:
        for name in ("export", "generate", "reference", "text", "file", "ids"):
            if getattr(args, name) is not None:
                why = {"export": "the reference already exists", "generate": "generation needs transformers",
                       "reference": "the file is the reference"}.get(name, "the input comes from the reference file")
                raise CLIError(f"--{name} cannot be used with --against ({why})", code=2)
        if (args.model is None) == (args.dump is None):
            raise CLIError("--against needs exactly one of --model NAME_OR_PATH or --dump THEIRS.safetensors", code=2)
    elif args.dump is not None:
        raise CLIError("--dump needs --against REF.safetensors (the reference to hold it against)", code=2)
    given = [name for name in ("text", "file", "ids") if getattr(args, name) is not None]
    if len(given) > 1:  # a usage error, found before the checkpoint is loaded
        raise CLIError(f"give one input: --{given[0]} or --{given[1]}, not both", code=2)
    if args.export is not None:  # before minutes of work, not after
        out = Path(args.export).expanduser()
        if out.is_dir():
            raise ValueError(f"--export {args.export} is a directory: give a file name, e.g. {out / 'ref.safetensors'}")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"directory for --export not found: {out.parent}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or routine warnings from transformers on our terminal for the
    duration; anything they would have said that matters is in the report (e.g. an untied
    head). Its logging settings are restored after."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def run_parity(args: argparse.Namespace) -> int:
    from ..parity.capture import require_transformers

    _check_usage(args)
    if args.against is None:
        require_transformers("minigpt2 parity")  # before any loading: one line, what to install
        with _quiet_transformers():
            report, extra = _against_transformers(args)
    else:
        report, extra = _against_file(args)
    if args.json:
        print(json.dumps({**report.to_dict(), **{k: v for k, v in extra.items() if not k.startswith("_")}}, indent=2))
    else:
        print(report.table(decode=extra.pop("_decode", None)))
        for key, value in extra.items():
            if not key.startswith("_"):
                print(f"{key}: {value}")
    return 0 if report.passed else 1


def _load(args: argparse.Namespace, name: str):  # noqa: ANN202 - (GPT2, Tokenizer)
    from ..model import GPT2
    from ..tokenizer import Tokenizer

    model = GPT2.from_pretrained(name, device=args.device, dtype=args.dtype)
    return model, Tokenizer.from_pretrained(name)


def _decoder(tokenizer: Any):  # noqa: ANN202
    def decode(token: int) -> str:
        try:
            return tokenizer.decode([token])
        except (ValueError, KeyError):
            return "?"

    return decode


def _against_transformers(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from ..parity import compare_to_transformers

    name = args.model or DEFAULT_MODEL
    model, tokenizer = _load(args, name)
    ids, text, source = _input_ids(args, model, tokenizer, extra=args.generate or 0)
    report = compare_to_transformers(
        model, ids, reference=args.reference or name, all_activations=args.all, rtol=args.rtol,
        grad=args.grad, generate=args.generate or 0, export=args.export, text=text,
    )
    report.notes.insert(0, f"input: {source}")
    if args.reference is None:
        report.notes.append(
            "both libraries ran the same checkpoint: this checks minigpt2's loading and computation, not the "
            "weights; hold a converted checkpoint against its original with --reference ORIGINAL or --against REF")
    extra: dict[str, Any] = {"_decode": _decoder(tokenizer)}
    if args.export:
        path = Path(args.export).expanduser()
        extra["exported"] = f"{path} ({path.stat().st_size / 1e6:.1f} MB)"
    return report, extra


def _against_file(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    import torch

    from ..parity import compare_to_reference

    extra: dict[str, Any] = {}
    if args.model is not None:
        model, tokenizer = _load(args, args.model)
        extra["_decode"] = _decoder(tokenizer)
        report = compare_to_reference(args.against, model=model, all_activations=args.all, rtol=args.rtol, grad=args.grad)
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        report = compare_to_reference(args.against, dump=args.dump, all_activations=args.all, rtol=args.rtol,
                                      grad=args.grad, dtype=dtype)
    return report, extra
