"""What a client sees when something goes wrong, and what the server log keeps.

- Every error body is `{"detail": ..., "request_id": ...}`. The request id is Serve's (`X-Request-ID`, which the
  proxy also returns as a response header); the server log has the traceback under the same id.
- Request bodies are limited (`ServeArgs.max_body_bytes`): larger ones get 413 before they are read or parsed.
- Validation errors (422) name the field (`loc`), the problem (`msg`) and its `type`, and never echo the input.
- Anything the endpoints did not expect is a short 500 with the request id, never a traceback.
"""
from __future__ import annotations

import json
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import logger

DEFAULT_MAX_BODY_BYTES = 1 << 20
_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MAX_LOC_CHARS = 64
_MAX_MSG_CHARS = 300

# The ingress sets this when it starts (ServeArgs.max_body_bytes); the middleware reads it per request.
LIMITS = {"max_body_bytes": DEFAULT_MAX_BODY_BYTES}


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from_scope(scope) -> str:
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        given = next((v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"x-request-id"), None)
        rid = given if given and _ID_OK.match(given) else new_request_id()
        state["request_id"] = rid
    return rid


def request_id(request: Request) -> str:
    return request_id_from_scope(request.scope)


def error_body(detail, rid: str) -> dict:
    return {"detail": detail, "request_id": rid}


def failure(what: str, rid: str) -> str:
    """The short message of a server-side failure."""
    return f"{what} failed; the server log has the details under request id {rid}"


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class GuardMiddleware:
    """Pure ASGI (streaming responses pass through untouched): request id, body size limit, last-resort 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id_from_scope(scope)
        limit = int(LIMITS["max_body_bytes"])
        length = next((v for k, v in scope.get("headers") or [] if k == b"content-length"), None)
        too_large = error_body(f"request body is larger than the limit of {limit} bytes", rid)
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_json(send, 400, error_body("bad content-length header", rid))
            if declared > limit:
                return await _send_json(send, 413, too_large)
        elif scope.get("method") in ("POST", "PUT", "PATCH"):     # chunked: read it here, up to the limit
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return await _send_json(send, 413, too_large)
                more = message.get("more_body", False)
            body, replayed = b"".join(chunks), False

            async def receive():  # noqa: F811 - replays the body that was read above
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return {"type": "http.disconnect"}

        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:  # noqa: BLE001 - logged with the request id; the client gets a short 500
            logger.exception("request %s: unhandled error in %s %s", rid, scope.get("method"), scope.get("path"))
            if not started:
                await _send_json(send, 500, error_body(failure("the request", rid), rid))


def _clean_error(e: dict) -> dict:
    loc = [x if not isinstance(x, str) or len(x) <= _MAX_LOC_CHARS else x[:_MAX_LOC_CHARS] + "..."
           for x in e.get("loc", ())]
    return {"loc": loc, "msg": str(e.get("msg", ""))[:_MAX_MSG_CHARS], "type": e.get("type")}


def validation_details(errors) -> list[dict]:
    """pydantic/FastAPI errors without their `input` (or `ctx`, which may hold it)."""
    return [_clean_error(e) for e in errors]


def install(api: FastAPI) -> None:
    """The error handlers and the guard middleware, on the ingress's FastAPI app."""

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(validation_details(exc.errors()), request_id(request)), status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.detail, request_id(request)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    api.add_middleware(GuardMiddleware)
