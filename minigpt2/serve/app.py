"""The ASGI app: OpenAI's Completions API in front of an :class:`~minigpt2.serve.Engine`.

FastAPI does the routing, the body validation (protocol.py), the body-size limit and the
SSE framing; prometheus_client the metrics; uvicorn serves it (cli/serve.py). This file
knows no tensors: it turns a request into token ids and ``SamplingParams``, submits them to
the engine, and turns the engine's outputs into OpenAI's JSON, whole or as a stream.

    GET  /health            200 while the engine runs, 503 once it stops
    GET  /metrics           Prometheus text (metrics.py)
    GET  /v1/models         the one model served (and GET /v1/models/{id})
    POST /v1/completions    completions, streamed with "stream": true

Every error is OpenAI's error body with the right status: 400 bad field, invalid JSON or
too long a prompt, 401 missing or wrong key (when ``api_key`` is set; /v1 and /api), 404 unknown
route or model, 413 body over 1 MiB, 429 queue full (with Retry-After), 500 an engine step
that failed this request (never a stack trace), 503 shutting down.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from . import protocol
from .engine import Engine, EngineClosed, QueueFull, RequestError
from .metrics import Metrics
from .sequence import ErrorOutput, Output, Request as EngineRequest, TokenOutput

MAX_BODY_BYTES = 1 << 20  # 1 MiB
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.5  # a waiting non-streaming request checks its client this often


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = protocol.error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    cors_origin: str | None = None,
    extra_routes: Sequence[Any] = (),
) -> FastAPI:
    """The app serving ``engine`` under ``model_name`` (the only name /v1 accepts).

    api_key: when set, requests under /v1 and /api (the explorer's API among ``extra_routes``)
        need ``Authorization: Bearer <api_key>`` (compared in constant time); /health,
        /metrics and pages (/explore) stay open.
    cors_origin: the one origin allowed cross-origin requests (CORS is off without it).
    extra_routes: Starlette routes / mounts added after the API's (the explorer page).
    """
    metrics = Metrics(engine)
    # No /docs, /redoc, /openapi.json: Swagger UI loads from a CDN (dead offline), and they
    # would be open even with an API key; the README documents the API.
    app = _App(title="minigpt2 serve", version=__version__, max_body_size=MAX_BODY_BYTES, docs_url=None,
               redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, model_name
    app.state.api_key, app.state.cors_origin = api_key, cors_origin
    created = protocol.now()

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = protocol.validation_error(e)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        elif e.status_code == 413:
            message = f"The request body is larger than the limit of {MAX_BODY_BYTES} bytes"
        else:
            message = str(e.detail)
        return APIError(e.status_code, message, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return APIError(500, "The server had an error while processing your request.", type="server_error").response()

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    v1 = APIRouter(prefix="/v1")
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "minigpt2",
                  "max_model_len": engine.config.n_positions}  # fmt: skip

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        # The body is JSON whatever the Content-Type says (``curl -d`` sends a form type).
        raw = await request.body()
        if not raw.strip():
            raise APIError(400, "the body is empty: send a JSON object")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:  # nesting deeper than Python's stack (json's C decoder recurses)
            raise APIError(400, "the body is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = protocol.CompletionRequest.model_validate(data)
        except ValidationError as e:
            message, param = protocol.validation_error(e)
            raise APIError(400, message, param=param) from None
        except RecursionError:
            raise APIError(400, "the body is not valid JSON: nested too deeply") from None
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist", param="model", code="model_not_found")
        n, stream = body.n or 1, bool(body.stream)
        best_of = body.best_of or n
        _check_combinations(body, n, best_of, stream)
        _check_queue(body, best_of, engine.scheduler.max_queue)
        params = protocol.sampling_params(body)
        prompts = await run_in_threadpool(_encode, engine, body.prompt)

        queue: asyncio.Queue[list[Output]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            job = engine.submit(prompts, params, lambda outs: loop.call_soon_threadsafe(queue.put_nowait, outs),
                                best_of=best_of)  # fmt: skip
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None  # fmt: skip
        except EngineClosed as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts))

        reply = _Reply(engine, job, queue, metrics, model_name, arrival, body.logprobs is not None, n)
        if stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return EventSourceResponse(reply.stream(usage), headers=headers)
        return JSONResponse(await reply.whole(request))

    app.include_router(v1)
    app.router.routes.extend(extra_routes)
    return app


def _check_combinations(body: protocol.CompletionRequest, n: int, best_of: int, stream: bool) -> None:
    """The rules between fields that a field's own limits cannot say."""
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported: GPT-2 was not trained to fill in the middle", param="suffix")
    if best_of < n:
        raise APIError(400, f"best_of={best_of} must be >= n={n}", param="best_of")
    if stream and best_of > n:
        raise APIError(400, f"best_of={best_of} > n={n} cannot be streamed (the best are known only at the end)",
                       param="best_of")  # fmt: skip
    if body.stream_options is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if (body.min_tokens or 0) > max_tokens:
        raise APIError(400, f"min_tokens={body.min_tokens} must be <= max_tokens={max_tokens}", param="min_tokens")


def _check_queue(body: protocol.CompletionRequest, best_of: int, max_queue: int) -> None:
    """The engine's own check that a request fits the queue, in the fields the client sent."""
    prompts = len(body.prompt)
    if prompts * best_of <= max_queue:
        return
    if best_of == 1:
        raise APIError(400, f"{prompts} prompts exceed the queue of {max_queue}: send at most {max_queue}", param="prompt")
    name = "best_of" if body.best_of is not None else "n"
    raise APIError(400, f"{prompts} prompt(s) x {name}={best_of} = {prompts * best_of} sequences exceed the queue "
                   f"of {max_queue}", param=name)  # fmt: skip


def _encode(engine: Engine, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each prompt; an empty string is <|endoftext|>, where GPT-2 documents begin."""
    tok = engine.tokenizer
    return [p if isinstance(p, list) else tok.encode(p) if p else [tok.eos_token_id] for p in prompts]


class _Reply:
    """The outputs of one submitted request, turned into a response or a stream of chunks."""

    def __init__(
        self, engine: Engine, job: EngineRequest, queue: asyncio.Queue, metrics: Metrics, model: str,
        arrival: float, logprobs: bool, n: int,
    ) -> None:  # fmt: skip
        self.engine, self.job, self.queue, self.metrics = engine, job, queue, metrics
        self.id, self.created, self.model = protocol.completion_id(), protocol.now(), model
        self.arrival, self.n = arrival, n
        self.choices = {s.index: protocol.Choice(s.index, logprobs) for s in job.sequences}
        self.prompt_tokens = sum(len(p) for p in job.prompts)
        self._first: float | None = None
        self._last: dict[int, float] = {}
        self.complete = False  # every sequence finished (or the engine failed the request)

    async def outputs(self, request: Request | None = None) -> AsyncIterator[Output]:
        """Every output until each sequence has finished (or an ErrorOutput). With ``request``,
        the client is checked every DISCONNECT_POLL_SECONDS whether outputs arrive or not (a
        busy request gets outputs all the time), and the job dropped once it went away."""
        live = len(self.job.sequences)
        next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
        while live and not self.complete:
            outs: list[Output] | None = None
            try:
                outs = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS) if request else await self.queue.get()
            except asyncio.TimeoutError:  # (TimeoutError itself only from Python 3.11)
                pass
            if request is not None and (outs is None or time.monotonic() >= next_check):
                next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
                if await request.is_disconnected():
                    self.engine.abort(self.job)
                    return
            for o in outs or ():
                self._observe(o)
                if isinstance(o, ErrorOutput):
                    self.complete = True
                elif isinstance(o, TokenOutput) and o.finish_reason is not None:
                    live -= 1
                    self.complete = live == 0
                yield o
                if isinstance(o, ErrorOutput):
                    return

    def _observe(self, o: Output) -> None:
        if not isinstance(o, TokenOutput) or o.token_id is None:
            return
        now = time.monotonic()
        if self._first is None:
            self._first = now
            self.metrics.ttft.observe(now - self.arrival)
        last = self._last.get(o.index)
        if last is not None:
            self.metrics.itl.observe(now - last)
        self._last[o.index] = now
        self.metrics.completion_tokens.inc()

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, sum(c.num_tokens for c in self.choices.values()))

    async def whole(self, request: Request) -> dict:
        """The complete response (best_of > n: the n best per prompt by log-prob per token)."""
        async for o in self.outputs(request):
            if isinstance(o, ErrorOutput):
                raise APIError(500, o.message, type="server_error")
            self.choices[o.index].add(o)
        best_of = self.job.best_of
        chosen = []
        for i in range(len(self.job.prompts)):
            group = [self.choices[i * best_of + j] for j in range(best_of)]
            if best_of > self.n:
                group = sorted(group, key=lambda c: c.mean_logprob, reverse=True)[: self.n]
            chosen += [c.json(index=i * self.n + j) for j, c in enumerate(group)]
        return protocol.completion(self.id, self.created, self.model, chosen, self.usage())

    async def stream(self, include_usage: bool) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per output with text, log-probs or a finish_reason,
        an error object if the engine failed the request, the usage if asked, then [DONE]."""
        try:
            async for o in self.outputs():
                if isinstance(o, ErrorOutput):
                    yield _sse(protocol.error_body(o.message, "server_error"))
                    break
                part = self.choices[o.index].add(o)
                finish = o.finish_reason if isinstance(o, TokenOutput) else None
                if not o.text and part is None and finish is None:
                    continue  # nothing a client can see (a held-back or partial character)
                choice = {"text": o.text, "index": o.index, "logprobs": part, "finish_reason": finish}
                yield _sse(protocol.completion(self.id, self.created, self.model, [choice], None, include_usage))
            if include_usage:
                yield _sse(protocol.completion(self.id, self.created, self.model, [], self.usage()))
            yield format_sse_event(data_str="[DONE]")
        finally:
            if not self.complete:  # the client went away mid-stream: free its slots
                self.engine.abort(self.job)


def _sse(obj: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


class _App(FastAPI):
    """FastAPI with pure ASGI layers outside its whole stack: the status counter (so it counts
    every answer), CORS (so that every answer, a 401 too, carries its headers: a browser shows
    a page the error instead of a CORS failure), the API key check (so nothing is read or
    parsed for a client without the key) and the declared-size check (before FastAPI's own
    body limit)."""

    def build_middleware_stack(self) -> ASGIApp:
        inner = _DeclaredTooLarge(super().build_middleware_stack())
        if self.state.api_key is not None:
            inner = _RequireKey(inner, self.state.api_key)
        if self.state.cors_origin:
            inner = _CORS(inner, allow_origins=[self.state.cors_origin], allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type"])  # fmt: skip
        return _CountStatus(inner, self.state.metrics)


class _CORS(CORSMiddleware):
    """Starlette's CORS, with OpenAI's error body for a refused preflight (not plain text)."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return APIError(400, f"{response.body.decode()} for this server (--cors-origin)", code="cors_refused",
                        headers=headers).response()  # fmt: skip


PROTECTED = ("/v1/", "/api/")  # what --api-key guards: every route that runs the model


class _RequireKey:
    """401 for an API request (/v1, and the explorer's /api) without ``Authorization: Bearer
    <key>``, before anything else (the body is not even read), the key compared in constant
    time. Pages and static files (/explore, /health) hold no model output: they stay
    open, and the explorer page sends the key on its own API calls."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED) and scope["method"] != "OPTIONS":
            value = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                message = "Missing API key: send the header 'Authorization: Bearer <key>'"
                return await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
            if not secrets.compare_digest(token.strip(), self.key):
                return await APIError(401, "Incorrect API key provided", code="invalid_api_key").response()(scope, receive, send)
        await self.app(scope, receive, send)


class _DeclaredTooLarge:
    """413 with OpenAI's body for a Content-Length over the limit, before FastAPI reads it.

    FastAPI's ``max_body_size`` enforces the limit on the bytes read (a chunked body too), but
    for a declared length it answers with its own plain-text 413. And answering at once is not
    enough: a client that is still sending its body meets a closed socket (a broken pipe, a
    reset) instead of the answer. So the body is read and dropped first, up to DRAIN_BYTES
    (what the client sent is not kept), then the 413 goes out and the client can read it.
    """

    DRAIN_BYTES = 64 * MAX_BODY_BYTES

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                drained = 0
                while drained < min(int(length), self.DRAIN_BYTES):
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left
                    drained += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
                text = f"The request body of {int(length)} bytes is larger than the limit of {MAX_BODY_BYTES} bytes"
                return await APIError(413, text).response()(scope, receive, send)
        await self.app(scope, receive, send)


class _CountStatus:
    """Counts /v1 responses by status for /metrics (a pure ASGI middleware: no buffering)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
