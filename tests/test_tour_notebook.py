"""docs/tour.ipynb runs top to bottom (nbclient) on a random-weight checkpoint, so the docs cannot rot.

The notebook reads its checkpoint from MINIGPT2_TOUR_MODEL (default ``gpt2`` for users); here it is a
small random checkpoint with the full GPT-2 vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

TOUR = Path(__file__).resolve().parent.parent / "docs" / "tour.ipynb"


def test_tour_runs_top_to_bottom(gpt2_tiny_vocab_checkpoint, monkeypatch, tmp_path):
    path, _ = gpt2_tiny_vocab_checkpoint
    monkeypatch.setenv("MINIGPT2_TOUR_MODEL", str(path))  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(TOUR, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the tour without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell) -> str:
        return "".join(o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values()) for o in cell.outputs)

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o.output_type != "error" for c in code for o in c.outputs)
    everything = "\n".join(text(c) for c in code)
    assert "GPT2(" in everything and "(c_attn): Conv1D(nf=192, nx=64)" in everything  # print(model)
    assert "# Queries, keys and values" in everything  # each part explained
    assert "BERT (bert-base)" in everything and "T5 (t5-base)" in everything  # the comparison table
    assert "--- greedy" in everything and "--- beam search (5 beams)" in everything  # the strategies
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the attention map and the logit lens plot
