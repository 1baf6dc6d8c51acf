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
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port, 0-65535 (default: 8000; 0: any free port)")
    p.add_argument("--max-batch-size", type=_int_at_least(1), default=16, metavar="N",
                   help="sequences decoded together, i.e. KV cache slots (default: 16)")
    p.add_argument("--max-queue", type=_int_at_least(1), default=256, metavar="N",
                   help="sequences that may wait for a slot; beyond it requests get 429 (default: 256)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="decode each sequence alone: outputs bit-identical to model.generate of the prompt alone "
                   "whatever else runs, at single-stream speed (default: one batched step for all)")
    p.add_argument("--api-key", default=os.environ.get(ENV_API_KEY), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${ENV_API_KEY}, else none)")
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


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise CLIError(f'minigpt2 serve needs the serve extra ({e.name} is missing): pip install "minigpt2[serve]"') from None
    from ..serve import Engine, create_app

    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"minigpt2 serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)  # fmt: skip
    sock = _listen(args.host, args.port)
    model, tokenizer = load_model_and_tokenizer(args)
    name = args.served_model_name or args.model
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                    batch_invariant=args.batch_invariant, name=name)
    print(f"minigpt2 serve: warming up {name} ({engine.runner.max_batch_size} slots, "
          f"KV cache up to {engine.runner.memory_bytes / 2**30:.2f} GiB)", flush=True)  # fmt: skip
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
