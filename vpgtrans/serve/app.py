"""The FastAPI app: OpenAI-compatible chat completions, model list, health, and the chat page at `/`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job
from .schema import ApiError, ChatRequest, conversation

STATIC = resources.files("vpgtrans.serve") / "static"


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with a 413, reading no more than needed."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:  # the HTTP parser holds the client to the length it declared
            if declared.isdigit() and int(declared) > self.limit:
                return await self._refuse(receive, send)
            return await self.app(scope, receive, send)
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        # Chunked: no length up front, so read the body here (it is buffered downstream anyway) and count it.
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                return await self._refuse(receive, send, more=message.get("more_body", False))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Any, send: Any, more: bool = True) -> None:
        # Read (and drop) what the client is still sending, up to a bound, so it gets to read our answer
        # instead of a connection reset; past the bound the connection is simply closed after the reply.
        drained = 0
        while more and drained < 4 * self.limit + (64 << 20):
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        error = ApiError(413, f"request body is larger than this server's limit of {self.limit} bytes "
                              "(--max-body-mb): send a smaller image", code="request_too_large")
        await JSONResponse(error.body(), status_code=413)({"type": "http"}, receive, send)


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request: it is not valid JSON "
                             f"({first.get('ctx', {}).get('error', 'malformed')})", code="invalid_json")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {loc[-1] if loc else '?'}", param=param,
                        code="unknown_parameter")
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, model_id: str, info: dict[str, Any], *, max_body_bytes: int = 20 << 20,
               max_image_pixels: int = 25_000_000) -> Any:
    """The ASGI app (FastAPI inside a body-size limit) serving `engine`'s model as `model_id`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="vpgtrans serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    limits = {"context_tokens": engine.context, "image_soft_prompts": engine.soft_prompts,
              "max_body_bytes": max_body_bytes, "max_image_pixels": max_image_pixels, "images_per_conversation": 1,
              "max_batch": engine.max_batch, "max_queue": engine.max_queue}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        error = ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/info")
    async def model_info() -> dict[str, Any]:
        return {"id": model_id, **info, "limits": limits}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "vpgtrans"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        if body.model != model_id:
            raise ApiError(404, f"The model '{body.model}' does not exist: this server serves '{model_id}'",
                           param="model", code="model_not_found")
        stops = body.stops()
        conv = await run_in_threadpool(conversation, body, max_image_pixels)  # decoding an image is CPU work
        if conv.prompt_chars > 64 * engine.context:  # no tokenizer needed to see this cannot fit
            raise ApiError(400, f"This model's maximum context length is {engine.context} tokens; your messages "
                                f"have {conv.prompt_chars} characters. Please reduce the length of the messages.",
                           param="messages", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        temperature = 1.0 if body.temperature is None else body.temperature
        job = Job(conv, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                  max_tokens=body.max_completion_tokens or body.max_tokens, temperature=temperature,
                  top_p=1.0 if body.top_p is None else body.top_p, stop=stops, seed=body.seed)
        engine.submit(job)
        try:
            first = await events.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first[0] == "error":
            raise first[1]
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": reply_id, "created": now, "model": model_id}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(job, events, head, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while (event := await events.get())[0] == "delta":
                pass
        finally:
            job.cancelled.set()  # a no-op once done; stops the decoding if this request was abandoned
        if event[0] == "error":
            raise event[1]
        _, text, reason, prompt_tokens, completion_tokens = event
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def _stream(job: Job, events: asyncio.Queue, head: dict, usage: bool) -> AsyncIterator[str]:
        chunk = {**head, "object": "chat.completion.chunk"}
        sent = ""
        try:
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
            while True:
                event = await events.get()
                if event[0] == "error":
                    yield _sse(event[1].body())
                    break
                text = event[1] if event[0] == "delta" else event[1][len(sent):] if event[1].startswith(sent) else ""
                if text:
                    sent += text
                    yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
                if event[0] == "done":
                    _, _, reason, prompt_tokens, completion_tokens = event
                    yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
                    if usage:
                        yield _sse({**chunk, "choices": [], "usage": {
                            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away (or we are done): stop decoding for it

    return BodyLimit(app, max_body_bytes)


def describe(model_dir: str) -> dict[str, Any]:
    """What the page shows about a model directory: its components, template, and where its VPG came from."""
    from ..checkpoint import read_manifest

    manifest = read_manifest(model_dir)
    spec = manifest.get("spec", {})
    parts = {kind: {k: spec.get(kind, {}).get(k) for k in ("name", "path") if spec.get(kind, {}).get(k)}
             for kind in ("vision", "vpg", "llm")}
    origin: dict[str, Any] = {}
    if "transfer" in manifest:
        origin = {"kind": "VPGTrans transfer", **{k: v for k, v in manifest["transfer"].items()
                                                  if isinstance(v, (str, int, float))}}
    elif "training" in manifest:
        origin = {"kind": "trained", **{k: v for k, v in manifest["training"].items()
                                        if isinstance(v, (str, int, float))}}
    return {"components": parts, "template": spec.get("template") or {}, "lora": bool(spec.get("lora")),
            "origin": origin}


def app_for_model_dir(model_dir: str, *, device: str = "auto", model_id: str | None = None, max_batch: int = 8,
                      max_queue: int = 64, max_tokens: int = 256, context: int | None = None,
                      max_body_bytes: int = 20 << 20, max_image_pixels: int = 25_000_000) -> tuple[Any, Engine, str]:
    """(ASGI app, engine, model id) for a vpgtrans model directory, loaded onto `device`."""
    from pathlib import Path

    from ..checkpoint import load_model

    info = describe(model_dir)
    model = load_model(model_dir, device=device)  # in eval mode
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, default_max_tokens=max_tokens, context=context)
    model_id = model_id or Path(model_dir).resolve().name
    app = create_app(engine, model_id, info, max_body_bytes=max_body_bytes, max_image_pixels=max_image_pixels)
    return app, engine, model_id
