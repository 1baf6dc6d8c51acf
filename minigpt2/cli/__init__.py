"""The ``minigpt2`` command line: ``minigpt2 COMMAND ...`` (also ``python -m minigpt2``).

Each command lives in its own module of this package and contributes a ``register(sub)``
function that adds its subparser(s) and sets ``func``. Errors are one line on stderr,
``minigpt2: error: ...``: exit 2 for usage errors (argparse's own convention), 1 for the
rest; never a traceback. Warnings are one line too (``minigpt2: warning: ...``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from collections.abc import Sequence

# The command modules, in the order their commands appear in --help.
COMMAND_MODULES = ("generate", "inspect", "train", "parity", "explore", "serve")

DEFAULT_MODEL = "gpt2"


class CLIError(Exception):
    """A problem to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message, exit 2
        raise CLIError(message, code=2)


def device_name(text: str) -> str:
    """argparse type of --device: cpu, cuda, cuda:N or mps, as written (a typo is a usage error,
    exit 2; a device this machine lacks is found when the model loads, exit 1)."""
    if re.fullmatch(r"cpu|mps|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda, cuda:N or mps")
    return text


def add_model_args(p: argparse.ArgumentParser, *, dtype: bool = True, model_required: bool = False) -> None:
    """--model, --device (and --dtype): every command takes the checkpoint the same way
    (``model_required``: no default, for a command that should not quietly serve gpt2)."""
    if model_required:
        p.add_argument("--model", required=True, metavar="NAME_OR_PATH", help="Hub repo id or local checkpoint directory")
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                       help=f"Hub repo id or local checkpoint directory (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, type=device_name, help="cpu, cuda, cuda:N or mps (default: the best available)")
    if dtype:
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weight dtype (default: float32)")


def load_model_and_tokenizer(args: argparse.Namespace):  # noqa: ANN201 - (GPT2, Tokenizer)
    """The model and tokenizer named by --model / --device / --dtype (and --compile where a
    command has it)."""
    from .. import kernels
    from ..model import GPT2
    from ..tokenizer import Tokenizer

    try:  # a bad MINIGPT2_KERNEL: say so now, not after the prompt was printed
        kernels.forced()
    except ValueError as e:
        raise CLIError(str(e), code=2) from None
    model = GPT2.from_pretrained(args.model, device=args.device, dtype=getattr(args, "dtype", None),
                                 compile=getattr(args, "compile", False))  # fmt: skip
    return model, Tokenizer.from_pretrained(args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minigpt2", description="GPT-2 from scratch in plain PyTorch.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"minigpt2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:  # a command module not (yet) present in this tree
            if e.name != f"{__name__}.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings (a checkpoint without tokenizer files, ...) as one line, like errors."""
    print(f"minigpt2: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn every error into one line and an exit code."""
    parser = build_parser()
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.showwarning = _show_warning
            args = parser.parse_args(argv)
            return int(args.func(args) or 0)
    except BrokenPipeError:  # `minigpt2 generate ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("minigpt2: interrupted", file=sys.stderr)
        return 130
    except CLIError as e:
        print(f"minigpt2: error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError) as e:
        print(f"minigpt2: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
