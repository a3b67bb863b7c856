"""Errors as OpenAI's error objects: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, ollama: bool = False) -> JSONResponse:
        """OpenAI's error object, or Ollama's {"error": message} for its /api paths."""
        body = {"error": self.message} if ollama else self.body()
        return JSONResponse(body, status_code=self.status)


def _ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


async def api_error_handler(request: Request, error: APIError) -> JSONResponse:
    return error.response(_ollama(request))


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    # The first problem, as one line: where it is and what is wrong.
    problems = error.errors()
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON").response(_ollama(request))
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    text = f"{param}: {message}" if param else message
    return APIError(400, text, param=param).response(_ollama(request))


async def http_error_handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return APIError(error.status_code, str(error.detail)).response(_ollama(request))


async def unexpected_error_handler(request: Request, error: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(error).__name__}: {error}").response(_ollama(request))
