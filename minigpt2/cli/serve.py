"""``minigpt2 serve``: the OpenAI-compatible Completions server (see minigpt2/serve/).

    minigpt2 serve --model gpt2                          # http://127.0.0.1:8000/v1
    minigpt2 serve --model runs/ft --port 0              # any free port (the URL is printed)
    minigpt2 serve --model gpt2 --host 0.0.0.0 --api-key KEY --cors-origin https://example.org

Loads the model, warms the fast path up, prints the URL and serves until Ctrl-C / SIGTERM;
then it stops admitting, ends the streams in flight with a final chunk (finish_reason
"abort"), and exits within a few seconds. Needs ``pip install "minigpt2[serve]"``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from . import CLIError, add_model_args, load_model_and_tokenizer
from .generate import _int_at_least

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ENV_API_KEY = "MINIGPT2_API_KEY"
SHUTDOWN_SECONDS = 5  # the longest a graceful stop waits for connections to close


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over OpenAI's Completions API (continuous batching)",
        description="Serve a checkpoint over OpenAI's Completions API (POST /v1/completions, GET /v1/models, "
        "GET /health, GET /metrics) with continuous batching. Binds 127.0.0.1 unless --host says otherwise. "
        'Needs: pip install "minigpt2[serve]".',
    )
    add_model_args(p, model_required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port, 0-65535 (default: 8000; 0: any free port)")
    p.add_argument("--max-batch-size", type=_int_at_least(1), default=16, metavar="N",
                   help="sequences decoded together, i.e. KV cache slots (default: 16)")
    p.add_argument("--max-queue", type=_int_at_least(1), default=256, metavar="N",
                   help="sequences that may wait for a slot; beyond it requests get 429 (default: 256)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="decode each sequence alone: outputs bit-identical to model.generate of the prompt alone "
                   "whatever else runs, at single-stream speed (default: one batched step for all)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${ENV_API_KEY} when set and not "
                   "empty, else none)")
    p.add_argument("--cors-origin", default=None, metavar="ORIGIN",
                   help="allow browser requests from ORIGIN, e.g. https://example.org (default: CORS off)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: the --model value)")
    p.set_defaults(func=run_serve)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (socket.bind raises OverflowError past it)."""
    port = _int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {text}")
    return port


_port.__name__ = "port"


def explorer_routes(engine: Any) -> list:
    """The explorer page's routes (``minigpt2.explore``, when the package is installed), on
    this server's engine: its model calls run on the engine thread between two steps."""
    try:
        from ..explore.routes import routes
    except ModuleNotFoundError as e:
        if e.name in ("minigpt2.explore", "minigpt2.explore.routes"):  # not installed: no page
            return []
        print(f"minigpt2 serve: warning: the explorer page is off ({e})", file=sys.stderr)
        return []
    return list(routes(engine))


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # from here on connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def memory_text(n: int) -> str:
    """Bytes for people: MiB below 1 GiB (a tiny model's cache is not '0.00 GiB'), else GiB."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def kv_cache_bytes(config: Any, max_batch_size: int, element_size: int) -> int:
    """Bytes of the engine's KV cache: keys and values, [n_layer, max_batch_size, n_positions, n_embd]."""
    return 2 * config.n_layer * max_batch_size * config.n_positions * config.n_embd * element_size


def _device_memory(device: Any) -> int:
    """Bytes of memory the KV cache could live in: the GPU's, else this machine's RAM."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_kv_memory(model: Any, max_batch_size: int) -> None:
    """A --max-batch-size whose KV cache cannot fit is one clear error, before the allocator's."""
    w = model.transformer.wte.weight
    need = kv_cache_bytes(model.config, max_batch_size, w.element_size())
    try:
        have = _device_memory(w.device)
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): let the allocator decide
        return
    if need > have:
        raise CLIError(f"--max-batch-size {max_batch_size} needs a KV cache of {memory_text(need)} ({need} bytes), "
                       f"more than the {memory_text(have)} of memory on {w.device}")  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise CLIError(f'minigpt2 serve needs the serve extra ({e.name} is missing): pip install "minigpt2[serve]"') from None
    from ..serve import Engine, create_app

    if args.api_key is not None and not args.api_key.strip():
        # An empty key would turn authentication off without a word (or lock every client out).
        raise CLIError("--api-key is empty: give a key, or leave the flag out to serve without one", code=2)
    if args.api_key is None:
        args.api_key = os.environ.get(ENV_API_KEY, "").strip() or None
    sock = _listen(args.host, args.port)  # a bad --host or a taken port fails before any warning
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"minigpt2 serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)  # fmt: skip
    try:
        model, tokenizer = load_model_and_tokenizer(args)
        name = args.served_model_name or args.model
        _check_kv_memory(model, args.max_batch_size)
        try:
            engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                            batch_invariant=args.batch_invariant, name=name)  # fmt: skip
        except (MemoryError, RuntimeError) as e:  # the allocator said no after all
            if not isinstance(e, MemoryError) and not any(w in str(e).lower() for w in ("alloc", "out of memory")):
                raise
            raise CLIError(f"--max-batch-size {args.max_batch_size}: cannot allocate its KV cache "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None  # fmt: skip
    except BaseException:
        sock.close()
        raise
    print(f"minigpt2 serve: warming up {name} ({engine.runner.max_batch_size} slots, "
          f"KV cache up to {memory_text(engine.runner.memory_bytes)})", flush=True)  # fmt: skip
    engine.start()
    explorer = explorer_routes(engine)
    app = create_app(engine, model_name=name, api_key=args.api_key, cors_origin=args.cors_origin,
                     extra_routes=explorer)  # fmt: skip

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.shutdown(timeout=0)  # stop admitting; in-flight streams get their final chunk
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="info", lifespan="off", timeout_graceful_shutdown=SHUTDOWN_SECONDS)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"minigpt2 serve: {name} at http://{shown}:{port}/v1 (Ctrl-C to stop)", flush=True)
    if explorer:  # the key travels in the URL fragment, which the browser never sends
        key = "#key=YOUR_KEY" if args.api_key else ""
        print(f"minigpt2 serve: the explorer page at http://{shown}:{port}/explore{key}", flush=True)
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    finally:
        engine.shutdown(timeout=SHUTDOWN_SECONDS)
        sock.close()
    print("minigpt2 serve: stopped", flush=True)
    return 0
