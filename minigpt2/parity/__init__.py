"""The parity suite as a tool: hold a GPT-2 against a reference, activation by activation.

A GPT-2 is "at parity" when every intermediate of its forward pass equals the reference's
within a tolerance: ``max |ours - reference| <= rtol x max |reference|`` per named
activation (rtol 1e-4 in float32, CONVENTIONS.md). The names are minigpt2's own
(``model.activation_names()``): ``embed``, ``h.N.resid_pre``, ``h.N.ln_1``,
``h.N.attn.{q,k,v,pattern,out}``, ``h.N.resid_mid``, ``h.N.ln_2``, ``h.N.mlp.{act,out}``,
``h.N.resid_post``, ``ln_f``, then ``logits``. Walking them in forward order, the first one
past the tolerance says where two implementations part.

- :mod:`.capture`: one forward of minigpt2 (``run_with_cache``) or of transformers'
  ``GPT2LMHeadModel`` (forward hooks mapped onto the same names) -> a :class:`Capture`.
- :mod:`.report`: two captures -> a :class:`ParityReport` (the table, the first failure,
  top-1 agreement, generation, loss and gradients).
- :mod:`.reffile`: a capture <-> one safetensors file, the reference format other
  implementations write and read (docs/parity.md).
- :mod:`.check`: the whole checks, as ``minigpt2 parity`` runs them.

Nothing here imports transformers at import time; the functions that need it import it
and raise an ImportError naming ``pip install "minigpt2[parity]"`` when it is missing.
"""

from .capture import Capture, capture_minigpt2, capture_transformers
from .check import compare_to_reference, compare_to_transformers, export_reference
from .reffile import load_reference, save_reference
from .report import GenerationCheck, LossCheck, ParityReport, Row, Top1Check

__all__ = [
    "Capture", "capture_minigpt2", "capture_transformers",
    "compare_to_reference", "compare_to_transformers", "export_reference",
    "load_reference", "save_reference",
    "GenerationCheck", "LossCheck", "ParityReport", "Row", "Top1Check",
]
