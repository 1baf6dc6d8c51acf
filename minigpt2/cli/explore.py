"""``minigpt2 explore``: GPT-2's insides and its decoding strategies, live in a browser.

    minigpt2 explore --model gpt2                 # serves http://127.0.0.1:8000/explore and opens it
    minigpt2 explore --model runs/ft --port 8765 --no-browser

Loads the checkpoint, serves the explorer page and its JSON endpoints on 127.0.0.1 (uvicorn +
starlette, ``pip install 'minigpt2[serve]'``) until Ctrl-C, and opens the page with Python's
``webbrowser``. The page is static files inside the package: nothing is fetched from the
internet, so it works offline.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import socket
import sys
import threading
import time
import webbrowser
from typing import Any

from . import CLIError, add_model_args, load_model_and_tokenizer

HOST = "127.0.0.1"
MISSING = "minigpt2 explore needs starlette and uvicorn: pip install 'minigpt2[serve]'"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explore", help="GPT-2's insides and decoding strategies, live in a browser",
        description="Serve an interactive page on 127.0.0.1 for a checkpoint: its tokens, architecture, "
        "next-token distribution with every sampling control, attention maps, logit lens and the decoding "
        "strategies side by side. Opens it in your browser; Ctrl-C stops the server.",
    )
    add_model_args(p)
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default: 8000; 0 = any free port)")
    p.add_argument("--no-browser", action="store_true", help="print the URL only; do not open a browser")
    p.set_defaults(func=run_explore)


def build_app(engine: Any) -> Any:
    """The ASGI app that serves the explorer for ``engine``. ``minigpt2 serve`` mounts the same
    routes on its own app and engine; this one-user command keeps a plain Starlette app on a
    ``LocalEngine`` (no KV slots to allocate and warm, no /v1 API it was not asked for)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    from ..explore.routes import http_error, routes

    async def root(_: Any) -> RedirectResponse:  # the only page: / opens it
        return RedirectResponse("/explore")

    return Starlette(routes=[Route("/", root, methods=["GET"]), *routes(engine)],
                     exception_handlers={HTTPException: http_error})


def _bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port, bound here so a busy port is one clear line."""
    if not 0 <= port <= 65535:
        raise CLIError(f"--port {port} must be in 0..65535", code=2)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CLIError(f"port {port} on {HOST} is already in use: pick another with --port (0 = any free port)") from None
        raise CLIError(f"cannot listen on {HOST}:{port}: {e.strerror}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def _open_browser(url: str) -> bool:
    """Open ``url`` in the user's browser, unless there is no display to show one on.

    Over SSH on Linux, ``webbrowser`` would start a text-mode browser (w3m, lynx) on the same
    terminal as the server; without DISPLAY / WAYLAND_DISPLAY (and no $BROWSER chosen) the URL
    is printed instead.
    """
    if sys.platform.startswith("linux") and not any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")):
        return False
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def run_explore(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
        raise CLIError(MISSING)
    import uvicorn

    from ..explore.engine import LocalEngine

    sock = _bind(args.port)
    try:
        model, tokenizer = load_model_and_tokenizer(args)
        engine = LocalEngine(model, tokenizer, name=args.model)
        server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning", timeout_graceful_shutdown=2))
        url = f"http://{HOST}:{sock.getsockname()[1]}/explore"

        def announce() -> None:  # once the server accepts connections
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                print(f"minigpt2 explore: {args.model} at {url}  (Ctrl-C to stop)", flush=True)
                if not args.no_browser and not _open_browser(url):
                    print("minigpt2 explore: no graphical browser here: open the URL above in yours", flush=True)

        threading.Thread(target=announce, daemon=True).start()
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C: the normal way out
            pass
        engine.close()
    finally:
        sock.close()
    print("minigpt2 explore: stopped", file=sys.stderr)
    return 0
