"""latentrag on Ray Serve: Retriever (query encoder + FAISS index) ▶ Generator (@serve.batch) ▶ FastAPI ingress.

    serve run serving.app:app_builder checkpoint=/abs/path/to/checkpoint
    serve deploy configs/serve.yaml
    latentrag serve --checkpoint runs/demo/checkpoint [--config configs/serve.yaml]

Request path. `POST /v1/answer` is one handle call from the ingress to the Generator; the Generator's @serve.batch
method asks the Retriever for the passages of its whole batch in one call (`Retriever.retrieve_many`), then decodes
the batch. Serve forms a batch from what arrives within batch_wait_timeout_s even while the model is busy; the
Generator therefore retrieves, and decodes, everything that queued up meanwhile as one batch (`_Coalescer`), and a
batch retrieves while the one before it decodes. The Retriever batches the single-question
calls of `/v1/retrieve` and `/v1/answer/stream` with its own @serve.batch. Ray itself should start with
SERVE_THROUGHPUT_ENV (below).

Versions and reloads. The ingress holds the active `ModelRef` (a checkpoint version + an index version). Every
request captures it once and passes it to the Retriever and the Generator, whose replicas keep the last
`keep_versions` versions loaded and load a missing one on demand (off the event loop). `POST /v1/admin/reload`
resolves the new version, has both deployments load it while the old one keeps serving, then swaps the ingress's
reference: requests already in flight finish on the old version, new ones use the new version, and nothing is down.
The ingress must run one replica for this (it holds the reference); Retriever and Generator may autoscale (a replica
that was not warmed loads the version on its first request). For a rolling replacement of every replica, redeploy
with `serve deploy` instead.
"""
import asyncio
import hashlib
import hmac
import html
import json
import os
import queue
import time
from collections import OrderedDict, defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Dict

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serving import errors
from serving import openai as oai
from serving.batching import (Answer, AnswerItem, Coalescer, ItemError, Retrieved, RetrieveItem, batch_stats, logger,
                              run_each)
from serving.loading import (ModelRef, ServingLoadError, app_defaults, load_generator_part, load_retriever_part,
                             request_defaults, resolve_model_ref)
from serving.schemas import (AnswerRequest, AnswerResponse, HealthResponse, Passage, ReloadRequest, ReloadResponse,
                             RetrieveRequest, RetrieveResponse, ServeArgs)

ADMIN_TOKEN_ENV = "LATENTRAG_ADMIN_TOKEN"

# Ray Serve's request-path settings for throughput (Serve's processes read them when they start, so they belong in
# the environment of whoever starts Ray: `latentrag serve` and benchmarks/serve_bench.py put them there, for
# `serve deploy` give them to `ray start`). RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turns on gRPC between deployments,
# user code and the router on the replica's own event loop, buffered request logs, no per-request lines on stderr
# and a GC freeze after start-up; it would also turn on direct ingress (no HTTP proxy, ingress replicas listening on
# ports of their own), which is kept off: the proxy keeps the configured host, port and route prefixes.
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def use_serve_throughput_env() -> dict[str, str]:
    """Put SERVE_THROUGHPUT_ENV into os.environ (values already set there win) before Ray starts; returns what is in
    effect, for a runtime_env's env_vars."""
    for key, value in SERVE_THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in SERVE_THROUGHPUT_ENV}
DEPLOYMENT_NAMES = ("Ingress", "Retriever", "Generator")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _overloaded() -> HTTPException:
    return HTTPException(503, "overloaded: too many queued requests, retry later", headers={"Retry-After": "1"})


# --------------------------------------------------------------------------------------------- model cache
class _VersionCache:
    """The last `keep` loaded versions of one replica's share of the model, loaded one at a time in a thread."""

    def __init__(self, loader, keep: int):
        self._loader = loader
        self._keep = max(1, keep)
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._versions: dict[str, str] = {}        # key -> "model_version@index_version" (no paths)
        self._lock = asyncio.Lock()

    def put(self, ref: ModelRef, model) -> None:
        self._models[ref.key] = model
        self._versions[ref.key] = f"{ref.model_version}@{ref.index_version}"
        self._models.move_to_end(ref.key)
        while len(self._models) > self._keep:
            self._versions.pop(self._models.popitem(last=False)[0], None)  # in-flight users keep their reference

    async def get(self, ref: ModelRef):
        model = self._models.get(ref.key)
        if model is None:
            async with self._lock:
                model = self._models.get(ref.key)
                if model is None:
                    model = await asyncio.to_thread(self._loader, ref)
                    self.put(ref, model)
        self._models.move_to_end(ref.key)
        return model

    def keys(self) -> list[str]:
        return list(self._models)

    def versions(self) -> list[str]:
        """The loaded versions as "model_version@index_version", least recently used first."""
        return [self._versions[k] for k in self._models]


def _replica_stats(replica) -> dict:
    """A replica's batching so far, where it runs (Serve's replica id, Ray node id) and the versions it holds: with
    several replicas, /v1/info shows the one its call reached (how a cluster test sees every replica answer and
    reload)."""
    return {**batch_stats(replica), **replica.where, "versions": replica.models.versions()}


def _where() -> dict:
    import ray

    return {"replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id()}


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------- Retriever
def _retrieve_group(model, items: list[RetrieveItem]) -> list[Retrieved]:
    """One query-encoder pass and one index search for a group of questions (same model version)."""
    import torch

    from pipeline.index import passage_text

    questions = [it.question for it in items]
    kmax = max(it.k for it in items)
    with torch.no_grad():
        q = model.query_encoder(questions)
        # dense: one search for the largest k serves every item's top k; hybrid (retriever.hybrid_k): the k + H
        # candidates of each k, as evaluation reads them
        if model.width(kmax) == kmax:
            groups = {kmax: list(range(len(items)))}
        else:
            groups = defaultdict(list)
            for i, it in enumerate(items):
                groups[it.k].append(i)
        found = {}
        for k, idx in groups.items():
            rows = model.prior_rows([questions[i] for i in idx], q[idx], k)
            scores = model.prior_scores([questions[i] for i in idx], q[idx], rows).float().cpu()
            found.update((i, (rows[j], scores[j])) for j, i in enumerate(idx))
    out = []
    for i, it in enumerate(items):
        n = model.width(it.k)
        rows = [int(r) for r in found[i][0][:n]]
        s = found[i][1][:n]
        prob = torch.softmax(s, -1).tolist()
        passages = []
        for j, row in enumerate(rows):
            p = model.index.passage(row)
            title = p.get("title") or ""
            passages.append({"id": str(p["id"]), "title": title, "text": p["text"], "row": row,
                             "score": float(s[j]), "probability": prob[j],
                             "generator_text": passage_text(title, p["text"])})
        out.append(Retrieved(passages))
    return out


@serve.deployment(name="Retriever", max_ongoing_requests=64, max_queued_requests=512,
                  ray_actor_options={"num_cpus": 0.5})
class Retriever:
    """Query encoder + FAISS index version. Questions are batched (one encoder pass, one search)."""

    def __init__(self, ref: dict, args: dict):
        self.args = ServeArgs(**args)
        _set_threads(self.args.retriever_threads)
        self.models = _VersionCache(load_retriever_part, self.args.keep_versions)
        self.retrieve.set_max_batch_size(self.args.retriever_max_batch_size)
        self.retrieve.set_batch_wait_timeout_s(self.args.retriever_batch_wait_timeout_s)
        self._initial = ModelRef.from_dict(ref)
        self.models.put(self._initial, load_retriever_part(self._initial))
        self.batches, self.batched_requests = 0, 0
        self.where = _where()

    def stats(self) -> dict:
        """This replica's batching so far (how many batches, how many requests they held), where it runs and the
        versions it holds."""
        return _replica_stats(self)

    async def prepare(self, ref: dict) -> list[str]:
        """Load a version ahead of a reload (the one being served keeps serving meanwhile)."""
        await self.models.get(ModelRef.from_dict(ref))
        return self.models.keys()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def retrieve(self, items: list[RetrieveItem]) -> list[Retrieved | ItemError]:
        """One question per call (/v1/retrieve, /v1/answer/stream); Serve batches the calls."""
        return await self.retrieve_many(items)

    async def retrieve_many(self, items: list[RetrieveItem]) -> list[Retrieved | ItemError]:
        """A list of questions in one call: what a Generator batch sends (one handle call per batch, not one per
        request). Each item gets its passages or its own ItemError (run_each), never its neighbours' failure."""
        self.batches += 1
        self.batched_requests += len(items)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[it.ref["key"]].append(i)
        results: list = [None] * len(items)
        for idx in groups.values():
            group = [items[i] for i in idx]
            try:
                model = await self.models.get(ModelRef.from_dict(group[0].ref))
            except Exception:  # noqa: BLE001 - this version cannot load: its requests fail, the replica lives
                logger.exception("requests %s: loading the retriever failed", [it.request_id for it in group])
                outs = [ItemError("retrieval failed", it.request_id) for it in group]
            else:
                outs = await asyncio.to_thread(run_each, lambda its, m=model: _retrieve_group(m, its), group,
                                               "retrieval")
            for i, out in zip(idx, outs):
                results[i] = out
        return results


# --------------------------------------------------------------------------------------------- Generator
def _decode_group(gen, items: list[AnswerItem], thorough: bool, on_step=None) -> list[Answer]:
    """Decode questions that share model version, mode, k, beams and length in one batched call of the pipeline's
    decoders, on the passages the Retriever found (`candidates=`, `doc_scores=`): one encoder pass over every
    (question, passage) pair of the group, one decoder step per token for all their live beams."""
    import torch

    from pipeline.decoding import rag_sequence_decode, rag_token_decode
    from pipeline.rag import Candidates

    first = items[0]
    ps = [it.retrieved.passages for it in items]
    cand = Candidates(rows=np.array([[p["row"] for p in row] for row in ps]),
                      ids=[[p["id"] for p in row] for row in ps],
                      texts=[[p["generator_text"] for p in row] for row in ps], query_vectors=None)
    scores = torch.tensor([[p["score"] for p in row] for row in ps], dtype=torch.float32)
    model = SimpleNamespace(generator=gen)            # retrieval happened in the Retriever deployment
    questions = [gen.fit_question(it.question) for it in items]
    # earlier chat turns reach a generator with a chat prompt (hf-causal with chat_template); others ignore them
    used = getattr(gen, "uses_history", False)
    histories = [it.history for it in items] if used and any(it.history for it in items) else None
    # every passage the Retriever found: k, or k + H with hybrid candidates (same for the whole group)
    common = dict(k=cand.rows.shape[1], num_beams=first.num_beams, max_len=first.max_new_tokens, candidates=cand,
                  doc_scores=scores, histories=histories)
    with torch.no_grad():
        if first.mode == "rag-sequence":
            answers = rag_sequence_decode(model, questions, thorough=thorough, **common)
        else:
            answers = rag_token_decode(model, questions, on_step=on_step, **common)
    return [Answer(a.answer, a.score, [p.get("posterior") for p in a.passages],
                   history_used=bool(used and it.history)) for a, it in zip(answers, items)]


def _text_pieces(gen, ids_stream):
    """Token-id prefixes -> the new text each one adds (detokenised as a whole, so word pieces join up)."""
    shown = ""
    for ids in ids_stream:
        text = gen.decode(ids)
        piece = text[len(shown):] if text.startswith(shown) else text
        shown = text
        if piece:
            yield piece


def _pieces(gen, answer: str):
    """The pieces of an already decoded answer, token by token. They are cut at the tokens' character offsets so
    that they join up to the answer exactly: decoding a re-tokenised answer need not give it back ("##trik" ->
    "# # trik" with WordPiece)."""
    try:
        offsets = gen.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):     # slow tokenizers have no offsets
        offsets = None
    if offsets:
        start = 0
        for end in sorted({e for _, e in offsets if 0 < e < len(answer)}) + [len(answer)]:
            if end > start:
                yield answer[start:end]
                start = end
        return
    ids = gen.tokenizer(answer, add_special_tokens=False)["input_ids"]
    yield from _text_pieces(gen, (ids[:n] for n in range(1, len(ids) + 1)))


@serve.deployment(name="Generator", max_ongoing_requests=64, max_queued_requests=512,
                  ray_actor_options={"num_cpus": 1})
class Generator:
    """The generator, decoding batches of (question, retrieved passages) with @serve.batch."""

    def __init__(self, retriever: DeploymentHandle, ref: dict, args: dict):
        self.retriever = retriever
        self.args = ServeArgs(**args)
        _set_threads(self.args.generator_threads)
        self.thorough = self.args.decode == "thorough"
        self.models = _VersionCache(load_generator_part, self.args.keep_versions)
        self.answer.set_max_batch_size(self.args.max_batch_size)
        self.answer.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        initial = ModelRef.from_dict(ref)
        self.models.put(initial, load_generator_part(initial))
        self.batches, self.batched_requests = 0, 0
        self.where = _where()
        # retrieval and decoding each run over what queued up while they were busy (one of each at a time, so a
        # batch retrieves while the one before it decodes)
        self._retrieval = Coalescer(self._retrieve_for, self.args.retriever_max_batch_size)
        self._decoding = Coalescer(self._decode, self.args.max_batch_size)

    def stats(self) -> dict:
        """This replica's batching so far (how many decoder batches, how many requests they held), where it runs
        and the versions it holds."""
        return _replica_stats(self)

    async def prepare(self, ref: dict) -> list[str]:
        await self.models.get(ModelRef.from_dict(ref))
        return self.models.keys()

    async def _retrieve_for(self, items: list[AnswerItem]) -> list[AnswerItem]:
        """The passages of every item of a batch that has none yet: ONE call to the Retriever for the batch."""
        need = [i for i, it in enumerate(items) if it.retrieved is None]
        if not need:
            return items
        try:
            found = await self.retriever.retrieve_many.remote(
                [RetrieveItem(items[i].ref, items[i].question, items[i].k, items[i].request_id) for i in need])
        except Exception as exc:  # noqa: BLE001 - the Retriever is overloaded or gone: every item says so
            from ray.serve.exceptions import BackPressureError

            overloaded = isinstance(exc, BackPressureError)
            if not overloaded:
                logger.exception("requests %s: the call to the Retriever failed", [items[i].request_id for i in need])
            found = [ItemError("retrieval failed", items[i].request_id, overloaded) for i in need]
        items = list(items)
        for i, r in zip(need, found):
            items[i] = replace(items[i], retrieved=r)
        return items

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=16)
    async def answer(self, items: list[AnswerItem]) -> list[Answer | ItemError]:
        """One Answer or ItemError per AnswerItem. Items without `retrieved` passages get them from the Retriever,
        one call for the whole batch; batches that arrive while the decoder is busy are decoded together
        (Coalescer); an item that fails fails alone (run_each)."""
        return await self._decoding.submit(await self._retrieval.submit(items))

    async def _decode(self, items: list[AnswerItem]) -> list[Answer | ItemError]:
        self.batches += 1
        self.batched_requests += len(items)
        results: list = [None] * len(items)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if isinstance(it.retrieved, ItemError):
                results[i] = it.retrieved
                continue
            groups[(it.ref["key"], it.mode, it.k, it.num_beams, it.max_new_tokens)].append(i)
        for idx in groups.values():
            group = [items[i] for i in idx]
            try:
                gen = await self.models.get(ModelRef.from_dict(group[0].ref))
            except Exception:  # noqa: BLE001 - this version cannot load: its requests fail, the replica lives
                logger.exception("requests %s: loading the generator failed", [it.request_id for it in group])
                outs = [ItemError("generation failed", it.request_id) for it in group]
            else:
                outs = await asyncio.to_thread(
                    run_each, lambda its, g=gen: _decode_group(g, its, self.thorough), group, "generation")
            for i, out in zip(idx, outs):
                results[i] = out if isinstance(out, ItemError) else \
                    replace(out, retrieved=items[i].retrieved, batch_size=len(items))
        return results

    async def stream(self, item: AnswerItem) -> AsyncIterator[dict]:
        """Events {"token": piece} ... then {"done": Answer}, or {"error": ItemError} (the traceback goes to this
        replica's log). RAG-Token with one beam streams tokens as the decoder emits them (the same
        `rag_token_decode` call as /v1/answer, watched step by step); otherwise the answer is decoded first (the
        sequence-level choice needs every hypothesis) and its tokens follow."""
        try:
            async for event in self._stream(item):
                yield event
        except Exception:  # noqa: BLE001 - in-band, short; the details stay here
            logger.exception("request %s: streaming generation failed", item.request_id)
            yield {"error": ItemError("generation failed", item.request_id)}

    async def _stream(self, item: AnswerItem) -> AsyncIterator[dict]:
        gen = await self.models.get(ModelRef.from_dict(item.ref))
        if item.mode == "rag-token" and item.num_beams == 1:
            steps: queue.Queue = queue.Queue()
            stop = {gen.eos_token_id, gen.tokenizer.pad_token_id}

            def on_step(prefix):                          # [1, t]: start token, then what was emitted so far
                ids = prefix[0, 1:].tolist()
                if ids and ids[-1] not in stop:
                    steps.put(ids)

            task = asyncio.ensure_future(asyncio.to_thread(_decode_group, gen, [item], self.thorough, on_step))
            task.add_done_callback(lambda _: steps.put(None))
            shown = ""
            while (ids := await asyncio.to_thread(steps.get)) is not None:
                text = gen.decode(ids)
                piece = text[len(shown):] if text.startswith(shown) else text
                shown = text
                if piece:
                    yield {"token": piece}
            yield {"done": (await task)[0]}
            return
        out = (await asyncio.to_thread(_decode_group, gen, [item], self.thorough))[0]
        for piece in _pieces(gen, out.answer):
            yield {"token": piece}
        yield {"done": out}


# --------------------------------------------------------------------------------------------- ingress
DOCS_NOTE = ("The interactive Swagger UI is not bundled (it would load its scripts from a CDN): GET /docs lists the "
             "endpoints on a self-contained page; this schema (/openapi.json) is the full reference.")

api = FastAPI(
    title="latentrag",
    version="0.1.0",
    description="Retrieval-augmented generation with passages as latent variables: answer questions with "
                "RAG-Sequence or RAG-Token decoding over a trained retriever and generator. Errors are "
                "`{detail, request_id}` (the request id is also the `X-Request-ID` response header; the server log "
                "has the details under it). " + DOCS_NOTE,
    docs_url=None, redoc_url=None,
)
errors.install(api)
oai.install(api)         # OpenAI's error shape on /v1/chat/completions and /v1/models


def _passages(retrieved: Retrieved, posterior: list | None = None) -> list[Passage]:
    out = []
    for j, p in enumerate(retrieved.passages):
        post = posterior[j] if posterior and j < len(posterior) else None
        out.append(Passage(id=p["id"], title=p["title"], text=p["text"], probability=p["probability"],
                           posterior=post))
    return out


def docs_page(spec: dict) -> str:
    """A self-contained HTML page (no scripts, nothing fetched) listing the endpoints of an OpenAPI spec."""
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            summary = op.get("summary") or ""
            desc = (op.get("description") or "").split("\n\n")[0]
            rows.append(f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}"
                        f"</code></td><td>{html.escape(summary)}<br><small>{html.escape(desc)}</small></td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>latentrag API</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:.3em .6em;"
            "vertical-align:top;border-bottom:1px solid #ddd}</style></head><body>"
            f"<h1>{html.escape(spec['info']['title'])} {html.escape(spec['info']['version'])}</h1>"
            f"<p>{html.escape(DOCS_NOTE)} The schema: <a href='openapi.json'>openapi.json</a>.</p>"
            f"<table>{''.join(rows)}</table></body></html>")


def token_sha256(args: ServeArgs) -> str | None:
    """The admin token's SHA-256 (hex), from args.admin_token_sha256, args.admin_token, args.admin_token_file or
    the environment variable LATENTRAG_ADMIN_TOKEN of the process that builds the application, in that order.
    Only the hash reaches the deployments: the token itself is never a deployment argument or a runtime_env
    variable (those end up in Serve's stored config and Ray's logs)."""
    if args.admin_token_sha256:
        return args.admin_token_sha256
    token = args.admin_token
    if token is None and args.admin_token_file:
        token = Path(args.admin_token_file).expanduser().read_text().strip()
    if token is None:
        token = os.environ.get(ADMIN_TOKEN_ENV) or None
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def _log_failure(rid: str, what: str) -> None:
    logger.exception("request %s: %s failed", rid, what)


# The web page at `/` (serving/page/, shipped as package data: no build step, nothing fetched from elsewhere).
PAGE_DIR = Path(__file__).with_name("page")
PAGE_FILES = {"app.js": "text/javascript; charset=utf-8"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Everything the Ingress's routes use is defined above it: serve.ingress freezes a copy of the FastAPI app, with the
# module globals its routes refer to, when the class is decorated.
async def sse_events(events, done, rid: str):
    """Generator stream events -> SSE text: `token` events, then `done` (done(Answer)) or one short `error` event
    {detail, request_id}; whatever fails here is logged under the request id, never sent to the client."""
    try:
        async for event in events:
            if "token" in event:
                yield _sse("token", {"text": event["token"]})
            elif "error" in event:
                yield _sse("error", errors.error_body(errors.failure("generation", rid), rid))
                return
            else:
                yield _sse("done", done(event["done"]))
    except Exception:  # noqa: BLE001 - headers are sent already: report in-band, briefly
        _log_failure(rid, "streaming")
        yield _sse("error", errors.error_body(errors.failure("generation", rid), rid))


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=256, max_queued_requests=512,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, retriever: DeploymentHandle, generator: DeploymentHandle, ref: dict, args: dict):
        self.retriever = retriever
        self.generator = generator
        self.args = ServeArgs(**args)
        errors.LIMITS["max_body_bytes"] = self.args.max_body_bytes
        self.active = ModelRef.from_dict(ref)
        self._ref_cache: tuple = (None, None)
        self.reloads = 0
        self._reload_lock = asyncio.Lock()

    # ---- helpers
    def _k(self, k: int | None) -> int:
        """The request's k (default: default_k, capped at the index size), refused beyond what the index holds
        (with hybrid candidates, k + hybrid_k passages are read)."""
        h = self.active.hybrid_k
        limit = min(self.args.max_k, self.active.index_count - h if self.active.index_count else self.args.max_k)
        if k is None:
            return min(self.args.default_k, limit)
        if k > limit:
            plus = f", {h} more from BM25 per question" if h else ""
            raise HTTPException(422, f"k={k} is out of range: this server allows 1..{limit} "
                                     f"(max_k {self.args.max_k}, index holds {self.active.index_count} passages{plus})")
        return k

    def _failed(self, out: ItemError, rid: str) -> HTTPException:
        if out.overloaded:                         # a call between deployments was refused for load
            return _overloaded()
        return HTTPException(500, errors.failure(out.message.removesuffix(" failed"), rid))

    async def _retrieve(self, ref: ModelRef, question: str, k: int, rid: str) -> Retrieved:
        try:
            out = await self.retriever.retrieve.remote(RetrieveItem(self._ref_dict(ref), question, k, rid))
        except Exception as exc:  # noqa: BLE001
            raise self._handle_error(exc, rid, "retrieval") from None
        if isinstance(out, ItemError):
            raise self._failed(out, rid)
        return out

    def _handle_error(self, exc: Exception, rid: str, what: str) -> HTTPException:
        """A handle call raised: 503 for backpressure, else a short 500 (traceback to the log)."""
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, BackPressureError):
            return _overloaded()
        logger.error("request %s: %s failed", rid, what, exc_info=exc)
        return HTTPException(500, errors.failure(what, rid))

    def _item(self, ref: ModelRef, req: AnswerRequest, k: int, rid: str,
              retrieved: Retrieved | None = None, history: tuple = ()) -> AnswerItem:
        req = request_defaults(req, ref)           # unset mode / num_beams: as the checkpoint was evaluated
        return AnswerItem(self._ref_dict(ref), req.question, req.mode, k, req.num_beams, req.max_new_tokens, rid,
                          retrieved, history)

    def _ref_dict(self, ref: ModelRef) -> dict:
        if self._ref_cache[0] is not ref:          # the active reference changes only on reload
            self._ref_cache = (ref, ref.to_dict())
        return self._ref_cache[1]

    # ---- endpoints
    @api.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def docs(self) -> HTMLResponse:
        return HTMLResponse(docs_page(api.openapi()))

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> HealthResponse:
        return HealthResponse(status="ok", model_version=self.active.model_version,
                              index_version=self.active.index_version)

    @api.get("/v1/info")
    async def info(self) -> dict:
        """Versions, limits and batching statistics (of the replicas this call reached: their ids, nodes and loaded
        versions; no filesystem paths)."""
        return {**self.active.public(), "estimator": self.active.estimator, "tau": self.active.tau,
                "index_count": self.active.index_count, "modes": ["rag-sequence", "rag-token"],
                "limits": {"max_k": min(self.args.max_k, self.active.index_count or self.args.max_k),
                           "default_k": self._k(None), "max_body_bytes": self.args.max_body_bytes},
                "batching": {"max_batch_size": self.args.max_batch_size,
                             "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                             "generator_replica": await self.generator.stats.remote(),
                             "retriever_replica": await self.retriever.stats.remote()},
                "reloads": self.reloads}

    @api.post("/v1/retrieve", response_model=RetrieveResponse)
    async def retrieve(self, req: RetrieveRequest, request: Request) -> RetrieveResponse:
        k = self._k(req.k)
        ref = self.active
        retrieved = await self._retrieve(ref, req.question, k, errors.request_id(request))
        return RetrieveResponse(passages=_passages(retrieved), model_version=ref.model_version,
                                index_version=ref.index_version)

    @api.post("/v1/answer", response_model=AnswerResponse)
    async def answer(self, req: AnswerRequest, request: Request) -> AnswerResponse:
        """One handle call per request: the Generator's batch asks the Retriever for the whole batch's passages."""
        k = self._k(req.k)
        rid = errors.request_id(request)
        ref = self.active                       # this request stays on this version to the end
        req = request_defaults(req, ref)
        try:
            out = await self.generator.answer.remote(self._item(ref, req, k, rid))
        except Exception as exc:  # noqa: BLE001
            raise self._handle_error(exc, rid, "generation") from None
        if isinstance(out, ItemError):
            raise self._failed(out, rid)
        return AnswerResponse(answer=out.answer, score=out.score, mode=req.mode,
                              passages=_passages(out.retrieved, out.posterior) if req.return_passages
                              else [], model_version=ref.model_version, index_version=ref.index_version)

    @api.post("/v1/answer/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "server-sent events: `token` events {text}, then one `done` event "
                                              "with the AnswerResponse (or an `error` event {detail, request_id})"}})
    async def answer_stream(self, req: AnswerRequest, request: Request) -> StreamingResponse:
        k = self._k(req.k)
        rid = errors.request_id(request)
        ref = self.active
        req = request_defaults(req, ref)
        retrieved = await self._retrieve(ref, req.question, k, rid)
        item = self._item(ref, req, k, rid, retrieved)

        def done(out: Answer) -> dict:
            return AnswerResponse(answer=out.answer, score=out.score, mode=req.mode,
                                  passages=_passages(retrieved, out.posterior) if req.return_passages else [],
                                  model_version=ref.model_version, index_version=ref.index_version).model_dump()

        events = self.generator.options(stream=True).stream.remote(item)
        return StreamingResponse(sse_events(events, done, rid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- OpenAI-compatible routes (serving/openai.py: schemas, translation, chunks, error shape)
    @api.post("/v1/chat/completions", response_model=None,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "a chat.completion (JSON), or with stream=true chat.completion.chunk "
                                              "events ending with `data: [DONE]`; passages in the `latentrag` "
                                              "field (of the final chunk when streamed)"},
                         400: {"description": "OpenAI error shape {error: {message, type, param, code}}"},
                         404: {"description": "unknown model (code model_not_found)"}})
    async def chat_completions(self, req: oai.ChatCompletionRequest, request: Request):
        """OpenAI chat completions: the last user message is the question; RAG settings in `latentrag`."""
        rid = errors.request_id(request)
        ref = self.active
        oai.check_model(req.model, self.args.model_name, ref.model_version)
        areq, earlier = oai.to_answer_request(req)
        history = oai.chat_history(earlier)
        k = self._k(areq.k)
        if req.stream:
            retrieved = await self._retrieve(ref, areq.question, k, rid)
            events = self.generator.options(stream=True).stream.remote(
                self._item(ref, areq, k, rid, retrieved, history))
            final = lambda out: oai.extension(areq, ref, out, retrieved, earlier, rid)       # noqa: E731
            return StreamingResponse(oai.chunks(events, req.model, final, rid, _log_failure),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            out = await self.generator.answer.remote(self._item(ref, areq, k, rid, history=history))
        except Exception as exc:  # noqa: BLE001
            raise self._handle_error(exc, rid, "generation") from None
        if isinstance(out, ItemError):
            raise self._failed(out, rid)
        return oai.chat_completion(req.model, out.answer,
                                   oai.extension(areq, ref, out, out.retrieved, earlier, rid), rid)

    @api.get("/v1/models")
    async def models(self) -> dict:
        """The served model (OpenAI's model list), with its model and index versions under `latentrag`."""
        return oai.models_list(self.args.model_name, self.active, oai.created_at(self.active))

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str) -> dict:
        oai.check_model(model, self.args.model_name, self.active.model_version)
        return oai.model_card(self.args.model_name, self.active, oai.created_at(self.active))

    # ---- the web page
    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "index.html").read_text(encoding="utf-8"))

    @api.get("/page/{name}", include_in_schema=False)
    async def page_file(self, name: str) -> Response:
        if name not in PAGE_FILES:                 # a fixed list: no paths from the request reach the filesystem
            raise HTTPException(404, "not found")
        return Response((PAGE_DIR / name).read_bytes(), media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    def _check_admin(self, authorization: str | None) -> None:
        expected = self.args.admin_token_sha256
        if not expected:
            raise HTTPException(401, "reload is disabled: no admin token configured (admin_token_file, "
                                     f"admin_token_sha256 or {ADMIN_TOKEN_ENV} when the app is built)",
                                headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = (authorization or "").partition(" ")
        digest = hashlib.sha256(given.strip().encode("utf-8", "replace")).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @api.post("/v1/admin/reload", response_model=ReloadResponse,
              openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": ReloadRequest.model_json_schema()}}}})
    async def reload(self, request: Request, authorization: str | None = Header(None)) -> ReloadResponse:
        """Move to a new checkpoint and/or index version without downtime (bearer token required). The token is
        checked before the body is read."""
        self._check_admin(authorization)
        rid = errors.request_id(request)
        raw = await request.body()
        try:
            req = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
        except ValidationError as exc:
            raise HTTPException(422, errors.validation_details(exc.errors())) from None
        async with self._reload_lock:
            t = time.time()
            source = req.checkpoint or self.active.source
            index = req.index if req.index is not None else (None if req.checkpoint else self.active.index_source)
            try:
                new = await asyncio.to_thread(resolve_model_ref, source, index, self.args.download_dir)
            except ServingLoadError as exc:
                raise HTTPException(422, f"cannot reload: {exc}") from None
            try:                                # load beside the serving version; nothing is swapped yet
                await asyncio.gather(self.retriever.prepare.remote(new.to_dict()),
                                     self.generator.prepare.remote(new.to_dict()))
            except Exception:  # noqa: BLE001 - the traceback goes to the log, the client gets the request id
                _log_failure(rid, f"reload to {source}")
                raise HTTPException(500, f"cannot reload: loading {new.model_version} failed, still serving "
                                         f"{self.active.model_version}; the server log has the details under "
                                         f"request id {rid}") from None
            previous, self.active = self.active, new
            self.reloads += 1
            return ReloadResponse(previous=previous.admin(), current=new.admin(), seconds=round(time.time() - t, 3))


# --------------------------------------------------------------------------------------------- building
def build_app(args: ServeArgs | Dict[str, Any], deployments: dict[str, dict] | None = None) -> Application:
    """The application, with per-deployment option overrides (the `deployments:` entries of a Serve config)."""
    a = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    ref = resolve_model_ref(a.checkpoint, a.index, a.download_dir)
    opts = deployments or {}
    unknown = sorted(set(opts) - set(DEPLOYMENT_NAMES))
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown}; this application has {list(DEPLOYMENT_NAMES)}")
    try:
        digest = token_sha256(a)
    except OSError as exc:
        raise ValueError(f"cannot read admin_token_file: {exc}") from exc
    # the deployments get the token's hash only
    # default_k / decode not given: the checkpoint's eval settings (train-serve parity)
    dep_args = a.model_copy(update={"admin_token": None, "admin_token_file": None,
                                    "admin_token_sha256": digest, **app_defaults(a, ref)}).model_dump()
    retriever = Retriever.options(**opts.get("Retriever", {})).bind(ref.to_dict(), dep_args)
    generator = Generator.options(**opts.get("Generator", {})).bind(retriever, ref.to_dict(), dep_args)
    return Ingress.options(**opts.get("Ingress", {})).bind(retriever, generator, ref.to_dict(), dep_args)


def app_builder(args: Dict[str, Any]) -> Application:
    """`serve run serving.app:app_builder checkpoint=DIR [max_batch_size=16 ...]` and a Serve config's import_path."""
    return build_app(ServeArgs(**args))
