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
import hmac
import json
import os
import queue
import time
from collections import OrderedDict, defaultdict
from types import SimpleNamespace
from typing import Any, AsyncIterator, Dict

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serving.loading import ModelRef, ServingLoadError, load_generator_part, load_retriever_part, resolve_model_ref
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


def _unavailable_or_raise(exc: Exception) -> Exception:
    from ray.serve.exceptions import BackPressureError

    return _overloaded() if isinstance(exc, BackPressureError) else exc


# --------------------------------------------------------------------------------------------- model cache
class _VersionCache:
    """The last `keep` loaded versions of one replica's share of the model, loaded one at a time in a thread."""

    def __init__(self, loader, keep: int):
        self._loader = loader
        self._keep = max(1, keep)
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = asyncio.Lock()

    async def get(self, ref: ModelRef):
        model = self._models.get(ref.key)
        if model is None:
            async with self._lock:
                model = self._models.get(ref.key)
                if model is None:
                    model = await asyncio.to_thread(self._loader, ref)
                    self._models[ref.key] = model
                    while len(self._models) > self._keep:
                        self._models.popitem(last=False)   # in-flight users keep their own reference
        self._models.move_to_end(ref.key)
        return model

    def keys(self) -> list[str]:
        return list(self._models)


class _Coalescer:
    """Runs `fn(items) -> results` (same length) over everything submitted while its previous call ran, up to
    `max_items` per call. Serve's @serve.batch forms a batch from what arrives within batch_wait_timeout_s, whether
    or not the model is free, so under load the model would run many small batches one after another; behind a
    coalescer, the batches that queued up while the model was busy run as one."""

    def __init__(self, fn, max_items: int):
        self.fn = fn
        self.max_items = max(1, max_items)
        self._pending: list[tuple[list, asyncio.Future]] = []
        self._running = False

    async def submit(self, items: list) -> list:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((items, fut))
        if not self._running:
            self._running = True
            asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                take, n = [], 0
                while self._pending and (not take or n + len(self._pending[0][0]) <= self.max_items):
                    take.append(self._pending.pop(0))
                    n += len(take[-1][0])
                try:
                    out = await self.fn([x for items, _ in take for x in items])
                except Exception as exc:  # noqa: BLE001 - handed to every caller of this call
                    for _, fut in take:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                pos = 0
                for items, fut in take:
                    if not fut.done():
                        fut.set_result(out[pos:pos + len(items)])
                    pos += len(items)
        finally:
            self._running = False


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _batch_stats(replica) -> dict:
    return {"batches": replica.batches, "requests": replica.batched_requests,
            "mean_batch_size": round(replica.batched_requests / replica.batches, 2) if replica.batches else None}


# --------------------------------------------------------------------------------------------- Retriever
def _retrieve_group(model, items: list[dict]) -> list[dict]:
    """One query-encoder pass and one index search for a group of questions (same model version)."""
    import torch

    from pipeline.index import passage_text

    questions = [it["question"] for it in items]
    kmax = max(it["k"] for it in items)
    with torch.no_grad():
        cand = model.retrieve(questions, kmax)
        scores = model.doc_scores(questions, cand).float().cpu()
    out = []
    for i, it in enumerate(items):
        k = it["k"]
        rows = [int(r) for r in cand.rows[i, :k]]
        s = scores[i, :k]
        prob = torch.softmax(s, -1).tolist()
        passages = []
        for j, row in enumerate(rows):
            p = model.index.passage(row)
            title = p.get("title") or ""
            passages.append({"id": str(p["id"]), "title": title, "text": p["text"], "row": row,
                             "score": float(s[j]), "probability": prob[j],
                             "generator_text": passage_text(title, p["text"])})
        out.append({"passages": passages})
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
        self.models._models[self._initial.key] = load_retriever_part(self._initial)
        self.batches, self.batched_requests = 0, 0

    def stats(self) -> dict:
        """This replica's batching so far: how many batches, how many requests they held."""
        return _batch_stats(self)

    async def prepare(self, ref: dict) -> list[str]:
        """Load a version ahead of a reload (the one being served keeps serving meanwhile)."""
        await self.models.get(ModelRef.from_dict(ref))
        return self.models.keys()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def retrieve(self, items: list[dict]) -> list[dict]:
        """One question per call (/v1/retrieve, /v1/answer/stream); Serve batches the calls."""
        return await self.retrieve_many(items)

    async def retrieve_many(self, items: list[dict]) -> list[dict]:
        """A list of questions in one call: what a Generator batch sends (one handle call per batch, not one per
        request)."""
        self.batches += 1
        self.batched_requests += len(items)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[it["ref"]["key"]].append(i)
        results: list[dict] = [{} for _ in items]
        for idx in groups.values():
            try:
                model = await self.models.get(ModelRef.from_dict(items[idx[0]]["ref"]))
                outs = await asyncio.to_thread(_retrieve_group, model, [items[i] for i in idx])
            except Exception as exc:  # reported per request, never a dead replica
                outs = [{"error": f"{type(exc).__name__}: {exc}"}] * len(idx)
            for i, out in zip(idx, outs):
                results[i] = out
        return results


# --------------------------------------------------------------------------------------------- Generator
def _decode_group(gen, items: list[dict], thorough: bool, on_step=None) -> list[dict]:
    """Decode questions that share model version, mode, k, beams and length in one batched call of the pipeline's
    decoders, on the passages the Retriever found (`candidates=`, `doc_scores=`): one encoder pass over every
    (question, passage) pair of the group, one decoder step per token for all their live beams."""
    import torch

    from pipeline.decoding import rag_sequence_decode, rag_token_decode
    from pipeline.rag import Candidates

    first = items[0]
    ps = [it["retrieved"]["passages"] for it in items]
    cand = Candidates(rows=np.array([[p["row"] for p in row] for row in ps]),
                      ids=[[p["id"] for p in row] for row in ps],
                      texts=[[p["generator_text"] for p in row] for row in ps], query_vectors=None)
    scores = torch.tensor([[p["score"] for p in row] for row in ps], dtype=torch.float32)
    model = SimpleNamespace(generator=gen)            # retrieval happened in the Retriever deployment
    questions = [it["question"] for it in items]
    common = dict(k=first["k"], num_beams=first["num_beams"], max_len=first["max_new_tokens"], candidates=cand,
                  doc_scores=scores)
    with torch.no_grad():
        if first["mode"] == "rag-sequence":
            answers = rag_sequence_decode(model, questions, thorough=thorough, **common)
        else:
            answers = rag_token_decode(model, questions, on_step=on_step, **common)
    return [{"answer": a.answer, "score": a.score,
             "posterior": [p.get("posterior") for p in a.passages]} for a in answers]


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
    """The pieces of an already decoded answer, token by token."""
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
        self.models._models[initial.key] = load_generator_part(initial)
        self.batches, self.batched_requests = 0, 0
        # retrieval and decoding each run over what queued up while they were busy (one of each at a time, so a
        # batch retrieves while the one before it decodes)
        self._retrieval = _Coalescer(self._retrieve_for, self.args.retriever_max_batch_size)
        self._decoding = _Coalescer(self._decode, self.args.max_batch_size)

    def stats(self) -> dict:
        """This replica's batching so far: how many decoder batches, how many requests they held."""
        return _batch_stats(self)

    async def prepare(self, ref: dict) -> list[str]:
        await self.models.get(ModelRef.from_dict(ref))
        return self.models.keys()

    async def _retrieve_for(self, items: list[dict]) -> list[dict]:
        """The passages of every item of a batch that has none yet: ONE call to the Retriever for the batch."""
        need = [i for i, it in enumerate(items) if "retrieved" not in it]
        if not need:
            return items
        try:
            found = await self.retriever.retrieve_many.remote(
                [{"ref": items[i]["ref"], "question": items[i]["question"], "k": items[i]["k"]} for i in need])
        except Exception as exc:                       # the Retriever is overloaded or gone: every item says so
            from ray.serve.exceptions import BackPressureError

            found = [{"error": f"retrieval failed: {type(exc).__name__}: {exc}",
                      "overloaded": isinstance(exc, BackPressureError)}] * len(need)
        items = list(items)
        for i, r in zip(need, found):
            items[i] = dict(items[i], retrieved=r)
        return items

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=16)
    async def answer(self, items: list[dict]) -> list[dict]:
        """Items {ref, question, mode, k, num_beams, max_new_tokens[, retrieved]} -> {answer, score, posterior,
        retrieved, batch_size} or {error}. Items without `retrieved` passages get them from the Retriever, one call
        for the whole batch; batches that arrive while the decoder is busy are decoded together (_Coalescer)."""
        return await self._decoding.submit(await self._retrieval.submit(items))

    async def _decode(self, items: list[dict]) -> list[dict]:
        self.batches += 1
        self.batched_requests += len(items)
        results: list[dict] = [{} for _ in items]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if "error" in it["retrieved"]:
                results[i] = dict(it["retrieved"])
                continue
            groups[(it["ref"]["key"], it["mode"], it["k"], it["num_beams"], it["max_new_tokens"])].append(i)
        for idx in groups.values():
            try:
                gen = await self.models.get(ModelRef.from_dict(items[idx[0]]["ref"]))
                outs = await asyncio.to_thread(_decode_group, gen, [items[i] for i in idx], self.thorough)
            except Exception as exc:
                outs = [{"error": f"{type(exc).__name__}: {exc}"}] * len(idx)
            for i, out in zip(idx, outs):
                results[i] = dict(out, retrieved=items[i]["retrieved"], batch_size=len(items))
        return results

    async def stream(self, item: dict) -> AsyncIterator[dict]:
        """Events {"token": piece} ... then {"done": {answer, score, posterior}}. RAG-Token with one beam streams
        tokens as the decoder emits them (the same `rag_token_decode` call as /v1/answer, watched step by step);
        otherwise the answer is decoded first (the sequence-level choice needs every hypothesis) and its tokens
        follow."""
        gen = await self.models.get(ModelRef.from_dict(item["ref"]))
        if item["mode"] == "rag-token" and item["num_beams"] == 1:
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
        for piece in _pieces(gen, out["answer"]):
            yield {"token": piece}
        yield {"done": out}


# --------------------------------------------------------------------------------------------- ingress
api = FastAPI(
    title="latentrag",
    version="0.1.0",
    description="Retrieval-augmented generation with passages as latent variables: answer questions with "
                "RAG-Sequence or RAG-Token decoding over a trained retriever and generator.",
)


def _passages(retrieved: dict, posterior: list | None = None) -> list[Passage]:
    out = []
    for j, p in enumerate(retrieved["passages"]):
        post = posterior[j] if posterior and j < len(posterior) else None
        out.append(Passage(id=p["id"], title=p["title"], text=p["text"], probability=p["probability"],
                           posterior=post))
    return out


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=256, max_queued_requests=512,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, retriever: DeploymentHandle, generator: DeploymentHandle, ref: dict, args: dict):
        self.retriever = retriever
        self.generator = generator
        self.args = ServeArgs(**args)
        self.active = ModelRef.from_dict(ref)
        self._ref_cache: tuple = (None, None)
        self.reloads = 0
        self._reload_lock = asyncio.Lock()

    # ---- helpers
    def _limits(self, k: int) -> None:
        limit = min(self.args.max_k, self.active.index_count or self.args.max_k)
        if k > limit:
            raise HTTPException(422, f"k={k} is out of range: this server allows 1..{limit} "
                                     f"(max_k {self.args.max_k}, index holds {self.active.index_count} passages)")

    async def _retrieve(self, ref: ModelRef, question: str, k: int) -> dict:
        try:
            out = await self.retriever.retrieve.remote({"ref": self._ref_dict(ref), "question": question, "k": k})
        except Exception as exc:
            raise _unavailable_or_raise(exc)
        if "error" in out:
            raise HTTPException(500, f"retrieval failed: {out['error']}")
        return out

    def _item(self, ref: ModelRef, req: AnswerRequest, retrieved: dict | None = None) -> dict:
        item = {"ref": self._ref_dict(ref), "question": req.question, "mode": req.mode, "k": req.k,
                "num_beams": req.num_beams, "max_new_tokens": req.max_new_tokens}
        if retrieved is not None:
            item["retrieved"] = retrieved
        return item

    def _ref_dict(self, ref: ModelRef) -> dict:
        if self._ref_cache[0] is not ref:          # the active reference changes only on reload
            self._ref_cache = (ref, ref.to_dict())
        return self._ref_cache[1]

    # ---- endpoints
    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> HealthResponse:
        return HealthResponse(status="ok", model_version=self.active.model_version,
                              index_version=self.active.index_version)

    @api.get("/v1/info")
    async def info(self) -> dict:
        return {**self.active.public(), "estimator": self.active.estimator, "tau": self.active.tau,
                "index_count": self.active.index_count, "modes": ["rag-sequence", "rag-token"],
                "limits": {"max_k": min(self.args.max_k, self.active.index_count or self.args.max_k)},
                "batching": {"max_batch_size": self.args.max_batch_size,
                             "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                             "generator_replica": await self.generator.stats.remote(),
                             "retriever_replica": await self.retriever.stats.remote()},
                "reloads": self.reloads}

    @api.post("/v1/retrieve", response_model=RetrieveResponse)
    async def retrieve(self, req: RetrieveRequest) -> RetrieveResponse:
        self._limits(req.k)
        ref = self.active
        retrieved = await self._retrieve(ref, req.question, req.k)
        return RetrieveResponse(passages=_passages(retrieved), model_version=ref.model_version,
                                index_version=ref.index_version)

    @api.post("/v1/answer", response_model=AnswerResponse)
    async def answer(self, req: AnswerRequest) -> AnswerResponse:
        """One handle call per request: the Generator's batch asks the Retriever for the whole batch's passages."""
        self._limits(req.k)
        ref = self.active                       # this request stays on this version to the end
        try:
            out = await self.generator.answer.remote(self._item(ref, req))
        except Exception as exc:
            raise _unavailable_or_raise(exc)
        if "error" in out:
            if out.get("overloaded"):                  # the Generator's call to the Retriever was refused
                raise _overloaded()
            raise HTTPException(500, out["error"] if out["error"].startswith("retrieval failed")
                                else f"generation failed: {out['error']}")
        return AnswerResponse(answer=out["answer"], score=out["score"], mode=req.mode,
                              passages=_passages(out["retrieved"], out.get("posterior")) if req.return_passages
                              else [], model_version=ref.model_version, index_version=ref.index_version)

    @api.post("/v1/answer/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "server-sent events: `token` events {text}, then one `done` event "
                                              "with the AnswerResponse (or an `error` event)"}})
    async def answer_stream(self, req: AnswerRequest) -> StreamingResponse:
        self._limits(req.k)
        ref = self.active
        retrieved = await self._retrieve(ref, req.question, req.k)
        item = self._item(ref, req, retrieved)

        async def events():
            try:
                async for event in self.generator.options(stream=True).stream.remote(item):
                    if "token" in event:
                        yield _sse("token", {"text": event["token"]})
                    else:
                        out = event["done"]
                        resp = AnswerResponse(answer=out["answer"], score=out["score"], mode=req.mode,
                                              passages=_passages(retrieved, out.get("posterior"))
                                              if req.return_passages else [],
                                              model_version=ref.model_version, index_version=ref.index_version)
                        yield _sse("done", resp.model_dump())
            except Exception as exc:            # headers are sent already: report in-band
                yield _sse("error", {"detail": f"{type(exc).__name__}: {exc}"})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _check_admin(self, authorization: str | None) -> None:
        token = self.args.admin_token or os.environ.get(ADMIN_TOKEN_ENV)
        if not token:
            raise HTTPException(401, "reload is disabled: no admin token configured "
                                     f"(set admin_token or {ADMIN_TOKEN_ENV})", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @api.post("/v1/admin/reload", response_model=ReloadResponse,
              openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": ReloadRequest.model_json_schema()}}}})
    async def reload(self, request: Request, authorization: str | None = Header(None)) -> ReloadResponse:
        """Move to a new checkpoint and/or index version without downtime (bearer token required). The token is
        checked before the body is read."""
        self._check_admin(authorization)
        raw = await request.body()
        try:
            req = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
        except ValidationError as exc:
            raise HTTPException(422, [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()])
        async with self._reload_lock:
            t = time.time()
            source = req.checkpoint or self.active.source
            index = req.index if req.index is not None else (None if req.checkpoint else self.active.index_source)
            try:
                new = await asyncio.to_thread(resolve_model_ref, source, index, self.args.download_dir)
            except ServingLoadError as exc:
                raise HTTPException(422, f"cannot reload: {exc}")
            try:                                # load beside the serving version; nothing is swapped yet
                await asyncio.gather(self.retriever.prepare.remote(new.to_dict()),
                                     self.generator.prepare.remote(new.to_dict()))
            except Exception as exc:
                raise HTTPException(500, f"cannot reload: loading failed, still serving "
                                         f"{self.active.model_version}: {exc}")
            previous, self.active = self.active, new
            self.reloads += 1
            return ReloadResponse(previous=previous.public(), current=new.public(), seconds=round(time.time() - t, 3))


# --------------------------------------------------------------------------------------------- building
def build_app(args: ServeArgs | Dict[str, Any], deployments: dict[str, dict] | None = None) -> Application:
    """The application, with per-deployment option overrides (the `deployments:` entries of a Serve config)."""
    a = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    ref = resolve_model_ref(a.checkpoint, a.index, a.download_dir)
    opts = deployments or {}
    unknown = sorted(set(opts) - set(DEPLOYMENT_NAMES))
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown}; this application has {list(DEPLOYMENT_NAMES)}")
    retriever = Retriever.options(**opts.get("Retriever", {})).bind(ref.to_dict(), a.model_dump())
    generator = Generator.options(**opts.get("Generator", {})).bind(retriever, ref.to_dict(), a.model_dump())
    return Ingress.options(**opts.get("Ingress", {})).bind(retriever, generator, ref.to_dict(), a.model_dump())


def app_builder(args: Dict[str, Any]) -> Application:
    """`serve run serving.app:app_builder checkpoint=DIR [max_batch_size=16 ...]` and a Serve config's import_path."""
    return build_app(ServeArgs(**args))
