"""``minigpt2 generate`` and ``minigpt2 compare``: sample text from a checkpoint.

    minigpt2 generate "The meaning of life is" --max-new-tokens 40 --seed 0
    minigpt2 generate "" --num-samples 3             # unconditional samples
    minigpt2 generate "Hello" --greedy               # argmax decoding
    minigpt2 compare "The meaning of life is"        # greedy vs temperature vs top-k vs top-p

The CLI samples by default (temperature 1.0, top-k 50, top-p off: transformers'
defaults for ``do_sample=True``), as most GPT-2 demos do; ``--greedy`` decodes by
argmax. Text streams to stdout as it is made: the prompt, then the continuation.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

from . import CLIError, add_model_args, load_model_and_tokenizer

SEPARATOR = "-" * 40


# --------------------------------------------------------------------------- value checks
def _positive_float(text: str) -> float:
    x = _float(text)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def _probability(text: str) -> float:
    x = _float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return x


def _float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return x


def _int_at_least(low: int):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if x < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return x

    parse.__name__ = f"integer >= {low}"
    return parse


# --------------------------------------------------------------------------- register
def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt (streams to stdout)",
        description="Continue PROMPT with a GPT-2 checkpoint, streaming the text as it is made. "
        "Samples by default (temperature 1.0, top-k 50, as transformers' do_sample=True); "
        "--greedy takes the most likely token instead. An empty PROMPT starts from "
        "<|endoftext|> (unconditional samples).",
    )
    p.add_argument("prompt", nargs="?", default="", metavar="PROMPT", help="text to continue (default: empty)")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=50, metavar="N", help="tokens to add (default: 50)")
    _add_sampling_args(p)
    p.add_argument("--repetition-penalty", type=_positive_float, default=1.0, metavar="R",
                   help="> 1 discourages repeating tokens (default: 1.0, off)")
    p.add_argument("--no-repeat-ngram-size", type=_int_at_least(0), default=0, metavar="N",
                   help="forbid any N-gram twice (default: 0, off)")
    p.add_argument("--num-beams", type=_int_at_least(1), default=1, metavar="B",
                   help="beam search with B beams (implies --greedy; printed when done, not streamed)")
    p.add_argument("--greedy", action="store_true", help="take the most likely token (no sampling)")
    p.add_argument("--num-samples", type=_int_at_least(1), default=1, metavar="N", help="samples to print (default: 1)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a sample once its text contains TEXT (repeatable)")
    p.set_defaults(func=run_generate)

    c = sub.add_parser(
        "compare",
        help="one prompt under greedy, temperature, top-k and top-p decoding",
        description="The classic side-by-side of decoding strategies on one prompt: greedy; "
        "temperature 0.5 / 1.0 / 1.5 (top-k and top-p off); top-k 1 / 50 / 500; top-p 0.95 / "
        "0.75 / 0.5 (top-k off). Every sampled output starts from the same seed.",
    )
    c.add_argument("prompt", nargs="?", default="", metavar="PROMPT", help="text to continue (default: empty)")
    add_model_args(c)
    c.add_argument("--max-new-tokens", type=_int_at_least(0), default=40, metavar="N", help="tokens per output (default: 40)")
    c.add_argument("--seed", type=int, default=None, help="seed for every sampled output (default: random, printed)")
    c.set_defaults(func=run_compare)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_positive_float, default=1.0, metavar="T",
                   help="divide the logits by T before sampling (default: 1.0)")
    p.add_argument("--top-k", type=_int_at_least(0), default=50, metavar="K",
                   help="sample from the K most likely tokens; 0 = off (default: 50)")
    p.add_argument("--top-p", type=_probability, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens with probability >= P (default: 1.0, off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")


# --------------------------------------------------------------------------- commands
def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt is <|endoftext|>, GPT-2's start of a document."""
    return tokenizer.encode(prompt) if prompt else [tokenizer.eos_token_id]


def _setup_stdout() -> None:
    # A terminal that cannot show a character gets "?" rather than a crash mid-stream.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def _print_stream(model: Any, tokenizer: Any, prompt: str, ids: list[int], **kwargs: Any) -> None:
    """Write the prompt, then the continuation chunk by chunk as tokens are made."""
    from ..generation import stream

    sys.stdout.write(prompt)
    sys.stdout.flush()
    for step in stream(model, tokenizer, ids, **kwargs):
        if step.text:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _check_length(model: Any, ids: list[int], max_new_tokens: int) -> None:
    n = model.config.n_positions
    if len(ids) + max_new_tokens > n:
        raise CLIError(
            f"prompt of {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"n_positions={n}; shorten the prompt or lower --max-new-tokens",
            code=2,
        )


def run_generate(args: argparse.Namespace) -> int:
    import torch

    _setup_stdout()
    model, tokenizer = load_model_and_tokenizer(args)
    ids = _prompt_ids(tokenizer, args.prompt)
    _check_length(model, ids, args.max_new_tokens)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    else:
        torch.seed()  # torch starts every process from the same seed: draw a fresh one
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy and args.num_beams == 1,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"{SEPARATOR} sample {i + 1}/{args.num_samples}", flush=True)
        if args.num_beams > 1:  # the best beam is only known at the end: print it whole
            out = model.generate([ids], num_beams=args.num_beams, stop=args.stop, tokenizer=tokenizer, **kwargs)
            print(args.prompt + tokenizer.decode(_strip_eos(out[0, len(ids):].tolist(), tokenizer)), flush=True)
        else:
            _print_stream(model, tokenizer, args.prompt, ids, stop=args.stop, **kwargs)
    return 0


def _strip_eos(new: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


# The classic comparison (as in "How to generate text", von Platen 2020): one knob at a time.
COMPARE_SECTIONS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Greedy", [dict(do_sample=False)]),
    ("Temperature (top-k and top-p off)", [dict(do_sample=True, temperature=t, top_k=0, top_p=1.0) for t in (0.5, 1.0, 1.5)]),
    ("Top-k (temperature 1.0)", [dict(do_sample=True, temperature=1.0, top_k=k, top_p=1.0) for k in (1, 50, 500)]),
    ("Top-p (top-k off, temperature 1.0)", [dict(do_sample=True, temperature=1.0, top_k=0, top_p=p) for p in (0.95, 0.75, 0.5)]),
]


def _describe(settings: dict[str, Any]) -> str:
    if not settings["do_sample"]:
        return "do_sample=False (argmax at every step)"
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "do_sample") + ", do_sample=True"


def run_compare(args: argparse.Namespace) -> int:
    import torch

    _setup_stdout()
    model, tokenizer = load_model_and_tokenizer(args)
    ids = _prompt_ids(tokenizer, args.prompt)
    _check_length(model, ids, args.max_new_tokens)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"prompt: {args.prompt!r}   model: {args.model}   max_new_tokens: {args.max_new_tokens}   seed: {seed}")
    for title, runs in COMPARE_SECTIONS:
        print(f"\n=== {title} ===", flush=True)
        for settings in runs:
            print(f"--- {_describe(settings)}", flush=True)
            torch.manual_seed(seed)  # every output starts from the same seed: only the knob differs
            _print_stream(model, tokenizer, args.prompt, ids, max_new_tokens=args.max_new_tokens, **settings)
    return 0
