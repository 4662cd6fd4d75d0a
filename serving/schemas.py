"""Request and response schemas of the latentrag HTTP API (they are also its OpenAPI schema), and the
application arguments (`ServeArgs`) that `serve run serving.app:app_builder key=value ...`, a Serve config file's
`args:` section and `latentrag serve` all fill in.

Static limits live here so that FastAPI answers 422 with a message before a request reaches a model; limits that
depend on the loaded index (k no larger than the number of passages) are checked by the ingress, also with 422.
"""
from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODES = ("rag-sequence", "rag-token")
MAX_QUESTION_CHARS = 2000
MAX_K = 50
MAX_NEW_TOKENS = 64
MAX_BEAMS = 8

Mode = Literal["rag-sequence", "rag-token"]


def _check_question(value: str) -> str:
    """Control characters (Unicode category Cc: NUL, tabs, newlines) become spaces and format characters (Cf:
    zero-width spaces and joiners, BOM, direction marks) go, then the question is stripped: a question of only
    such characters is empty. Text that is not valid Unicode (lone surrogates, which JSON can escape but UTF-8
    cannot encode) is refused: no tokenizer can read it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("question is not valid Unicode text (it holds a lone surrogate)") from None
    if not value.isascii() or not value.isprintable():
        value = "".join(" " if unicodedata.category(c) == "Cc" else c for c in value
                        if unicodedata.category(c) != "Cf")
    value = value.strip()
    if not value:
        raise ValueError("question must not be empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"question is {len(value)} characters long; the limit is {MAX_QUESTION_CHARS}")
    return value


QUESTION_DOC = (f"the question (1 to {MAX_QUESTION_CHARS} characters after stripping; control and format "
                "characters do not count). The generator reads at most half its input length of question tokens "
                "(61 of 128 for the embedded generator): a longer question is truncated there, and the retriever "
                "truncates at its encoder's max length.")
K_DOC = "(default: the server's default_k, at most the number of indexed passages)"


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., description=QUESTION_DOC)
    k: int | None = Field(None, ge=1, le=MAX_K, description=f"how many passages to return {K_DOC}")

    _q = field_validator("question")(_check_question)


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., description=QUESTION_DOC)
    mode: Mode = Field("rag-sequence", description="rag-sequence: one passage explains the whole answer; "
                                                   "rag-token: the passage may change from token to token")
    k: int | None = Field(None, ge=1, le=MAX_K, description=f"passages retrieved and marginalised over {K_DOC}")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS,
                                       description="answer length limit (default: the generator's max_target_length)")
    num_beams: int = Field(1, ge=1, le=MAX_BEAMS, description="beam width (per passage for rag-sequence)")
    return_passages: bool = Field(True, description="include the retrieved passages in the response")

    _q = field_validator("question")(_check_question)


class Passage(BaseModel):
    id: str
    title: str = ""
    text: str
    probability: float = Field(..., description="p(z | x): the retriever's probability over the k passages")
    posterior: float | None = Field(None, description="p(z | x, y) for rag-sequence answers, else null")


class RetrieveResponse(BaseModel):
    passages: list[Passage]
    model_version: str
    index_version: str


class AnswerResponse(BaseModel):
    answer: str
    score: float = Field(..., description="log-probability of the answer under the model (mode-specific)")
    passages: list[Passage] = Field(default_factory=list)
    mode: Mode
    model_version: str
    index_version: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="checkpoint directory or MLflow URI (runs:/..., models:/...); "
                                                     "default: the one being served (re-read from disk)")
    index: str | None = Field(None, description="index root (its `current` version is used) or version directory; "
                                                "default: the checkpoint's own index")


class ReloadResponse(BaseModel):
    previous: dict
    current: dict
    seconds: float


class HealthResponse(BaseModel):
    status: str
    model_version: str
    index_version: str


class ServeArgs(BaseModel):
    """Application arguments. Every field can be given as `key=value` to `serve run` or under `args:` in a Serve
    config file; `latentrag serve` fills them from its flags and configs/serve.yaml."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(..., description="checkpoint directory or MLflow URI")
    index: str | None = Field(None, description="serve against this index root/version instead of the checkpoint's")
    download_dir: str | None = Field(None, description="where MLflow artifacts are downloaded (default: a temp dir)")
    admin_token: str | None = Field(None, description="bearer token for /v1/admin/reload; the application keeps "
                                                      "only its SHA-256 (prefer admin_token_file or "
                                                      "admin_token_sha256: a config file's args are stored by Serve)")
    admin_token_file: str | None = Field(None, description="file holding the bearer token (read when the app is "
                                                           "built)")
    admin_token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                           description="hex SHA-256 of the bearer token. Default for all three: "
                                                       "env LATENTRAG_ADMIN_TOKEN of the process that builds the "
                                                       "app; none = reload disabled")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body; larger ones get 413")
    max_batch_size: int = Field(16, ge=1, description="Generator @serve.batch max_batch_size")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="Generator @serve.batch batch_wait_timeout_s")
    retriever_max_batch_size: int = Field(32, ge=1)
    retriever_batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    decode: Literal["fast", "thorough"] = Field("fast", description="RAG-Sequence decoding (see pipeline.decoding)")
    max_k: int = Field(20, ge=1, le=MAX_K, description="largest k a request may ask for")
    default_k: int = Field(5, ge=1, le=MAX_K, description="k of requests that do not give one (capped at the "
                                                           "number of indexed passages)")
    generator_threads: int = Field(2, ge=1, description="torch threads in a Generator replica")
    retriever_threads: int = Field(1, ge=1, description="torch threads in a Retriever replica")
    keep_versions: int = Field(2, ge=1, description="model versions a replica keeps loaded (reloads need >= 2)")
    model_name: str = Field("latentrag", min_length=1, description="the model id of the OpenAI-compatible routes "
                                                                    "(GET /v1/models; `model` of chat requests)")

    @model_validator(mode="after")
    def _default_k_within_max_k(self):
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self
