"""The GPU check script answers on a CPU-only machine: --help, and one line without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_generation_cuda.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DEV"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def test_help_needs_no_gpu() -> None:
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--device" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the script would run its checks")
def test_without_cuda_it_says_so_in_one_line() -> None:
    r = _run()
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "needs a CUDA GPU" in r.stderr
