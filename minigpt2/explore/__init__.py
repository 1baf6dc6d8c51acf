"""``minigpt2 explore``: GPT-2's insides and its decoding strategies, live in a browser.

Three files, each one idea:

- ``data.py``: pure functions, (model, tokenizer, request values) -> JSON-able dicts. Every
  number comes from the library itself (``model``'s forward, ``run_with_cache``,
  ``logit_lens``, ``sampling``, ``stream`` / ``generate``, ``internals``).
- ``routes.py``: ``routes(engine)``, the Starlette routes of the page and its JSON / SSE
  endpoints. Every model call goes through the engine (``await engine.run(fn)``: ``fn(model,
  tokenizer)`` on the one thread that owns the model). Needs ``minigpt2[serve]``.
- ``static/``: the page itself (HTML, CSS, JavaScript; no build step, nothing from a CDN).

``engine.py`` holds ``LocalEngine``, a one-thread stand-in with the engine's two methods, so
the page runs on its own app too. Importing ``minigpt2`` imports none of this.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"

__all__ = ["STATIC_DIR"]
