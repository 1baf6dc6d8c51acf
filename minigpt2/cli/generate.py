"""``minigpt2 generate`` and ``minigpt2 compare``: sample text from a checkpoint.

    minigpt2 generate "The meaning of life is" --max-new-tokens 40 --seed 0
    minigpt2 generate "" --num-samples 3             # unconditional samples
    minigpt2 generate "Hello" --greedy               # argmax decoding
    minigpt2 generate "Hello" --min-p 0.05 --bad-words " world" --logprobs 3
    minigpt2 generate "Hello" --model gpt2-xl --assistant gpt2 --greedy   # assisted decoding
    minigpt2 compare "The meaning of life is"        # greedy vs temperature, top-k, top-p, min-p, typical-p

The CLI samples by default, as most GPT-2 demos do; ``--greedy`` decodes by argmax. A
setting not given on the command line comes from the checkpoint's generation config, else
from transformers' defaults (temperature 1.0, top-k 50, top-p off). Text streams to stdout
as it is made: the prompt, then the continuation (with ``--logprobs K``: one line per token).
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
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return x


def _probability(text: str) -> float:
    x = _float(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return x


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _unit_float(text: str) -> float:
    x = _float(text)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return x


def _open_unit_float(text: str) -> float:
    x = _float(text)
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
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
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=None, metavar="N",
                   help="tokens to add (default: the checkpoint's generation config, else 50)")
    _add_sampling_args(p)
    p.add_argument("--min-p", type=_unit_float, default=None, metavar="P",
                   help="drop tokens less likely than P x the most likely one (min-p sampling; 0.05 is typical)")
    p.add_argument("--typical-p", type=_probability, default=None, metavar="P",
                   help="locally typical sampling: keep the most typical tokens up to probability mass P")
    p.add_argument("--epsilon-cutoff", type=_open_unit_float, default=None, metavar="E",
                   help="drop tokens with probability below E (epsilon sampling; 3e-4 to 9e-4 in the paper)")
    p.add_argument("--eta-cutoff", type=_open_unit_float, default=None, metavar="E",
                   help="eta sampling: drop tokens below min(E, sqrt(E) exp(-entropy))")
    p.add_argument("--repetition-penalty", type=_positive_float, default=None, metavar="R",
                   help="> 1 discourages repeating tokens (default: 1.0, off)")
    p.add_argument("--no-repeat-ngram-size", type=_int_at_least(0), default=None, metavar="N",
                   help="forbid any N-gram twice (default: 0, off)")
    p.add_argument("--bad-words", action="append", default=None, metavar="TEXT", type=_non_empty,
                   help="never generate TEXT, as written or after a space (repeatable)")
    p.add_argument("--num-beams", type=_int_at_least(1), default=1, metavar="B",
                   help="beam search with B beams (implies --greedy; printed when done, not streamed)")
    p.add_argument("--greedy", action="store_true", help="take the most likely token (no sampling)")
    p.add_argument("--num-samples", type=_int_at_least(1), default=1, metavar="N", help="samples to print (default: 1)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", type=_non_empty,
                   help="end a sample once its text contains TEXT (repeatable)")
    p.add_argument("--assistant", default=None, metavar="NAME_OR_PATH",
                   help="assisted decoding: a smaller GPT-2 with the same tokenizer drafts tokens the model checks "
                        "(the same greedy output, the same sampling distribution, faster)")
    p.add_argument("--num-assistant-tokens", type=_int_at_least(1), default=None, metavar="N",
                   help="draft tokens per round with --assistant (default: 20, cut short when the draft is unsure)")
    p.add_argument("--prompt-lookup", type=_int_at_least(1), default=None, metavar="N",
                   help="assisted decoding without a second model: draft N tokens from n-grams of the text so far")
    p.add_argument("--logprobs", type=_int_at_least(0), default=None, metavar="K",
                   help="print each new token with its log-probability (the model's raw distribution) and the K "
                        "most likely alternatives, one line per token")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step (torch.compile; CUDA graphs on a GPU, several times "
                        "faster there; on a CPU about as fast as without): the first token waits for the "
                        "compilation, tens of seconds")
    p.set_defaults(func=run_generate)

    c = sub.add_parser(
        "compare",
        help="one prompt under greedy, temperature, top-k, top-p, min-p and typical-p decoding",
        description="The classic side-by-side of decoding strategies on one prompt: greedy; "
        "temperature 0.5 / 1.0 / 1.5 (top-k and top-p off); top-k 1 / 50 / 500; top-p 0.95 / "
        "0.75 / 0.5 (top-k off); min-p 0.02 / 0.1 / 0.3 (top-k off); typical-p 0.95 / 0.5 / 0.2 "
        "(top-k off). Every sampled output starts from the same seed.",
    )
    c.add_argument("prompt", nargs="?", default="", metavar="PROMPT", help="text to continue (default: empty)")
    add_model_args(c)
    c.add_argument("--max-new-tokens", type=_int_at_least(1), default=40, metavar="N", help="tokens per output (default: 40)")
    c.add_argument("--seed", type=int, default=None, help="seed for every sampled output (default: random, printed)")
    c.set_defaults(func=run_compare)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_positive_float, default=None, metavar="T",
                   help="divide the logits by T before sampling (default: 1.0)")
    p.add_argument("--top-k", type=_int_at_least(0), default=None, metavar="K",
                   help="sample from the K most likely tokens; 0 = off (default: 50)")
    p.add_argument("--top-p", type=_probability, default=None, metavar="P",
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


def _check_length(model: Any, ids: list[int], max_new_tokens: int | None) -> None:
    n = model.config.n_positions
    if max_new_tokens is not None and len(ids) + max_new_tokens > n:
        raise CLIError(
            f"prompt of {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"n_positions={n}; shorten the prompt or lower --max-new-tokens",
            code=2,
        )


def run_generate(args: argparse.Namespace) -> int:
    import torch

    _setup_stdout()
    if args.assistant is not None and args.prompt_lookup is not None:
        raise CLIError("--assistant and --prompt-lookup are two sources of drafts: give one", code=2)
    if args.num_beams > 1 and (args.assistant is not None or args.prompt_lookup is not None):
        raise CLIError("assisted decoding (--assistant, --prompt-lookup) works with greedy search and sampling, "
                       "not --num-beams", code=2)
    if args.num_beams > 1 and args.logprobs is not None:
        raise CLIError("--logprobs streams token by token; beam search cannot (drop --num-beams)", code=2)
    if args.compile and (args.assistant is not None or args.prompt_lookup is not None):
        # Assisted decoding checks several drafts per forward: the one-token step --compile
        # compiles would hardly run, so the flag would be silently ignored.
        raise CLIError("--compile compiles the one-token step, which assisted decoding (--assistant, "
                       "--prompt-lookup) does not use: give one or the other", code=2)
    _check_flag_combinations(args)
    model, tokenizer = load_model_and_tokenizer(args)
    ids = _prompt_ids(tokenizer, args.prompt)
    kwargs = _generation_kwargs(args, model, tokenizer)
    _check_length(model, ids, kwargs.get("max_new_tokens"))
    if args.assistant is not None:
        kwargs["assistant_model"] = _load_assistant(args, model)
    _check_settings_before_output(model, tokenizer, ids, args, kwargs)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    else:
        torch.seed()  # torch starts every process from the same seed: draw a fresh one
    if args.num_beams > 1:  # the best beams are only known at the end: print them whole
        out = model.generate([ids], num_beams=args.num_beams, num_return_sequences=args.num_samples, stop=args.stop,
                             tokenizer=tokenizer, **kwargs)
        for i, row in enumerate(out):
            if args.num_samples > 1:
                print(f"{SEPARATOR} beam {i + 1}/{args.num_samples}", flush=True)
            print(args.prompt + tokenizer.decode(_strip_eos(row[len(ids):].tolist(), tokenizer)), flush=True)
        return 0
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"{SEPARATOR} sample {i + 1}/{args.num_samples}", flush=True)
        if args.logprobs is not None:
            _print_logprobs(model, tokenizer, args.prompt, ids, args.logprobs, stop=args.stop, **kwargs)
        else:
            _print_stream(model, tokenizer, args.prompt, ids, stop=args.stop, **kwargs)
    return 0


_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _check_flag_combinations(args: argparse.Namespace) -> None:
    """Flags that would be silently ignored, or repeat one output, are usage errors (exit 2)."""
    if args.num_assistant_tokens is not None and args.assistant is None:
        raise CLIError("--num-assistant-tokens sets how many tokens --assistant drafts; give --assistant too", code=2)
    deterministic = "--greedy" if args.greedy else f"--num-beams {args.num_beams}" if args.num_beams > 1 else None
    if deterministic is not None:
        given = [f"--{f.replace('_', '-')}" for f in _SAMPLING_FLAGS if getattr(args, f) is not None]
        if given:
            raise CLIError(f"{', '.join(given)} only change{'s' if len(given) == 1 else ''} sampling, which "
                           f"{deterministic} turns off; drop "
                           f"{'it' if len(given) == 1 else 'them'} or {deterministic}", code=2)
    if args.greedy and args.num_samples > 1:
        raise CLIError(f"--num-samples {args.num_samples} with --greedy would print one text {args.num_samples} "
                       "times (greedy search is deterministic); drop --greedy to sample, or use --num-beams", code=2)
    if args.num_beams > 1 and args.num_samples > args.num_beams:
        raise CLIError(f"--num-samples {args.num_samples} prints the best beams, so it must be <= --num-beams "
                       f"{args.num_beams}", code=2)


def _check_settings_before_output(model: Any, tokenizer: Any, ids: list[int], args: argparse.Namespace,
                                  kwargs: dict[str, Any]) -> None:
    """What generate / stream will check (the checkpoint's generation_config.json, the prompt's
    ids against the vocabulary, every setting), checked before the prompt is echoed."""
    from ..generation import _check_prompt, _check_settings, resolve_generation_config

    call = {k: v for k, v in kwargs.items() if k != "assistant_model"}
    if args.stop:
        call["stop_strings"] = args.stop
    if args.num_beams > 1:
        call.update(num_beams=args.num_beams, num_return_sequences=args.num_samples)
    assistant = kwargs.get("assistant_model")
    gc, default_max_length = resolve_generation_config(model, None, call, assistant)
    prompt, _ = _check_prompt(model, [ids], None, gc.bos_token_id)
    _check_settings(model, gc, prompt.shape[1], default_max_length, tokenizer=tokenizer, generator=None,
                    assistant_model=assistant)


def _generation_kwargs(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    """The generate arguments the command line sets; the rest come from the checkpoint's
    generation config (else transformers' defaults)."""
    kwargs: dict[str, Any] = {"do_sample": not args.greedy and args.num_beams == 1}
    gc = model.generation_config
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    elif gc.max_new_tokens is None and gc.max_length is None:
        kwargs["max_new_tokens"] = 50  # the CLI's default when the checkpoint sets no length
    for flag, name in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                       ("typical_p", "typical_p"), ("epsilon_cutoff", "epsilon_cutoff"), ("eta_cutoff", "eta_cutoff"),
                       ("repetition_penalty", "repetition_penalty"), ("no_repeat_ngram_size", "no_repeat_ngram_size"),
                       ("num_assistant_tokens", "num_assistant_tokens"), ("prompt_lookup", "prompt_lookup_num_tokens")):
        value = getattr(args, flag)
        if value is not None:
            kwargs[name] = value
    if args.bad_words:
        kwargs["bad_words_ids"] = _bad_words_ids(tokenizer, args.bad_words)
    return kwargs


def _bad_words_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Each TEXT as token ids, as written and after a space (GPT-2 tokenizes a word inside a
    sentence with its leading space: " world" is one token, "world" another)."""
    out: list[list[int]] = []
    for w in words:
        for variant in (w, " " + w.lstrip(" ")):
            ids = tokenizer.encode(variant)
            if ids not in out:
                out.append(ids)
    return out


def _load_assistant(args: argparse.Namespace, model: Any) -> Any:
    from ..model import GPT2

    assistant = GPT2.from_pretrained(args.assistant, device=model.device, dtype=getattr(args, "dtype", None))
    if assistant.config.vocab_size != model.config.vocab_size:
        raise CLIError(
            f"--assistant {args.assistant} has vocab_size={assistant.config.vocab_size}, the model "
            f"{model.config.vocab_size}: the assistant must share the model's tokenizer"
        )
    return assistant


def _print_logprobs(model: Any, tokenizer: Any, prompt: str, ids: list[int], k: int, **kwargs: Any) -> None:
    """The prompt, then one line per new token: its text, log-probability and the k most likely
    alternatives (of the model's raw distribution), then the prompt and continuation as text."""
    from ..generation import stream

    print(prompt, flush=True)
    new: list[int] = []
    for step in stream(model, tokenizer, ids, logprobs=k, **kwargs):
        new.append(step.token)
        line = f"{_token_text(tokenizer, step.token)!r:<20} {float(step.logprobs[0]):8.3f}"
        if k:
            alternatives = ", ".join(f"{_token_text(tokenizer, int(t))!r} {float(lp):.3f}"
                                     for t, lp in zip(step.top_ids[0], step.top_logprobs[0]))
            line += f"   [{alternatives}]"
        print(line, flush=True)
    print(f"{SEPARATOR}\n{prompt}{tokenizer.decode(_strip_eos(new, tokenizer))}", flush=True)


def _token_text(tokenizer: Any, token: int) -> str:
    try:
        return tokenizer.decode([token])
    except ValueError:  # an id the model has but the tokenizer lacks (a padded vocabulary)
        return f"<id {token}>"


def _strip_eos(new: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


# The classic comparison (as in "How to generate text", von Platen 2020): one knob at a time,
# every other one off (whatever the checkpoint's generation config says).
NEUTRAL: dict[str, Any] = dict(top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, top_h=None,
                               repetition_penalty=1.0, no_repeat_ngram_size=0)
COMPARE_SECTIONS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Greedy", [dict(do_sample=False)]),
    ("Temperature (top-k and top-p off)", [dict(do_sample=True, temperature=t, top_k=0, top_p=1.0) for t in (0.5, 1.0, 1.5)]),
    ("Top-k (temperature 1.0)", [dict(do_sample=True, temperature=1.0, top_k=k, top_p=1.0) for k in (1, 50, 500)]),
    ("Top-p (top-k off, temperature 1.0)", [dict(do_sample=True, temperature=1.0, top_k=0, top_p=p) for p in (0.95, 0.75, 0.5)]),
    ("Min-p (top-k off, temperature 1.0)", [dict(do_sample=True, temperature=1.0, top_k=0, min_p=p) for p in (0.02, 0.1, 0.3)]),
    ("Typical-p (top-k off, temperature 1.0)",
     [dict(do_sample=True, temperature=1.0, top_k=0, typical_p=p) for p in (0.95, 0.5, 0.2)]),
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
            _print_stream(model, tokenizer, args.prompt, ids, max_new_tokens=args.max_new_tokens, **{**NEUTRAL, **settings})
    return 0
