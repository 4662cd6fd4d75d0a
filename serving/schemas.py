"""Request and response schemas of the latentrag HTTP API (they are also its OpenAPI schema), and the
application arguments (`ServeArgs`) that `serve run serving.app:app_builder key=value ...`, a Serve config file's
`args:` section and `latentrag serve` all fill in.

Static limits live here so that FastAPI answers 422 with a message before a request reaches a model; limits that
depend on the loaded index (k no larger than the number of passages) are checked by the ingress, also with 422.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODES = ("rag-sequence", "rag-token")
MAX_QUESTION_CHARS = 2000
MAX_K = 50
MAX_NEW_TOKENS = 64
MAX_BEAMS = 8

Mode = Literal["rag-sequence", "rag-token"]


def _check_question(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("question must not be empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"question is {len(value)} characters long; the limit is {MAX_QUESTION_CHARS}")
    return value


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., description=f"the question (1 to {MAX_QUESTION_CHARS} characters after stripping)")
    k: int = Field(5, ge=1, le=MAX_K, description="how many passages to return")

    _q = field_validator("question")(_check_question)


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., description=f"the question (1 to {MAX_QUESTION_CHARS} characters after stripping)")
    mode: Mode = Field("rag-sequence", description="rag-sequence: one passage explains the whole answer; "
                                                   "rag-token: the passage may change from token to token")
    k: int = Field(5, ge=1, le=MAX_K, description="passages retrieved and marginalised over")
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
    admin_token: str | None = Field(None, description="bearer token for /v1/admin/reload "
                                                      "(default: env LATENTRAG_ADMIN_TOKEN; none = reload disabled)")
    max_batch_size: int = Field(16, ge=1, description="Generator @serve.batch max_batch_size")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="Generator @serve.batch batch_wait_timeout_s")
    retriever_max_batch_size: int = Field(32, ge=1)
    retriever_batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    decode: Literal["fast", "thorough"] = Field("fast", description="RAG-Sequence decoding (see pipeline.decoding)")
    max_k: int = Field(20, ge=1, le=MAX_K, description="largest k a request may ask for")
    default_k: int = Field(5, ge=1, le=MAX_K)
    generator_threads: int = Field(2, ge=1, description="torch threads in a Generator replica")
    retriever_threads: int = Field(1, ge=1, description="torch threads in a Retriever replica")
    keep_versions: int = Field(2, ge=1, description="model versions a replica keeps loaded (reloads need >= 2)")
