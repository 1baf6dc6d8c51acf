"""``minigpt2 inspect | lens | attention | score``: GPT-2's internals from the terminal.

- ``inspect``: the module tree, parameter table and config (``--explain``: what each part
  does and the shapes between them). It needs only the checkpoint's config.json, never its
  weights; an official name (gpt2, gpt2-medium, ...) works offline from the packaged presets.
- ``lens``: the logit lens as a table, layers x positions.
- ``attention``: a heatmap of one head's (or one layer's) attention pattern, as a PNG.
- ``score``: per-token log-probs and perplexity of a text.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..hub import HubRepo, local_dir
from . import DEFAULT_MODEL, CLIError, add_model_args, load_model_and_tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="show the module tree, parameter counts and config of a checkpoint",
        description="Show a checkpoint's module tree (as transformers prints it), its parameters per "
        "component and its config. Reads only config.json: no weights are loaded.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                   help=f"Hub repo id or local checkpoint directory (default: {DEFAULT_MODEL})")
    p.add_argument("--explain", action="store_true",
                   help="annotate every part in plain words, with the shapes that flow between them")
    p.set_defaults(func=run_inspect)

    p = sub.add_parser(
        "lens", help="logit lens: what each layer would predict next, at each position",
        description="Apply the final LayerNorm and the unembedding to the residual stream after the "
        "embeddings and after every block, and show the top next token and its probability.",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the text to run")
    add_model_args(p)
    p.set_defaults(func=run_lens)

    p = sub.add_parser(
        "attention", help="save a heatmap of attention weights (needs matplotlib: pip install minigpt2[viz])",
        description="Draw the attention pattern of one head, or of every head of a layer as a grid, "
        "with the prompt's tokens as tick labels.",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the text to run")
    add_model_args(p)
    p.add_argument("--layer", type=int, required=True, help="block index, 0 .. n_layer-1")
    p.add_argument("--head", type=int, default=None, help="head index, 0 .. n_head-1 (default: all heads, as a grid)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="image file to write")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="image size in pixels (default: 800x800 for one head, 1200x1200 for a grid)")
    p.set_defaults(func=run_attention)

    p = sub.add_parser(
        "score", help="per-token log-probs and perplexity of a text",
        description="Score a text: the log-probability of each token given those before it, the total "
        "negative log-likelihood and the perplexity. Texts longer than the model's n_positions are "
        "read through sliding windows. The last line is `perplexity: <value>`.",
    )
    p.add_argument("text", nargs="?", metavar="TEXT", help="the text to score (or use --file)")
    p.add_argument("--file", metavar="F", help="read the text from a UTF-8 file ('-' for stdin)")
    add_model_args(p)
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window step for long texts, 1 .. n_positions (default: n_positions // 2)")
    p.add_argument("--json", action="store_true",
                   help='print {"tokens", "logprobs", "nll", "perplexity"} as JSON instead')
    p.set_defaults(func=run_score)


# -------------------------------------------------------------------------- inspect
def _config_for(name: str):  # noqa: ANN202 - (GPT2Config, note)
    """The config of a checkpoint (and where it came from), without reading its weights.

    A local directory: its config.json. An official name (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl, distilgpt2, also with their Hub organisation): the Hub cache if it holds the
    config, else the packaged preset, so no network is needed. Any other name: the Hub.
    """
    from ..config import GPT2Config, is_official

    path = local_dir(name)
    if path is not None:
        return GPT2Config.from_json_file(path / "config.json"), f"read {path / 'config.json'}"
    official = is_official(name)
    # An official name never waits for the network: the packaged preset answers instead.
    repo = HubRepo(name, local_only=True if official else None, what="the config of")
    try:
        config_file = repo.file("config.json")
    except ValueError:
        if not official:
            raise
        config_file = None
    if config_file is None:
        if official:
            preset = name.split("/")[-1]
            return GPT2Config.from_preset(preset), f"packaged {preset} preset: inspect needs no download"
        raise repo.error()
    return GPT2Config.from_json_file(config_file), f"config.json of Hub repo {name}"


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from ..internals import describe
    from ..model import GPT2

    config, source = _config_for(args.model)
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = GPT2(config)
    print(f"{args.model}: GPT-2, {config.n_layer} layers, {config.n_head} heads, n_embd={config.n_embd}")
    print(f"config: {source}; weights are not read")
    print()
    print(describe(model, explain=args.explain))
    return 0


# ----------------------------------------------------------------------------- lens
def _encode_prompt(tokenizer, model, prompt: str):  # noqa: ANN001, ANN202 - LongTensor [1, T]
    import torch

    ids = tokenizer.encode(prompt)
    if not ids:
        raise CLIError("the prompt is empty: give some text", code=2)
    n = model.config.n_positions
    if len(ids) > n:  # a value the user typed: a usage error, as generate's --max-new-tokens check
        raise CLIError(f"prompt of {len(ids)} tokens exceeds n_positions={n}; shorten it", code=2)
    return torch.tensor([ids], device=model.device)


def run_lens(args: argparse.Namespace) -> int:
    from ..internals import logit_lens

    model, tokenizer = load_model_and_tokenizer(args)
    ids = _encode_prompt(tokenizer, model, args.prompt)
    lens = logit_lens(model, ids, k=1)
    print("logit lens: top next token and its probability from each layer's residual stream")
    print("(ln_f and the unembedding applied early; the last row is the model's own prediction)")
    print(lens.table(tokenizer))
    return 0


# ------------------------------------------------------------------------ attention
def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise CLIError(f"--size {text!r} must look like WIDTHxHEIGHT, e.g. 800x600", code=2)
    w, h = int(m.group(1)), int(m.group(2))
    if not (50 <= w <= 20000 and 50 <= h <= 20000):
        raise CLIError(f"--size {w}x{h}: each side must be between 50 and 20000 pixels", code=2)
    return w, h


def run_attention(args: argparse.Namespace) -> int:
    from .. import plots

    plots._figure_class()  # fail early, before loading a model, if matplotlib is missing
    size = _parse_size(args.size) if args.size else ((800, 800) if args.head is not None else (1200, 1200))
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory for --out not found: {out.parent}")
    model, tokenizer = load_model_and_tokenizer(args)
    L, H = model.config.n_layer, model.config.n_head
    if not 0 <= args.layer < L:
        raise CLIError(f"--layer {args.layer} is out of range: this model has layers 0 .. {L - 1}", code=2)
    if args.head is not None and not 0 <= args.head < H:
        raise CLIError(f"--head {args.head} is out of range: this model has heads 0 .. {H - 1}", code=2)
    ids = _encode_prompt(tokenizer, model, args.prompt)
    _, acts = model.run_with_cache(ids, names=[f"h.{args.layer}.attn.pattern"])
    pattern = acts[f"h.{args.layer}.attn.pattern"][0]  # (nh, T, T)
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    if args.head is not None:
        pattern, title = pattern[args.head], f"layer {args.layer}, head {args.head}"
    else:
        title = f"layer {args.layer}, all {H} heads"
    plots.plot_attention(pattern, tokens, out, size=size, title=title)
    print(f"wrote {out} ({size[0]}x{size[1]}, {title}, {len(tokens)} tokens)")
    return 0


# ---------------------------------------------------------------------------- score
def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None and args.file is not None:
        raise CLIError("give TEXT or --file, not both", code=2)
    if args.text is None and args.file is None:
        raise CLIError("give the text to score: TEXT or --file F", code=2)
    if args.text is not None:
        return args.text
    if args.file == "-":
        return sys.stdin.read()
    path = Path(args.file).expanduser()
    if path.is_dir():
        raise CLIError(f"--file {args.file} is a directory; give a text file (or - for stdin)", code=2)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {args.file}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.file} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def run_score(args: argparse.Namespace) -> int:
    from ..internals import quote_token, score

    if args.stride is not None and args.stride < 1:
        raise CLIError(f"--stride {args.stride} must be at least 1", code=2)
    text = _read_text(args)
    model, tokenizer = load_model_and_tokenizer(args)
    n = model.config.n_positions
    if args.stride is not None and args.stride > n:
        raise CLIError(f"--stride {args.stride} must be in 1 .. n_positions={n}", code=2)
    if args.text is not None and len(tokenizer.encode(text)) < 2:  # typed text: a usage error (a file's: 1)
        raise CLIError(f"TEXT {text!r} is {len(tokenizer.encode(text))} token(s); scoring needs at least 2 tokens",
                       code=2)
    result = score(model, tokenizer, text, stride=args.stride)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    w = max(len("token"), *(len(quote_token(t, 24)) for t in result.tokens))
    print(f"{'pos':>5}  {'token':<{w}}  logprob")
    for i, (tok, lp) in enumerate(zip(result.tokens, result.logprobs)):
        print(f"{i:>5}  {quote_token(tok, 24):<{w}}  {'-' if lp is None else f'{lp:.4f}'}")
    context = "the first is" if result.count == len(result.tokens) - 1 else "the first of each window is"
    print(f"tokens: {len(result.tokens)} ({result.count} scored; {context} context only), "
          f"n_positions={model.config.n_positions}, stride={result.stride}")
    print(f"nll: {result.nll:.6f}")
    print(f"perplexity: {result.perplexity:.6f}")
    return 0
