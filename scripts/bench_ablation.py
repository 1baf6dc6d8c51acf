"""What each part of minigpt2's decoding fast path buys, measured in one process.

    python scripts/bench_ablation.py             # 124M gpt2 shape, ~3 minutes on 2 cores
    python scripts/bench_ablation.py --quick     # smoke run

Four ways to run the same ``generate`` call (prompt 16, 128 new tokens, EOS never stopping),
interleaved so that machine drift hits all of them, median of the runs after a warm-up:

- ``transformers``: ``GPT2LMHeadModel.generate``, the baseline;
- ``model path``: minigpt2's generation loop on the plain model (``model.transformer`` and
  ``lm_head`` module by module): preallocated KV cache, last-position unembedding, no fast path;
- ``decoder, plain kernels``: fast.Decoder (the flattened forward) with every matrix through
  the model's own ``addmm`` / ``linear`` (``MINIGPT2_KERNEL=plain``);
- ``decoder, chosen kernels``: what ``generate`` does by default (the host's fastest kernels).

Each variant is a separate model instance, so that no prepared weights are rebuilt between
runs. Rows: fp32 and bf16 at batch 1, fp32 at batch 8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: checkpoint, timing helpers, host line)
import torch  # noqa: E402

import minigpt2  # noqa: E402
from minigpt2 import fast, kernels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(bench.SIZES), default="gpt2")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    new = 16 if args.quick else 128
    runs = 1 if args.quick else args.runs
    h = bench.host()
    print(f"# minigpt2 fast-path ablation: {args.size}; CPU {h['cpu']}; {h['cores']} cores; torch {h['torch']}")
    print("| batch, dtype | variant | tokens/s | x transformers fp32 |\n|---|---|---|---|")

    import transformers

    with tempfile.TemporaryDirectory(prefix="minigpt2-ablation-") as d:
        directory = bench.make_checkpoint(Path(d), args.size)
        hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        eos = hf.config.eos_token_id
        vocab = hf.config.vocab_size
        plain_models: set[int] = set()
        real_decoder = fast.decoder

        def decoder(model: Any, batch_size: int, *args: Any, **kwargs: Any) -> Any:
            return None if id(model) in plain_models else real_decoder(model, batch_size, *args, **kwargs)

        fast.decoder = decoder  # the "model path" variants take the plain model code
        try:
            for batch, dtype in ((1, torch.float32), (1, torch.bfloat16), (8, torch.float32)):
                ids = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(1234))
                mask = torch.ones_like(ids)
                variants = {}
                for name in ("model path", "decoder, plain kernels", "decoder, chosen kernels"):
                    model = minigpt2.GPT2.from_pretrained(directory, dtype=dtype)
                    if name == "model path":
                        plain_models.add(id(model))
                    forced = "plain" if name == "decoder, plain kernels" else None

                    def run(model: Any = model, forced: str | None = forced) -> Any:
                        with kernels.force(forced):
                            return model.generate(ids, max_new_tokens=new, min_new_tokens=new)

                    variants[name] = run

                def run_hf() -> Any:
                    with torch.inference_mode():
                        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                           pad_token_id=eos, do_sample=False)

                t = bench.interleaved({"transformers fp32": run_hf, **variants}, runs)
                base = batch * new / t["transformers fp32"]
                label = f"{batch}, {str(dtype).removeprefix('torch.')}"
                for name, secs in t.items():
                    if name == "transformers fp32" and dtype != torch.float32:
                        continue
                    tps = batch * new / secs
                    print(f"| {label} | {name} | {tps:.1f} | {tps / base:.2f}x |", flush=True)
        finally:
            fast.decoder = real_decoder
    return 0


if __name__ == "__main__":
    sys.exit(main())
