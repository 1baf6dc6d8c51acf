"""The explorer's HTTP side: ``routes(engine)`` -> Starlette routes for any app to mount.

    GET  /explore                      the page (static/index.html)
    GET  /explore/static/...           its CSS and JavaScript
    GET  /api/explore/model            checkpoint metadata, the processors and strategies available
    GET  /api/explore/vocab            every token id as display text (fetched once)
    GET  /api/explore/architecture     module tree + notes + shapes + parameters, comparison table
    POST /api/explore/tokens           {prompt} or {input_ids} -> ids, BPE pieces, count
    POST /api/explore/next             {input_ids} -> fp32 logits of the last position
    POST /api/explore/step             {input_ids, mode, settings, seed} -> one token by the library
    POST /api/explore/attention        {input_ids, layer} -> that layer's attention weights
    POST /api/explore/lens             {input_ids, k} -> the logit lens
    POST /api/explore/strategies       {input_ids, max_new_tokens, seed, strategies?} -> SSE stream

Every model call goes through ``await engine.run(fn)`` (the engine thread owns the model);
the event loop only parses, checks and caches. Errors are JSON, ``{"error": {"message",
"type", "param", "code"}}`` with status 400 (a bad value), 404, 413 (body over 1 MiB) or 500,
never a stack trace; in the SSE stream an error is an ``error`` event. Needs starlette
(``pip install minigpt2[serve]``).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

try:
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import BaseRoute, Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("the explorer needs starlette and uvicorn: pip install 'minigpt2[serve]'") from None

from ..serve.engine import EngineClosed
from . import STATIC_DIR, data

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes: a 1024-token prompt as JSON is ~7 kB
TOKENS_PER_CALL = 4  # sweep tokens per engine call: other requests wait at most this long


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """The JSON error body every endpoint uses (OpenAI's shape)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


async def http_error(request: Request, e: Exception) -> Response:
    """Starlette's HTTPException (404 no route, 405 wrong method) as the API's JSON error under
    /api/, so every API answer is {"error": {...}}; pages and static files keep the plain text.
    ``build_app`` installs it; ``minigpt2 serve`` has its own handler that answers JSON everywhere."""
    status = getattr(e, "status_code", 500)
    headers = getattr(e, "headers", None)
    if not request.url.path.startswith("/api/"):
        return PlainTextResponse(str(getattr(e, "detail", "")), status_code=status, headers=headers)
    if status == 404:
        message = f"unknown route: {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}; use {headers.get('Allow', '?') if headers else '?'}"
    else:
        message = str(getattr(e, "detail", "")) or f"HTTP {status}"
    response = error(status, message)
    if headers:
        response.headers.update(headers)
    return response


class _Abort(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


async def _body(request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object (413 past MAX_BODY, 400 when not a JSON object or when it has
    a field outside ``fields``: a misspelt one would otherwise be silently ignored, as /v1
    refuses it too)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise _Abort(error(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY} bytes"))
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise _Abort(error(413, f"request body exceeds the limit of {MAX_BODY} bytes"))
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Abort(error(400, f"the body is not valid JSON: {e}")) from None
    except RecursionError:  # nesting deeper than Python's stack (json's C decoder recurses)
        raise _Abort(error(400, "the body is not valid JSON: nested too deeply")) from None
    if not isinstance(body, dict):
        raise _Abort(error(400, f"the body must be a JSON object, got {type(body).__name__}"))
    unknown = sorted(set(body) - set(fields))
    if unknown:
        message = f"Unrecognized request argument supplied: {', '.join(unknown)} ({request.url.path} takes {', '.join(fields)})"
        raise _Abort(error(400, message, param=unknown[0]))
    return body


def _failure(e: BaseException) -> JSONResponse:
    if isinstance(e, data.BadValue):
        return error(400, str(e), e.param)
    if isinstance(e, ValueError):
        return error(400, str(e))
    if isinstance(e, EngineClosed):  # the server is stopping (SIGTERM): expected, no traceback
        logger.warning("explorer request ended: %s", e)
        return error(503, str(e), code="shutting_down")
    logger.exception("explorer request failed")
    return error(500, f"the model call failed: {type(e).__name__}: {e}")


def _endpoint(handler: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
    """Turn a handler's dict into JSON and any error into the JSON error body."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request)
        except _Abort as a:
            return a.response
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error, never a traceback
            return _failure(e)
        return result if isinstance(result, Response) else JSONResponse(result)

    return endpoint


def _sse(event: str, payload: Any) -> str:
    """One server-sent event (the text/event-stream framing: event line, data line, blank line)."""
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Cache:
    """Results of recent model calls, keyed by what they depend on (the page asks again for the
    same prompt when a layer or a control changes back). Used from the event loop only."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.items: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: tuple, value: Any) -> Any:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def routes(engine: Any) -> list[BaseRoute]:
    """The explorer's routes, served by whatever app mounts them (``minigpt2 explore`` / ``serve``).

    ``engine`` needs ``await engine.run(fn)`` (``fn(model, tokenizer)`` on the thread that owns
    the model) and ``engine.model`` / ``engine.tokenizer`` for metadata.
    """
    cache = _Cache()
    name = getattr(engine, "name", None)

    async def cached(key: tuple, fn: Callable[[Any, Any], Any]) -> Any:
        hit = cache.get(key)
        return hit if hit is not None else cache.put(key, await engine.run(fn))

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def model(request: Request) -> Any:
        return await cached(("model",), lambda m, t: data.model_info(m, t, name))

    async def vocab(request: Request) -> Any:
        pieces = await cached(("vocab",), data.vocabulary)
        return JSONResponse({"pieces": pieces}, headers={"Cache-Control": "private, max-age=3600"})

    async def architecture(request: Request) -> Any:
        return await cached(("architecture",), lambda m, t: data.architecture(m))

    async def tokens(request: Request) -> Any:
        b = await _body(request, ("prompt", "input_ids"))
        return await engine.run(lambda m, t: data.tokens(m, t, prompt=b.get("prompt"), input_ids=b.get("input_ids")))

    def _ids_key(b: dict[str, Any]) -> tuple:
        ids = b.get("input_ids")
        return tuple(ids) if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else (repr(ids),)

    async def next_token(request: Request) -> Any:
        b = await _body(request, ("input_ids",))
        return await cached(("next", _ids_key(b)), lambda m, t: data.next_token(m, b.get("input_ids")))

    async def step(request: Request) -> Any:
        b = await _body(request, ("input_ids", "mode", "settings", "seed"))
        return await engine.run(lambda m, t: data.step(m, t, b.get("input_ids"), mode=b.get("mode"),
                                                       settings=b.get("settings"), seed=b.get("seed")))

    async def attention(request: Request) -> Any:
        b = await _body(request, ("input_ids", "layer"))
        key = ("attention", _ids_key(b), repr(b.get("layer")))
        return await cached(key, lambda m, t: data.attention(m, b.get("input_ids"), b.get("layer")))

    async def lens(request: Request) -> Any:
        b = await _body(request, ("input_ids", "k"))
        k = b.get("k", 5)
        return await cached(("lens", _ids_key(b), repr(k)), lambda m, t: data.lens(m, b.get("input_ids"), k))

    async def sweep(request: Request) -> Response:
        b = await _body(request, ("input_ids", "max_new_tokens", "seed", "strategies"))
        ids, n, seed = data.check_sweep(engine.model, b.get("input_ids"), b.get("max_new_tokens", 30), b.get("seed", 0))
        chosen = data.strategies()
        keys = b.get("strategies")
        if keys is not None:
            known = {s.key: s for s in chosen}
            if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k in known for k in keys):
                raise data.BadValue("strategies", f"strategies must be a non-empty list of {', '.join(known)}")
            chosen = [known[k] for k in keys]
        return StreamingResponse(_sweep_events(engine, ids, n, seed, chosen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return [
        Route("/explore", page, methods=["GET"]),
        Route("/explore/", page, methods=["GET"]),
        Mount("/explore/static", app=StaticFiles(directory=STATIC_DIR), name="explore-static"),
        Route("/api/explore/model", _endpoint(model), methods=["GET"]),
        Route("/api/explore/vocab", _endpoint(vocab), methods=["GET"]),
        Route("/api/explore/architecture", _endpoint(architecture), methods=["GET"]),
        Route("/api/explore/tokens", _endpoint(tokens), methods=["POST"]),
        Route("/api/explore/next", _endpoint(next_token), methods=["POST"]),
        Route("/api/explore/step", _endpoint(step), methods=["POST"]),
        Route("/api/explore/attention", _endpoint(attention), methods=["POST"]),
        Route("/api/explore/lens", _endpoint(lens), methods=["POST"]),
        Route("/api/explore/strategies", _endpoint(sweep), methods=["POST"]),
    ]


async def _sweep_events(engine: Any, ids: list[int], n: int, seed: int, chosen: list[data.Strategy]) -> AsyncIterator[str]:
    """The sweep as server-sent events: ``columns`` (what runs), then ``tokens`` events (a few
    tokens of one column at a time, round robin, so the columns grow side by side), then ``end``.

    Each engine call advances one column by TOKENS_PER_CALL tokens, so requests from the other
    panels wait for one short call, not the whole sweep. A client that goes away stops it.
    """
    yield _sse("columns", {"columns": [s.to_dict() for s in chosen], "max_new_tokens": n, "seed": seed})
    try:
        columns = await engine.run(lambda m, t: [data.SweepColumn(m, t, ids, s, n, seed) for s in chosen])
        live = list(columns)
        while live:
            for col in list(live):
                event = await engine.run(lambda m, t, col=col: col.advance(TOKENS_PER_CALL))
                yield _sse("tokens", event)
                if col.done:
                    live.remove(col)
    except Exception as e:  # noqa: BLE001 - reported in the stream, which has already started
        body = json.loads(_failure(e).body)
        yield _sse("error", body)
        return
    yield _sse("end", {})
