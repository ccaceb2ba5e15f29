"""The FastAPI application: the page, the WebUI's ``/sdapi/v1`` routes, basic auth, a body-size limit,
and errors that are always one-line JSON 4xx answers for bad input (never a traceback)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from inkwash.errors import InkwashError
from inkwash.serve.config import ServeOptions
from inkwash.serve.generation import PreviewCache, plan_request, run_plan
from inkwash.serve.models import ModelStore, find_models
from inkwash.serve.requests import (
    GenerationResponse,
    Img2ImgRequest,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from inkwash.serve.webui import FieldError, decode_image, parse_infotext, png_text, sampler_list, schedule_list
from inkwash.serve.worker import QueueFull, Worker

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("inkwash.serve")


class ModelUnavailable(Exception):
    """A model on the server's list that cannot be loaded (a server-side problem: 503)."""


def error_response(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail if detail is not None else message}, status, headers)


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with a 413, whether or not it declares its length,
    before any of it reaches a route."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = {"error": f"the request body is over {self.limit} bytes", "detail": "body too large"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_json(send, 413, too_big)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class BasicAuth:
    """HTTP basic auth on every route, the page and ``/docs`` included (the WebUI's ``--api-auth``)."""

    def __init__(self, app, credentials: dict[str, str]) -> None:
        self.app = app
        self.credentials = {user.encode(): password.encode() for user, password in credentials.items()}

    def _allowed(self, header: bytes | None) -> bool:
        if not header or not header.lower().startswith(b"basic "):
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        expected = self.credentials.get(user)
        return bool(sep) and expected is not None and secrets.compare_digest(password, expected)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self._allowed(dict(scope["headers"]).get(b"authorization")):
            body = {"error": "authentication required (HTTP basic auth)", "detail": "Unauthorized"}
            return await _send_json(send, 401, body, [(b"www-authenticate", b'Basic realm="inkwash"')])
        return await self.app(scope, receive, send)


def _validation_message(errors: list[dict]) -> tuple[int, str]:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return 400, "the body is not valid JSON"
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc and first.get("type") == "missing":
        return 400, "the body must be a JSON object"
    field = ".".join(loc) or "body"
    return 422, f"{field}: {first.get('msg', 'invalid value')}"


def _clean(errors: list[dict]) -> list[dict]:
    """Validation errors without the echoed input (which may be megabytes of base64)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(list(exc.errors()))
        return error_response(status, message, _clean(list(exc.errors())))

    @app.exception_handler(FieldError)
    async def on_field(_: Request, exc: FieldError) -> JSONResponse:
        return error_response(422, str(exc), [{"loc": ["body", *exc.field.split(".")], "msg": exc.message}])

    @app.exception_handler(InkwashError)
    async def on_inkwash(_: Request, exc: InkwashError) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(QueueFull)
    async def on_full(_: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, "the queue is full; try again shortly", headers={"Retry-After": "1"})

    @app.exception_handler(ModelUnavailable)
    async def on_unavailable(_: Request, exc: ModelUnavailable) -> JSONResponse:
        return error_response(503, str(exc))

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404 / 405
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_other(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}")


def create_app(options: ServeOptions) -> FastAPI:
    """The server's application: its models are found now, each loaded on first use and kept."""
    options.validate()
    store = ModelStore(
        find_models(options.checkpoint, options.models), device=options.device, precision=options.precision
    )
    worker = Worker(options.queue_size)
    previews = PreviewCache()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.close()

    app = FastAPIOffline(  # a FastAPI app whose /docs and /redoc pages load their scripts from this server
        title="inkwash",
        description="Sample inkwash diffusion models: the Stable Diffusion WebUI's API (a compatible subset).",
        lifespan=lifespan,
    )
    app.state.store, app.state.worker, app.state.options = store, worker, options
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=int(options.max_body_mb * 1024 * 1024))
    credentials = options.credentials()
    if credentials:
        app.add_middleware(BasicAuth, credentials=credentials)

    def load(name: str, progress) -> None:
        try:
            store.pipeline(name)
        except (InkwashError, OSError) as exc:
            raise ModelUnavailable(f"model {name!r} cannot be loaded: {exc}") from None

    async def generate(kind: str, request: Txt2ImgRequest | Img2ImgRequest) -> dict:
        plan = await run_in_threadpool(plan_request, kind, request, store, options)

        def run(progress) -> dict:
            load(plan.model, progress)
            return run_plan(plan, store, progress, options.save_dir)

        return await asyncio.wrap_future(worker.submit(run, kind))

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse, tags=["WebUI API"])
    async def txt2img(request: Txt2ImgRequest) -> dict:
        """Text (class) to image."""
        return await generate("txt2img", request)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse, tags=["WebUI API"])
    async def img2img(request: Img2ImgRequest) -> dict:
        """Image to image, and inpainting with a mask (white regenerates)."""
        return await generate("img2img", request)

    @app.get("/sdapi/v1/samplers", tags=["WebUI API"])
    async def samplers() -> list[dict]:
        return sampler_list()

    @app.get("/sdapi/v1/schedulers", tags=["WebUI API"])
    async def schedulers() -> list[dict]:
        return schedule_list()

    @app.get("/sdapi/v1/sd-models", tags=["WebUI API"])
    async def sd_models() -> list[dict]:
        items = []
        for name in store.names:
            sha256 = await run_in_threadpool(store.sha256, name)
            checkpoint = store.entry(name).checkpoint
            items.append(
                {
                    "title": store.title(name),
                    "model_name": name,
                    "hash": sha256[:10],
                    "sha256": sha256,
                    "filename": str(checkpoint),
                    "config": None,
                }
            )
        return items

    @app.get("/sdapi/v1/options", tags=["WebUI API"])
    async def get_options() -> dict:
        return {"sd_model_checkpoint": store.current, "samples_format": "png", "sd_checkpoint_hash": None}

    @app.post("/sdapi/v1/options", tags=["WebUI API"])
    async def set_options(body: dict[str, Any] = Body(...)) -> dict:  # noqa: B008
        """Only ``sd_model_checkpoint`` (a name from ``sd-models``, its title too) has an effect."""
        name = body.get("sd_model_checkpoint")
        if name is not None:
            name = await run_in_threadpool(store.by_title, name)
            if not isinstance(name, str) or name not in store.entries:
                raise FieldError("sd_model_checkpoint", f"unknown model {name!r}; choose from {', '.join(store.names)}")
            await asyncio.wrap_future(worker.submit(lambda progress: load(name, progress), "load model"))
            store.current = name
        return {}

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["WebUI API"])
    async def progress(skip_current_image: bool = False) -> dict:
        snapshot = worker.progress.snapshot()
        preview, decode, key = snapshot.pop("preview"), snapshot.pop("decode"), snapshot.pop("preview_key")
        state = snapshot["state"]
        snapshot["current_image"] = (
            None if skip_current_image else await run_in_threadpool(previews.png, preview, decode, key)
        )
        snapshot["textinfo"] = (
            f"Sampling step {state['sampling_step']}/{state['sampling_steps']}" if state["job"] else None
        )
        return snapshot

    @app.post("/sdapi/v1/interrupt", tags=["WebUI API"])
    async def interrupt() -> dict:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse, tags=["WebUI API"])
    async def png_info(request: PngInfoRequest) -> dict:
        image = await run_in_threadpool(decode_image, request.image, "image")
        texts = png_text(image)
        info = texts.pop("parameters", "")
        return {"info": info, "items": texts, "parameters": parse_infotext(info) if info else {}}

    @app.get("/sdapi/v1/scripts", tags=["WebUI API"])
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    for path in ("sd-vae", "upscalers", "prompt-styles", "loras", "hypernetworks"):
        app.add_api_route(f"/sdapi/v1/{path}", _empty_list, methods=["GET"], tags=["WebUI API"])

    @app.get("/inkwash/v1/model", tags=["inkwash"])
    async def model_info(name: str | None = None) -> dict:
        """What the page needs to know of a model: its size (a text-conditional model's default size), classes,
        whether it takes a text prompt, limits and default steps."""
        try:
            entry = store.entry(name)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        channels, height, width = entry.shape
        from inkwash.sampling.options import DEFAULT_STEPS
        from inkwash.sampling.samplers import SAMPLERS

        return {
            "name": entry.name,
            "width": width,
            "height": height,
            "channels": channels,
            "classes": entry.classes,
            "kind": entry.kind,
            "text_conditional": entry.text_conditional,
            "size_multiple": entry.size_multiple if entry.text_conditional else None,
            "max_pixels": options.max_pixels if entry.text_conditional else None,
            "max_steps": min(options.max_steps, entry.num_steps),
            "max_batch_size": options.max_batch_size,
            "max_images": options.max_images,
            "default_steps": {info.display_name: DEFAULT_STEPS.get(info.id, 20) for info in SAMPLERS.values()},
        }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _empty_list() -> list:
    return []


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; an address in use or not available is a one-line ``InkwashError``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InkwashError(f"cannot resolve --host {host}: {exc.strerror}") from None
    family, kind, protocol, _, address = infos[0]
    # The protocol must be TCP's own number: asyncio turns TCP_NODELAY on only for connections accepted
    # from such a socket, and without it Nagle's algorithm holds each reply on a kept-alive connection
    # for the client's delayed ACK (about 40 ms).
    sock = socket.socket(family, kind, protocol or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InkwashError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, benchmarks): ``with ServerThread(app) as s:``
    then ``s.url``. Port 0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.socket = bind(host, port)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
