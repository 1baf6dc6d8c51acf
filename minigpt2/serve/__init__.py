"""``minigpt2 serve``: an OpenAI-compatible Completions server with continuous batching.

The engine side (no HTTP, no optional dependency) and the HTTP side (FastAPI, uvicorn and
prometheus_client, from ``pip install "minigpt2[serve]"``), one file per idea, in the shape
of nano-vllm's engine:

    sequence.py      SamplingParams, Sequence, Request, and the outputs a request receives
    scheduler.py     waiting queue and running slots: what each step admits and frees
    model_runner.py  the KV slots and the forwards: prefill one prompt, decode n rows
    processors.py    each sequence's own processors, penalties, RNG and log-probs
    detokenizer.py   token ids -> text as it becomes final, stop strings, text offsets
    engine.py        Engine: the thread that owns the model and runs the steps
    protocol.py      the OpenAI request and response shapes (pydantic)
    metrics.py       Prometheus metrics
    app.py           create_app: the ASGI app (routes, auth, errors, SSE)

``from minigpt2.serve import Engine`` needs only torch; ``create_app`` imports the web stack.
"""

from .engine import Engine, EngineClosed, QueueFull, RequestError
from .sequence import ErrorOutput, PromptOutput, Request, SamplingParams, TokenOutput

__all__ = [
    "Engine", "EngineClosed", "QueueFull", "RequestError",
    "ErrorOutput", "PromptOutput", "Request", "SamplingParams", "TokenOutput",
    "create_app",
]


def __getattr__(name: str):  # noqa: ANN202 - create_app, imported on first use (it needs the extra)
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
