"""scripts/bench.py as it would run on an x86-64 host without AVX-512 (AVX2 + FMA, no native
bf16: an AMD EPYC before Zen 4, say), emulated on a host with AVX-512.

    python scripts/bench_avx2.py --skip-peers --skip-xl --skip-assisted --skip-large

Before torch loads, torch's own kernels, oneDNN and MKL are held to AVX2
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``),
so oneDNN reports no native bf16 and the kernel choice takes the paths such a host takes; and
minigpt2's native library is built with ``-march=x86-64-v3`` (what ``-march=native`` gives on
such a CPU) instead of for this host. Every other argument goes to scripts/bench.py.

What it cannot emulate: the other host's clock, caches and memory bandwidth, and the peers
(ONNX Runtime and llama.cpp pick their kernels from the CPU itself: leave them out with
``--skip-peers``, or read their rows as AVX-512 figures). Kernel decisions are cached per CPU
model, not per instruction set: unless ``MINIGPT2_CACHE_DIR`` is set, the script uses a fresh
temporary directory, so that it neither reuses decisions measured without the emulation nor
leaves its own in the user's cache.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path

os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
if not os.environ.get("MINIGPT2_CACHE_DIR"):
    os.environ["MINIGPT2_CACHE_DIR"] = tempfile.mkdtemp(prefix="minigpt2-avx2-")

import torch  # noqa: E402  (after the variables above, which torch reads when it loads)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minigpt2 import native  # noqa: E402


def main() -> int:
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("bench_avx2: oneDNN still reports native bf16; the emulation did not take", file=sys.stderr)
        return 1
    native.FLAGS = tuple("-march=x86-64-v3" if f == "-march=native" else f for f in native.FLAGS)
    print(f"# emulating an AVX2 host: torch {torch.backends.cpu.get_cpu_capability()}, oneDNN without bf16, "
          f"native library built with {' '.join(native.FLAGS)}; kernel decisions in {os.environ['MINIGPT2_CACHE_DIR']}",
          flush=True)  # fmt: skip
    sys.argv = [str(Path(__file__).with_name("bench.py")), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
