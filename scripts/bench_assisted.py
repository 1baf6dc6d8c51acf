"""Assisted decoding: what a draft model buys a large target, measured, and what it would buy.

    python scripts/bench_assisted.py              # gpt2-large-shape target, distilgpt2-shape assistant
    python scripts/bench_assisted.py --quick      # tiny shapes, a smoke run
    python scripts/bench.py                       # runs these rows too, after its own

Random weights, so the figures say what the machinery costs, not what a trained pair gains:

1. the target alone, greedy (tokens/s of the whole ``generate`` call);
2. with a small-shape assistant, transformers' default settings (up to 20 drafts a round,
   drafting stops when the assistant's confidence in a token is below 0.4);
3. the same with a fixed 4 drafts a round (confidence threshold 0);
4. the target as its own assistant (4 drafts, every draft accepted by construction): the
   upper bound on acceptance, at the cost of a full-size draft; the overhead of checking;
5. the step costs measured alone: the target's and the assistant's one-token step, and the
   target's forward over 1 + k positions (checking k drafts), and the speed-up they imply:

       E(a) = (1 - a^(k+1)) / (1 - a)       tokens per round at acceptance rate a
       speed-up(a) = E(a) x t_target / (k x t_draft + t_check(k))

   (Leviathan et al. 2023, eq. 1 and section 3.4, with the check's cost measured instead of
   assumed equal to a step). A random-weight assistant agrees with a random-weight target
   about 1 time in vocab_size, so rows 2-3 accept almost nothing and run slower than the
   target alone; the formula says what the same machinery gives a pair that agrees.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import minigpt2  # noqa: E402
from minigpt2 import assisted, fast  # noqa: E402
from minigpt2.generation import _forward_all, _forward_last  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "large": dict(n_embd=1280, n_layer=36, n_head=20),  # gpt2-large, 774M
    "distilgpt2": dict(n_embd=768, n_layer=6, n_head=12),  # 82M
    "tiny-target": dict(n_embd=128, n_layer=4, n_head=4),
    "tiny-draft": dict(n_embd=64, n_layer=1, n_head=4),
}


def random_model(shape: str, seed: int) -> minigpt2.GPT2:
    """GPT-2's own initialisation at this shape (full GPT-2 vocabulary), in eval mode."""
    torch.manual_seed(seed)
    return minigpt2.GPT2(minigpt2.GPT2Config(**SHAPES[shape])).eval()


def median_time(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up (the fast path prepares its kernels on first use)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_costs(target: minigpt2.GPT2, draft: minigpt2.GPT2, k: int, context: int, runs: int) -> dict[str, float]:
    """Seconds for one decode step of each model and for the target's check of k drafts
    (a forward over 1 + k positions), each against a cache holding ``context`` positions."""
    ids = torch.randint(0, target.config.vocab_size, (1, context + k + 1), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():
        for name, model, width, forward in (("t_target", target, 1, _forward_last), ("t_draft", draft, 1, _forward_last),
                                            ("t_check", target, k + 1, _forward_all)):
            cache = model.make_cache(1, context + k + 1)
            dec = fast.decoder(model, width)  # as assisted.py: the check on kernels chosen for its rows
            _forward_last(model, ids[:, :context], torch.arange(context)[None], None, cache, dec)

            def step(model: Any = model, cache: Any = cache, dec: Any = dec, width: int = width, forward: Any = forward) -> None:
                forward(model, ids[:, context : context + width], torch.arange(context, context + width)[None], None,
                        cache, dec)
                cache.crop(context)

            out[name] = median_time(step, max(runs, 5))
    return out


def speedup(a: float, k: int, costs: dict[str, float]) -> float:
    """The speed-up over the target alone at acceptance rate a with k drafts a round."""
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens * costs["t_target"] / (k * costs["t_draft"] + costs["t_check"])


def assisted_rows(add: Callable[..., None], quick: bool = False, runs: int = 3, new: int | None = None) -> dict[str, Any]:
    """Run every row; ``add(figure, value, None, unit)`` prints / records one (bench.py's Bench.add)."""
    target = random_model("tiny-target" if quick else "large", seed=0)
    draft = random_model("tiny-draft" if quick else "distilgpt2", seed=1)
    new = new or (16 if quick else 32)
    ids = torch.randint(0, target.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1234))
    base = dict(max_new_tokens=new, min_new_tokens=new)
    shape = "tiny" if quick else "gpt2-large"
    details: dict[str, Any] = {}

    t = median_time(lambda: target.generate(ids, **base), runs)
    alone = new / t
    add(f"assisted: {shape}-shape target alone, greedy fp32 batch 1 (tokens/s)", alone, None, "tok/s")
    for label, kw in (
        ("small assistant, default settings (<= 20 drafts, confidence 0.4)", dict(assistant_model=draft)),
        ("small assistant, 4 drafts a round", dict(assistant_model=draft, num_assistant_tokens=4,
                                                   assistant_confidence_threshold=0.0)),
        ("target as its own assistant, 4 drafts (upper bound on acceptance)",
         dict(assistant_model=target, num_assistant_tokens=4, assistant_confidence_threshold=0.0)),
    ):
        stats: list[assisted.AssistedStats] = []
        t = median_time(lambda kw=kw, stats=stats: stats.append(assisted.generate_with_stats(target, ids, **base, **kw)[1]),
                        runs)
        s = stats[-1]
        add(f"assisted: {label} (tokens/s; acceptance {s.acceptance_rate:.2f}, "
            f"{s.tokens / max(s.rounds, 1):.2f} tokens a round)", new / t, None, "tok/s")
        details[label] = {"tokens_per_s": new / t, "speedup": new / t / alone, "acceptance_rate": s.acceptance_rate,
                          "rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted}

    k = 4
    costs = step_costs(target, draft, k, context=16 + new // 2, runs=runs)
    details["step_costs_s"] = costs
    add(f"assisted: step costs (ms): target {costs['t_target'] * 1e3:.1f}, assistant {costs['t_draft'] * 1e3:.1f}, "
        f"target checking {k} drafts {costs['t_check'] * 1e3:.1f}", costs["t_check"] / costs["t_target"], None,
        "check/step")
    for a in (0.5, 0.7, 0.8, 0.9, 1.0):
        s = speedup(a, k, costs)
        details[f"speedup_a{a}"] = s
        add(f"assisted: implied speed-up at acceptance {a:.1f}, k={k}: E(a) t_target / (k t_draft + t_check)", s, None,
            "x")
    return details


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    p.add_argument("--runs", type=int, default=3, help="timed runs per figure, after one warm-up (median)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per call (default: 32; quick: 16)")
    args = p.parse_args(argv)

    def add(figure: str, value: float, _: Any, unit: str) -> None:
        print(f"| {figure} | {value:.3g} {unit} |", flush=True)

    print(f"# assisted decoding; torch {torch.__version__}; {torch.get_num_threads()} threads")
    print("| figure | value |\n|---|---|")
    assisted_rows(add, quick=args.quick, runs=args.runs, new=args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
