"""OpenAI-style errors: one exception type, one body shape, handlers that never leak a 500
for bad input.

Every error answer is `{"error": {"message", "type", "param", "code"}}` with a 4xx status for
the client's mistakes (FastAPI's 422 becomes 400, as OpenAI answers) and 5xx only for the
server's own failures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client as OpenAI's error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(exc: InvalidRequestError) -> APIError:
    """The engine's validation error as a 400 naming the field."""
    return APIError(400, str(exc), param=exc.param, code=_code_for(exc))


def _code_for(exc: InvalidRequestError) -> str | None:
    message = str(exc)
    if "context" in message or "KV cache" in message:
        return "context_length_exceeded"
    return None


def validation_error(errors: Sequence[Any]) -> APIError:
    """pydantic/FastAPI validation errors as one 400: the first error names the field."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json")
    param = field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    if kind == "missing":
        return APIError(400, message, param=param, code="missing_required_parameter")
    return APIError(400, message, param=param, code="invalid_type" if "type" in kind else None)


def field_path(loc: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "content")` → `messages[0].content`."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_union_tag(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _is_union_tag(part: Any) -> bool:
    """pydantic names union members in `loc` (`str`, `list[int]`, `function-after[...]`)."""
    text = str(part)
    return text in ("str", "int", "float", "bool") or "[" in text


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (while queued or generating)."""


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a request can raise to OpenAI's error body."""

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return bad_request(exc).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(ClientDisconnected)
    async def on_client_gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = 400 if exc.status_code == 422 else exc.status_code
        code = "request_too_large" if status == 413 else None  # a chunked body past the limit
        return APIError(status, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", type="server_error").response()
