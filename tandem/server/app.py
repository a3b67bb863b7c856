"""The FastAPI application: routes, API key, health, metrics, and the model host behind them."""

from __future__ import annotations

import hmac
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.server import errors
from tandem.server.errors import APIError, bad_request
from tandem.server.host import Job, ModelHost, QueueFull
from tandem.server.metrics import CONTENT_TYPE
from tandem.server.ollama_models import router as ollama_models_router
from tandem.server.ollama_routes import router as ollama_router
from tandem.server.openai_routes import router as openai_router

OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/redoc", "/web")
WEB_DIR = Path(__file__).resolve().parent / "web"  # the chat page: static files, no build step
OPEN_EXACT = ("/",)


class Server:
    """What the routes need: the host, the served name, the context and the key."""

    def __init__(
        self,
        host: ModelHost,
        model_id: str,
        aliases: tuple[str, ...],
        ctx: int | None,
        api_key: str | None,
        model_path: str = "",
    ):
        self.host = host
        self.model_path = model_path
        self.model_id = model_id
        self.aliases = {model_id, *aliases}
        self.ctx_override = ctx
        self.api_key = api_key
        self.created = int(time.time())

    @property
    def ctx(self) -> int:
        limit = getattr(self.host.loaded.config, "max_position_embeddings", None) or 4096
        return min(self.ctx_override, limit) if self.ctx_override else limit

    def check_model(self, name: str) -> None:
        if name not in self.aliases and name.removesuffix(":latest") not in self.aliases:  # Ollama's tag
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server has {self.model_id!r}",
                code="model_not_found",
                param="model",
            )

    def admit(self, body):
        """A generation request's checks, in order: its own fields, the model's name, readiness.
        Returns the loaded model."""
        body.check()
        self.check_model(body.model)
        return self.require_ready()

    def require_ready(self):
        if self.host.state == "failed":
            raise APIError(503, f"the model failed to load: {self.host.error}", code="model_load_failed")
        if not self.host.ready:
            raise APIError(503, "the model is still loading", code="model_loading")
        return self.host.loaded

    def make_job(self, body, ids: list[int], endpoint: str, loop) -> Job:
        """Check the token budget against the context and queue the job."""
        limit, ctx = body.token_limit(), self.ctx
        if limit is None:
            limit = ctx - len(ids)
        if len(ids) + limit > ctx or limit < 1:
            raise bad_request(
                f"this model's context is {ctx} tokens; the prompt has {len(ids)} and {limit} more were requested",
                param="messages" if endpoint == "chat" else "prompt",
                code="context_length_exceeded",
            )
        job = Job(ids, limit, body.sampling(), body.stop_strings(), endpoint, loop)
        try:
            self.host.submit(job)
        except QueueFull:
            raise APIError(
                503, "the server is busy: too many requests are waiting", code="server_overloaded"
            ) from None
        return job


def create_app(server: Server) -> KeyAndCount:
    app = FastAPI(title="tandem", version="0.1.0", description="OpenAI-compatible API over one local model")
    app.state.server = server
    app.add_exception_handler(APIError, errors.api_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(Exception, errors.unexpected_error_handler)
    app.include_router(openai_router)
    app.include_router(ollama_router)
    app.include_router(ollama_models_router)
    app.mount("/web", StaticFiles(directory=WEB_DIR, html=True), name="web")
    metrics = server.host.metrics

    @app.get("/health")
    async def health() -> JSONResponse:
        host = server.host
        body = {"status": host.state, "model": server.model_id}
        if host.error:
            body["error"] = host.error
        return JSONResponse(body, status_code=200 if host.ready else 503)

    @app.get("/")
    async def root() -> Response:  # what Ollama answers there; clients probe it
        return Response("tandem is running", media_type="text/plain")

    @app.get("/web", include_in_schema=False)
    async def web() -> RedirectResponse:
        return RedirectResponse("/web/")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return KeyAndCount(app, server)


class KeyAndCount:
    """ASGI middleware: the API key on every path but the open ones, and requests counted by
    route and status. Plain ASGI, so streamed responses and disconnects pass straight through."""

    def __init__(self, app: FastAPI, server: Server):
        self.app, self.server = app, server
        self.state = app.state  # what tests and the CLI reach through the returned app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = self.server.host.metrics
        key = self.server.api_key
        path = scope["path"]
        open_path = path.startswith(OPEN_PATHS) or path in OPEN_EXACT
        if key and not open_path and not _key_ok(Request(scope), key):
            response = APIError(401, "missing or wrong API key", code="invalid_api_key").response(
                path.startswith("/api/")
            )
            await response(scope, receive, send)
            metrics.requests.labels(endpoint="unauthorized", status="401").inc()
            return
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()


def _key_ok(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        given = request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.strip().encode(), key.encode())


def model_names(path: Path | str | None, loaded_name: str | None = None) -> tuple[str, tuple[str, ...]]:
    """The id the API shows (the file's stem) and the other names it answers to."""
    stem = Path(str(path)).stem if path else "tandem"
    aliases = tuple(n for n in (Path(str(path)).name if path else None, loaded_name) if n)
    return stem, aliases
