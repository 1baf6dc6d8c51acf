"""Tokenizer speed: minigpt2 against tiktoken alone and transformers, on 1 MB texts and on runs
of one character class up to 10^6 characters.

    python scripts/bench_tokenizer.py                 # the full table (about a minute on 2 cores)
    python scripts/bench_tokenizer.py --no-transformers --json out.json

Texts (built locally, no download): 1 MB of Python source (transformers' ``models/`` folder,
files in sorted order, the first 10^6 characters) and 1 MB of seeded multilingual text (Latin,
Cyrillic, Greek, CJK, Hangul, Arabic, emoji, mixed whitespace). Each figure is the median of
``--repeat`` runs. "tiktoken alone" is ``encode_ordinary`` of the same BPE ranks on the whole
text, the floor minigpt2 adds its added-token split and long-run cut to. For the runs, ids are
checked equal to transformers' (unless ``--no-transformers``), and the 10^5 -> 10^6 time ratio
shows the growth (about 10 is linear).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt2 import Tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "minigpt2" / "data"


def python_source(n_chars: int = 1_000_000) -> str:
    """The first ``n_chars`` characters of transformers' model sources, in sorted file order."""
    import transformers

    parts, total = [], 0
    for path in sorted((Path(transformers.__file__).parent / "models").rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return "".join(parts)[:n_chars]


def multilingual(n_chars: int = 1_000_000, seed: int = 0) -> str:
    """Seeded words from several scripts, separated by mixed whitespace and punctuation."""
    rng = random.Random(seed)
    scripts = [(0x61, 0x7A), (0x430, 0x44F), (0x3B1, 0x3C9), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x627, 0x64A),
               (0x1F600, 0x1F64F), (0xE0, 0xFF)]  # fmt: skip
    seps = [" ", " ", " ", "\n", ", ", ". ", "  ", "\t", "\u3000", "\n\n"]
    out, total = [], 0
    while total < n_chars:
        lo, hi = rng.choice(scripts)
        word = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 9))) + rng.choice(seps)
        out.append(word)
        total += len(word)
    return "".join(out)[:n_chars]


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_strings(n: int) -> dict[str, str]:
    return {
        "spaces": " " * (n - 1),
        "newlines": "\n" * n,
        "a + spaces + b": "a" + " " * n + "b",
        "tabs": "\t" * n,
        "ideographic spaces": "\u3000" * n,
        "mixed whitespace": (" \n\t\r\u3000\xa0" * (n // 6 + 1))[:n],
        "letters": "a" * n,
        "digits": "1" * n,
        "punctuation": "." * n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' figures and id checks")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()

    tok = Tokenizer()
    hf = None
    if not args.no_transformers:
        import transformers

        transformers.logging.set_verbosity_error()
        hf = transformers.AutoTokenizer.from_pretrained(str(DATA))
    bpe = getattr(getattr(tok, "_spec", None), "bpe", None)
    results: dict[str, Any] = {"texts": {}, "runs": {}}

    print(f"{'1 MB text':<22}{'minigpt2 s':>12}{'tiktoken alone s':>18}{'transformers s':>16}{'tokens':>10}")
    for name, text in (("python source", python_source()), ("multilingual", multilingual())):
        ours = median_time(lambda: tok.encode(text), args.repeat)
        floor = median_time(lambda: bpe.encoding.encode_ordinary(text), args.repeat) if bpe is not None else None
        theirs = median_time(lambda: hf.encode(text), max(1, args.repeat // 2)) if hf is not None else None
        ids = tok.encode(text)
        if hf is not None:
            assert ids == hf.encode(text), f"{name}: ids differ from transformers'"
        results["texts"][name] = {"minigpt2_s": ours, "tiktoken_s": floor, "transformers_s": theirs, "tokens": len(ids)}
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(f"{name:<22}{fmt(ours):>12}{fmt(floor):>18}{fmt(theirs):>16}{len(ids):>10}")

    print(f"\n{'run of 10^6':<22}{'minigpt2 s':>12}{'10^5 -> 10^6':>14}{'transformers s':>16}{'same ids':>10}")
    small = run_strings(100_000)
    for name, text in run_strings(1_000_000).items():
        try:
            ours = median_time(lambda: tok.encode(text), max(1, args.repeat // 2))
            growth = ours / median_time(lambda: tok.encode(small[name]), max(1, args.repeat // 2))
        except BaseException as e:  # noqa: BLE001 - tiktoken's panic is a BaseException
            print(f"{name:<22}{type(e).__name__:>12}")
            results["runs"][name] = {"error": type(e).__name__}
            continue
        theirs = same = None
        if hf is not None:
            start = time.perf_counter()
            expected = hf.encode(text)
            theirs = time.perf_counter() - start
            same = tok.encode(text) == expected
        results["runs"][name] = {"minigpt2_s": ours, "growth_10x": growth, "transformers_s": theirs, "same_ids": same}
        print(f"{name:<22}{ours:>12.3f}{growth:>13.1f}x{(f'{theirs:.3f}' if theirs else '-'):>16}{str(same):>10}")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
