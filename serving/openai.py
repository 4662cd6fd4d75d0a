"""OpenAI-compatible chat completions and models on the latentrag application: schemas, translation to and from the
app's own AnswerRequest / Answer, the streamed chunks and OpenAI's error shape.

    POST /v1/chat/completions   messages in; the last message must be the user's question
    GET  /v1/models             the served model (one), with its model and index versions
    GET  /v1/models/{id}

What is supported. `model` is the server's `model_name` (default "latentrag") or the served `model_version`;
`stream: true` sends `chat.completion.chunk` events ending with `data: [DONE]`; `max_tokens` (or
`max_completion_tokens`) caps the answer (at most MAX_NEW_TOKENS); `n` must be 1 (decoding is deterministic beam
search: n > 1 would be n copies); `temperature` and `seed` are accepted and have no effect, for the same reason;
`top_p` 1, penalties 0, `stop` null and `logprobs` false are accepted as the no-ops they are. Any other parameter
(tools, response_format, logit_bias, ...) is refused with 400 naming it. Earlier turns (system, developer as system,
assistant, older user messages) go into the prompt of a generator with a chat prompt (hf-causal with
`chat_template: true`: they precede the user turn that holds the passage and the question; retrieval reads the last
question alone; the oldest are left out when they would crowd the passage): then `latentrag.history_used` is true.
The copy-bart and seq2seq generators read one question over one passage and have no chat prompt: there
`history_used` is false and `latentrag.ignored_messages` counts the earlier messages (tool messages are never used).

The RAG extension. Requests may carry `latentrag: {mode, k, num_beams, return_passages}` (the openai client sends
it with `extra_body={"latentrag": {...}}`). Responses, and the final chunk of a stream (the one with
`finish_reason`), carry `latentrag: {mode, model_version, index_version, score, passages: [{id, title, text, score,
probability, posterior}], history_used, ignored_messages, request_id}`: `probability` is the retriever's p(z|x)
over the k passages, `posterior` p(z|x,y) (how much each passage explains the answer; RAG-Sequence only, null for
RAG-Token), `score` the retriever's raw score. With the openai client read it as `completion.latentrag` (pydantic
keeps unknown fields) or `completion.model_extra["latentrag"]`.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 invalid_request_error for bad
input (validation never echoes the input), 404 model_not_found, 503 for load and 500 server_error with the
request id (also the X-Request-ID header; the traceback is in Serve's log under it). Token usage is not reported
(`usage` is null).
"""
from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import errors
from serving.schemas import MAX_BEAMS, MAX_K, MAX_NEW_TOKENS, AnswerRequest, Mode

OWNED_BY = "latentrag"
# Routes whose errors take OpenAI's shape (the rest of the app keeps {detail, request_id}).
_OPENAI_PATH = re.compile(r"/v1/(chat/completions|models)(/|$)")
HISTORY_NOTE = ("earlier turns are not used: this generator reads one question (the last user message) over "
                "each retrieved passage and has no chat prompt")
TOOL_NOTE = "tool messages are not used: this server calls no tools"


# --------------------------------------------------------------------------------------------- errors
class OpenAIError(Exception):
    """An error to send in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param(loc) -> str | None:
    """pydantic's loc ("body", "messages", 0, "content") -> OpenAI's param "messages[0].content"."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool", "none") or "[" in str(part):
            continue                                # names of union members (str, list[ContentPart]), not fields
        else:
            out += ("." if out else "") + str(part)
    return out or None


def from_validation(errs) -> OpenAIError:
    """The first validation error as one OpenAI 400, without the input (errors.validation_details drops it)."""
    e = errors.validation_details(errs)[0]
    param = _param(e["loc"])
    if e["type"] == "extra_forbidden":
        return OpenAIError(400, f"Unsupported parameter: '{param}' is not supported by this server",
                           param=param, code="unsupported_parameter")
    if e["type"] == "json_invalid":
        return OpenAIError(400, "The request body is not valid JSON", code="invalid_json")
    return OpenAIError(400, f"Invalid value for '{param}': {e['msg']}" if param else e["msg"], param=param,
                       code="invalid_value")


def from_http(exc: StarletteHTTPException) -> OpenAIError:
    """The app's own HTTPExceptions (k out of range 422, overload 503, failures 500) in OpenAI's shape."""
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    status = 400 if exc.status_code == 422 else exc.status_code
    code = {503: "overloaded", 404: "not_found", 413: "request_too_large"}.get(status)
    return OpenAIError(status, detail, code=code, headers=getattr(exc, "headers", None))


def install(api: FastAPI) -> None:
    """Error handlers that answer OpenAI's shape on the OpenAI routes and defer to the app's own (errors.install,
    which must run first) everywhere else."""
    own_validation = api.exception_handlers[RequestValidationError]
    own_http = api.exception_handlers[StarletteHTTPException]

    def is_openai(request: Request) -> bool:
        return bool(_OPENAI_PATH.search(request.url.path))

    @api.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError):
        return exc.response()

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if is_openai(request):
            return from_validation(exc.errors()).response()
        return await own_validation(request, exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if is_openai(request):
            return from_http(exc).response()
        return await own_http(request, exc)


# --------------------------------------------------------------------------------------------- request
class ContentPart(BaseModel):
    """A part of a message's content; only text parts are read (to_answer_request refuses the others by name)."""
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, description="text, or a list of text parts")
    name: str | None = None

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(None, description="accepted; usage is not reported (null)")
    include_obfuscation: bool | None = None


class LatentragOptions(BaseModel):
    """The RAG settings of a chat request (the extension field `latentrag`)."""
    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("rag-sequence", description="rag-sequence or rag-token decoding")
    k: int | None = Field(None, ge=1, le=MAX_K, description="passages retrieved (default: the server's default_k)")
    num_beams: int = Field(1, ge=1, le=MAX_BEAMS)
    return_passages: bool = Field(True, description="include the passages in the `latentrag` field")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="the server's model name (GET /v1/models) or its model_version")
    messages: list[ChatMessage] = Field(..., description="the last message is the user's question")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, description="must be 1: decoding is deterministic")
    max_tokens: int | None = Field(None, ge=1, description=f"answer tokens (capped at {MAX_NEW_TOKENS})")
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="accepted, no effect (beam search)")
    top_p: float | None = Field(None, ge=0, le=1, description="only 1 (no sampling)")
    seed: int | None = Field(None, description="accepted, no effect (deterministic)")
    presence_penalty: float | None = Field(None, description="only 0")
    frequency_penalty: float | None = Field(None, description="only 0")
    stop: str | list[str] | None = Field(None, description="only null or empty")
    logprobs: bool | None = Field(None, description="only false")
    user: str | None = None
    latentrag: LatentragOptions | None = None


def _refuse(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="unsupported_value")


def check_model(name: str, model_name: str, model_version: str) -> None:
    if name not in (model_name, model_version):
        raise OpenAIError(404, f"The model '{name}' does not exist on this server; it serves '{model_name}' "
                               f"(model_version {model_version}, see GET /v1/models)",
                          param="model", code="model_not_found")


def to_answer_request(req: ChatCompletionRequest) -> tuple[AnswerRequest, list[ChatMessage]]:
    """The app's AnswerRequest for a chat request (the last message's question), and the earlier messages. Raises
    OpenAIError (400) for what this server cannot do, naming the parameter."""
    if not req.messages:
        raise OpenAIError(400, "'messages' must hold at least one message (the user's question last)",
                          param="messages", code="invalid_value")
    for i, m in enumerate(req.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "text" or part.text is None:
                raise OpenAIError(400, f"messages[{i}].content[{j}]: only text content parts are supported",
                                  param=f"messages[{i}].content[{j}]", code="unsupported_value")
        if m.text() is None:
            raise OpenAIError(400, f"messages[{i}] ({m.role}) has no content", param=f"messages[{i}].content",
                              code="invalid_value")
    last = req.messages[-1]
    if last.role != "user":
        raise OpenAIError(400, f"the last message must be the user's question; it is a '{last.role}' message",
                          param=f"messages[{len(req.messages) - 1}].role", code="invalid_value")
    if req.n not in (None, 1):
        raise _refuse("n", f"n={req.n} is not supported: decoding is deterministic (beam search), so there is one "
                           "answer per request" + (", streamed or not" if req.stream else ""))
    if req.top_p not in (None, 1):
        raise _refuse("top_p", "top_p other than 1 is not supported: answers are decoded by beam search, not sampled")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise _refuse(name, f"{name} other than 0 is not supported")
    if req.stop:
        raise _refuse("stop", "stop sequences are not supported (answers end at the generator's end token)")
    if req.logprobs:
        raise _refuse("logprobs", "logprobs are not supported; the answer's log-probability is latentrag.score")
    opts = req.latentrag or LatentragOptions()
    limit = req.max_completion_tokens or req.max_tokens
    try:
        answer = AnswerRequest(question=last.text(), mode=opts.mode, k=opts.k, num_beams=opts.num_beams,
                               max_new_tokens=min(limit, MAX_NEW_TOKENS) if limit else None,
                               return_passages=opts.return_passages)
    except ValidationError as exc:
        e = errors.validation_details(exc.errors())[0]
        raise OpenAIError(400, f"messages[{len(req.messages) - 1}].content: {e['msg']}",
                          param=f"messages[{len(req.messages) - 1}].content", code="invalid_value") from None
    return answer, list(req.messages[:-1])


def chat_history(earlier: list[ChatMessage]) -> tuple:
    """The earlier turns a chat prompt can hold, oldest first: {role, content}, developer as system; tool messages
    (answers to tool calls this server never makes) are left out."""
    roles = {"developer": "system"}
    return tuple({"role": roles.get(m.role, m.role), "content": m.text()} for m in earlier if m.role != "tool")


# --------------------------------------------------------------------------------------------- response
def citations(retrieved, posterior: list | None) -> list[dict]:
    """The retrieved passages with prior and posterior (the evidence a client cites)."""
    out = []
    for j, p in enumerate(retrieved.passages):
        post = posterior[j] if posterior and j < len(posterior) else None
        out.append({"id": p["id"], "title": p["title"], "text": p["text"], "score": p["score"],
                    "probability": p["probability"], "posterior": post})
    return out


def extension(req: AnswerRequest, ref, out, retrieved, earlier: list[ChatMessage], rid: str) -> dict:
    used = bool(getattr(out, "history_used", False))
    ignored = sum(m.role == "tool" for m in earlier) if used else len(earlier)
    ext = {"mode": req.mode, "model_version": ref.model_version, "index_version": ref.index_version,
           "score": out.score, "passages": citations(retrieved, out.posterior) if req.return_passages else [],
           "history_used": used, "ignored_messages": ignored, "request_id": rid}
    if ignored:
        ext["note"] = TOOL_NOTE if used else HISTORY_NOTE
    return ext


def completion_id(rid: str) -> str:
    return f"chatcmpl-{rid}"


def chat_completion(model: str, answer: str, ext: dict, rid: str, created: int | None = None) -> dict:
    return {"id": completion_id(rid), "object": "chat.completion", "created": created or int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": None, "latentrag": ext}


def _chunk(model: str, rid: str, created: int, delta: dict, finish: str | None = None, ext: dict | None = None) -> str:
    body: dict[str, Any] = {"id": completion_id(rid), "object": "chat.completion.chunk", "created": created,
                            "model": model, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if ext is not None:
        body["latentrag"] = ext
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"


def _stream_error(rid: str) -> str:
    err = OpenAIError(500, errors.failure("generation", rid), code="generation_failed")
    return f"data: {json.dumps(err.body())}\n\n"


async def chunks(events, model: str, final_ext, rid: str, on_failure):
    """Generator stream events ({"token"} ..., {"done": Answer} or {"error"}) -> OpenAI SSE text: a role chunk,
    one content chunk per piece, a final chunk with finish_reason and the `latentrag` extension (final_ext(Answer)),
    then [DONE]. A failure after the headers went out is one `data: {"error": ...}` event (the openai client raises
    APIError on it), then [DONE]; on_failure(rid) logs the traceback."""
    created = int(time.time())
    yield _chunk(model, rid, created, {"role": "assistant", "content": ""})
    try:
        async for event in events:
            if "token" in event:
                yield _chunk(model, rid, created, {"content": event["token"]})
            elif "error" in event:
                yield _stream_error(rid)
                break
            else:
                yield _chunk(model, rid, created, {}, "stop", final_ext(event["done"]))
    except Exception:  # noqa: BLE001 - headers are sent already: report in-band, briefly
        on_failure(rid, "streaming")
        yield _stream_error(rid)
    yield DONE


def models_list(model_name: str, ref, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_name, ref, created)]}


def model_card(model_name: str, ref, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": OWNED_BY,
            "latentrag": {**ref.public(), "estimator": ref.estimator, "index_count": ref.index_count,
                          "modes": ["rag-sequence", "rag-token"]}}


_created: dict[str, int] = {}


def created_at(ref) -> int:
    """When this replica first served the version (what /v1/models reports as `created`)."""
    return _created.setdefault(ref.key, int(time.time()))
