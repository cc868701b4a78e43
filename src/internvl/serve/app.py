"""The OpenAI-compatible HTTP server (SERVING.md): `create_app(model_or_engine, config)` -> a FastAPI app.

    app = create_app()                                   # the shipped demo model, loaded in the background
    app = create_app(engine, ServerConfig(api_keys=("sk-1",)))
    app = create_app(model, ServerConfig(), tokenizer=tok)
    uvicorn.run(app, host="127.0.0.1", port=23333)       # or `internvl serve` (runner.py: drains on SIGTERM)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health (readiness), GET /live
(liveness), GET /metrics (Prometheus), GET / and /static/* (the web chat page, when shipped), /docs, /openapi.json.

A generation request goes: body cap -> JSON -> schema (protocol.py) -> model id -> readiness -> prompt, media and
token counts (prompts.py) -> context check -> admission (generation.py) -> first token -> response. Everything up to
the first token happens before the status line, so every client mistake is a 4xx envelope and never a stream that
fails later (§3). Errors become envelopes only at the boundary: the exception handlers here, the catch-all in
`asgi.RequestContext`, and the in-stream error event of `generation.stream_events`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from internvl.serve import schema
from internvl.serve.asgi import APIKeyAuth, ClientDisconnected, EventStream, RequestContext, read_body, until_disconnect
from internvl.serve.backend import InFlight, ServerState
from internvl.serve.config import ServerConfig
from internvl.serve.errors import APIError, ErrorCode
from internvl.serve.generation import Call, collect, engine_params, first_event, merge, new_id, stream_events, submit
from internvl.serve.metrics import CONTENT_TYPE, ServerMetrics
from internvl.serve.prompts import completion_budget, prepare_chat, prepare_completion
from internvl.serve.protocol import parse_chat_request, parse_completion_request, parse_json_object

log = logging.getLogger("internvl.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/health", "/live")
# The web page's own files hold no data and must load before its user can type a key (the page sends it as Bearer).
PAGE_PATHS = ("/",) + tuple(f"/static/{p.name}" for p in sorted(STATIC_DIR.glob("*")) if p.is_file())
GLOBAL_FETCH_LIMIT = 32  # concurrent media fetches across all requests (§5.3 step 9)


def create_app(model_or_engine=None, config: ServerConfig | None = None, *, tokenizer=None) -> FastAPI:
    """model_or_engine: an `Engine` (with a tokenizer), a model (+ `tokenizer=`), a checkpoint path, None (the
    shipped demo model) or a zero-argument loader returning one of those (or a (model, tokenizer) pair)."""
    config = config or ServerConfig()
    policy = config.media_policy()
    state = ServerState(config, model_or_engine, tokenizer)
    metrics = ServerMetrics(state)
    limits: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits["fetch"] = asyncio.Semaphore(GLOBAL_FETCH_LIMIT)
        if config.host not in ("127.0.0.1", "localhost", "::1") and not config.auth_enabled:
            log.warning("serving on %s without an API key: anyone who can reach it can use the model", config.host)
        state.start_loading()
        yield
        await state.drain(0)  # after a SIGTERM the runner has drained already; otherwise abort what is left
        await asyncio.to_thread(state.stop_engine)

    app = FastAPI(title="InternVL OpenAI-compatible API", version="1", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.server = state
    app.state.metrics = metrics

    # ------------------------------------------------------------------------------------------ middleware
    open_paths = (OPEN_PATHS if config.metrics_require_auth else OPEN_PATHS + ("/metrics",)) + PAGE_PATHS
    app.add_middleware(APIKeyAuth, keys=config.api_keys, open_paths=open_paths)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    app.add_middleware(RequestContext, metrics=metrics)

    # ------------------------------------------------------------------------------------------ errors
    def error_response(request: Request, err: APIError) -> JSONResponse:
        metrics.errors.labels(err.code).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return error_response(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            err = APIError(ErrorCode.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}.",
                           headers=exc.headers)
        elif exc.status_code == 404:
            err = APIError(ErrorCode.NOT_FOUND, f"No route for {request.method} {request.url.path}.")
        else:  # any other framework status keeps its number, in the envelope
            err = APIError(ErrorCode.INVALID_REQUEST, str(exc.detail))
            return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)
        return error_response(request, err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        err = APIError(ErrorCode.INVALID_REQUEST, first.get("msg", "invalid request"), param=".".join(loc) or None)
        return error_response(request, err)

    # ------------------------------------------------------------------------------------------ bookkeeping
    def finish(call: Call) -> None:
        state.inflight.pop(call.completion_id, None)
        now = time.monotonic()
        if call.admitted:
            metrics.prompt_tokens.inc(call.prompt_tokens)
            metrics.image_tiles.inc(call.num_tiles)
            metrics.generation_tokens.inc(call.completion_tokens)
            metrics.latency.observe(now - call.arrived)
            if call.first_event_at is not None:
                metrics.queue_wait.observe(call.first_event_at - call.submitted_at)
        if not call.abort_reason and "abort" in call.finish_reasons.values() and state.status == "draining":
            call.abort_reason = "shutdown"
        if call.abort_reason:
            metrics.aborts.labels(call.abort_reason).inc()
        if config.log_requests:
            def secs(t):
                return f"{t - call.arrived:.3f}" if t is not None else "-"

            log.info("request id=%s status=%s kind=%s prompt_tokens=%d completion_tokens=%d images=%d tiles=%d "
                     "queue_wait=%s ttft=%s total=%.3f finish=%s abort=%s error=%s", call.request_id, call.status,
                     call.kind, call.prompt_tokens, call.completion_tokens, call.num_images, call.num_tiles,
                     f"{call.first_event_at - call.submitted_at:.3f}" if call.first_event_at and call.submitted_at
                     else "-", secs(call.first_token_at), now - call.arrived,
                     ",".join(sorted(set(call.finish_reasons.values()))) or "-", call.abort_reason or "-",
                     call.error_code or "-")

    async def start(call: Call, req, backend):
        """Prompt -> admission -> the first engine event. Returns (streams, events, first)."""
        if call.kind == "chat":
            prepared = await prepare_chat(req, backend, config, policy, limits.get("fetch"),
                                          lambda e: metrics.media_failures.labels(e.reason).inc())
            jobs = [(prepared.prompt_ids, prepared.pixel_values, prepared.num_patches_list or None)]
            call.num_images, call.num_tiles = prepared.num_images, prepared.num_tiles
        else:
            jobs = [(await prepare_completion(p, backend), None, None) for p in req.prompts]
            if req.echo:
                call.echo = tuple(p if isinstance(p, str) else backend.tokenizer.decode(list(p)) for p in req.prompts)
        budgets = [completion_budget(len(ids), req.sampling.max_tokens, backend, config) for ids, _, _ in jobs]
        if req.sampling.n > backend.engine.scheduler.max_batch_size:
            raise APIError(ErrorCode.INVALID_REQUEST, f"n={req.sampling.n} exceeds this server's batch size "
                           f"{backend.engine.scheduler.max_batch_size}.", param="n")
        call.prompt_tokens = sum(len(ids) for ids, _, _ in jobs)
        state.check_ready()  # a drain may have begun while the media were fetched
        ids_for = [call.completion_id] if len(jobs) == 1 else [f"{call.completion_id}-{k}" for k in range(len(jobs))]
        flight = state.inflight[call.completion_id] = InFlight(call.request_id)
        streams = []
        call.submitted_at = time.monotonic()
        try:
            for eid, (ids, pv, patches), budget in zip(ids_for, jobs, budgets):
                streams.append(await submit(backend.engine, eid, ids, engine_params(req.sampling, budget), pv, patches))
                flight.engine_ids.append(eid)
            call.admitted = True
            events = merge(streams, req.sampling.n)
            first = await first_event(call, events, config.queue_timeout)
        except BaseException:
            for s in streams:
                await s.aclose()
            state.inflight.pop(call.completion_id, None)
            raise
        return streams, events, first

    async def generate(request: Request, kind: str):
        call = Call(request.state.request_id, new_id("chatcmpl" if kind == "chat" else "cmpl"), state.model_name, kind)
        streaming = False
        try:
            body = parse_json_object(await read_body(request, config.max_body_bytes))
            req = (parse_chat_request if kind == "chat" else parse_completion_request)(body, config)
            if req.model != state.model_name:
                raise APIError(ErrorCode.MODEL_NOT_FOUND, f"The model {req.model!r} does not exist on this server; "
                               f"it serves {state.model_name!r}.", param="model")
            backend = state.check_ready()
            call.stream, call.include_usage, call.n = req.stream, req.include_usage, req.sampling.n
            call.logprobs = req.sampling.logprobs
            total = req.sampling.n * (1 if kind == "chat" else len(req.prompts))

            if not req.stream:
                async def run():
                    streams, events, first = await start(call, req, backend)
                    try:
                        return await collect(call, first, events, backend, metrics, state, total)
                    finally:
                        await events.aclose()
                        for s in streams:
                            await s.aclose()

                result = await until_disconnect(request.receive, run())
                return JSONResponse(result)

            streams, events, first = await until_disconnect(request.receive, start(call, req, backend))

            async def on_close(disconnected: bool) -> None:
                await events.aclose()
                for s in streams:
                    await s.aclose()
                if disconnected and len(call.finish_reasons) < total:
                    call.abort_reason = "client_disconnect"
                    call.status = 499
                finish(call)

            streaming = True
            return EventStream(stream_events(call, first, events, backend, metrics, total), on_close, headers={})
        except ClientDisconnected:
            call.abort_reason, call.status = "client_disconnect", 499
            return Response(status_code=499)
        except APIError as e:
            call.status, call.error_code = e.status, e.code
            raise
        except BaseException:
            call.status = 500
            raise
        finally:
            if not streaming:
                finish(call)

    # ------------------------------------------------------------------------------------------ routes
    errors = schema.error_responses(400, 401, 404, 413, 429, 500, 503)

    @app.post("/v1/chat/completions", tags=["openai"], openapi_extra=schema.request_body(schema.ChatCompletionRequest),
              responses={**schema.stream_response(schema.ChatCompletion, schema.ChatCompletionChunk), **errors})
    async def chat_completions(request: Request):
        """Chat with text, images (image_url) and videos (video_url, or a frame list); streaming or not."""
        return await generate(request, "chat")

    @app.post("/v1/completions", tags=["openai"], openapi_extra=schema.request_body(schema.CompletionRequest),
              responses={**schema.stream_response(schema.Completion, schema.Completion), **errors})
    async def completions(request: Request):
        """Raw prompt completion (no chat template, text only)."""
        return await generate(request, "completion")

    def model_card() -> dict:
        backend = state.backend
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "internvl",
                "max_model_len": backend.context_len if backend is not None else None}

    @app.get("/v1/models", tags=["openai"], response_model=schema.ModelList, responses=schema.error_responses(401))
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", tags=["openai"], response_model=schema.ModelCard,
             responses=schema.error_responses(401, 404))
    async def get_model(model_id: str):
        if model_id != state.model_name:
            raise APIError(ErrorCode.MODEL_NOT_FOUND, f"The model {model_id!r} does not exist on this server; it "
                           f"serves {state.model_name!r}.", param="model")
        return model_card()

    @app.get("/health", tags=["ops"], response_model=schema.Health, responses=schema.error_responses(503))
    async def health():
        """Readiness: 200 when requests can be served; 503 model_loading / shutting_down / engine_dead."""
        state.check_ready()
        return {"status": "ok"}

    @app.get("/live", tags=["ops"], response_model=schema.Health, responses=schema.error_responses(503))
    async def live():
        """Liveness: 503 only when the engine is dead (a draining server is alive)."""
        if state.engine_dead or state.status == "failed":
            state.check_ready()
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise APIError(ErrorCode.NOT_FOUND, "No web page is installed on this server; use the /v1 API.")
        return FileResponse(page)

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    _add_request_schemas(app)
    return app


def _add_request_schemas(app: FastAPI) -> None:
    """Put the request models (documented via openapi_extra) and the stream chunk into the schema's components."""
    original = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = original()
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in schema.DOCUMENTED_MODELS:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[model.__name__] = js
        # validation errors are 400s here (§2.2), never FastAPI's 422
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
