"""How far a batched decode step moves a sequence's logits from the sequence decoded alone.

    python scripts/serve_invariance.py            # random 124M checkpoint, batches 2 / 4 / 8 / 16
    python scripts/serve_invariance.py --quick    # a tiny model (a smoke run)

``minigpt2 serve`` prefills every prompt alone and decodes a lone sequence exactly as
``model.generate`` does, so both are bit-identical to generate. A decode step with n > 1
sequences multiplies an [n, C] matrix by each weight, and BLAS sums row b of it in another
order than the [1, C] product generate runs. This script measures what that changes:

- for each batch size n: n prompts of different lengths; generate's greedy tokens for each
  alone (the reference), then the same tokens fed through the engine's batched decode
  (teacher forcing, so every step compares like with like) against the alone logits;
- per step and sequence: is the row bit-identical; max |batched - alone| and the top-1 -
  top-2 margin of the alone logits (how close a near-tie is), both relative to the row's
  largest |logit|; whether the argmax moved; and the total-variation distance between the two softmax
  distributions, which bounds the chance that a seeded draw (same RNG, same uniform) picks
  another token;
- then free-running: the engine serving all n greedy requests at once against generate alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import minigpt2  # noqa: E402
from minigpt2.serve import Engine, SamplingParams  # noqa: E402
from minigpt2.serve.model_runner import ModelRunner  # noqa: E402

SHAPES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=50257, n_positions=1024),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per sequence (default: 64; quick: 16)")
    args = ap.parse_args()
    import transformers

    shape = "tiny" if args.quick else "gpt2"
    steps = args.steps or (16 if args.quick else 64)
    batches = (2, 4) if args.quick else (2, 4, 8, 16)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[shape])).save_pretrained(tmp)
        model = minigpt2.GPT2.from_pretrained(tmp, device="cpu")
    tok = minigpt2.Tokenizer()
    g = torch.Generator().manual_seed(1)
    print(f"{shape}, {steps} steps per sequence, torch {torch.__version__}, {os.cpu_count()} cores")
    print("(differences and top-1 - top-2 margins relative to the row's largest |logit|; TV: total variation)")
    print(f"{'batch':>5} {'rows':>6} {'identical':>9} {'max rel diff':>12} {'min margin':>10} {'argmax moved':>12} "
          f"{'max TV':>9} {'mean TV':>9} {'free-run tokens equal':>22}")  # fmt: skip
    for n in batches:
        prompts = [torch.randint(0, 50257, (8 + 13 * i % 57,), generator=g).tolist() for i in range(n)]
        refs = [model.generate(torch.tensor([p]), max_new_tokens=steps, eos_token_id=None)[0, len(p) :].tolist() for p in prompts]
        alone = [_alone_logits(model, p, r) for p, r in zip(prompts, refs)]
        runner = ModelRunner(model, n)
        for slot, p in enumerate(prompts):
            runner.prefill(slot, p)
        rows = identical = moved = 0
        rel, margin, tvs = 0.0, float("inf"), []
        for step in range(steps - 1):
            batched = runner.decode([r[step] for r in refs], [len(p) + step for p in prompts])
            for b in range(n):
                a, x = alone[b][step], batched[b]
                rows += 1
                identical += bool(torch.equal(a, x))
                rel = max(rel, float((a - x).abs().max() / a.abs().max()))
                top2 = torch.topk(a, 2).values
                margin = min(margin, float((top2[0] - top2[1]) / a.abs().max()))
                moved += int(a.argmax()) != int(x.argmax())
                tvs.append(0.5 * float((a.softmax(-1) - x.softmax(-1)).abs().sum()))
        with Engine(model, tok, max_batch_size=n) as engine:
            outs: list[list] = [[] for _ in prompts]
            params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
            reqs = [engine.submit([p], params, outs[i].extend) for i, p in enumerate(prompts)]
            while not all(r.done for r in reqs):
                time.sleep(0.01)
        equal = sum([o.token_id for o in out if o.token_id is not None] == ref for out, ref in zip(outs, refs))
        print(f"{n:>5} {rows:>6} {identical / rows:>9.1%} {rel:>12.2e} {margin:>10.2e} {moved:>12} "
              f"{max(tvs):>9.2e} {sum(tvs) / len(tvs):>9.2e} {equal:>15} / {n}", flush=True)  # fmt: skip
    return 0


def _alone_logits(model: minigpt2.GPT2, prompt: list[int], new: list[int]) -> list[torch.Tensor]:
    """Logits of each decode step of the prompt alone (batch 1, generate's path), teacher-forced."""
    runner = ModelRunner(model, 1)
    runner.prefill(0, prompt)
    return [runner.decode([t], [len(prompt) + i])[0] for i, t in enumerate(new[:-1])]


if __name__ == "__main__":
    sys.exit(main())
