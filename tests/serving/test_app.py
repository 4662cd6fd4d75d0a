"""The Serve application end to end over HTTP on 127.0.0.1: answers in both modes, retrieval, streaming, input
errors, the admin token, a reload under concurrent load with zero failed requests, and 503 on overload."""
import json
import threading
import time

import pytest
import requests

pytestmark = pytest.mark.ray

TOKEN = "test-admin-token"
Q = "Where was Varnel Ostrik born?"


@pytest.fixture(scope="module")
def served(ray_local, tiny_checkpoints, free_port):
    from ray import serve

    from serving.app import build_app

    a, _, _ = tiny_checkpoints
    serve.start(http_options={"host": "127.0.0.1", "port": free_port})
    zero = {"ray_actor_options": {"num_cpus": 0}}
    light = {name: dict(zero) for name in ("Ingress", "Retriever", "Generator")}
    serve.run(build_app({"checkpoint": str(a), "admin_token": TOKEN, "max_batch_size": 8,
                         "batch_wait_timeout_s": 0.005, "generator_threads": 1}, light),
              name="latentrag-test", route_prefix="/")
    # a second application with tiny queue limits, for the overload test
    tight = {**light, "Ingress": {**zero, "max_ongoing_requests": 1, "max_queued_requests": 1}}
    serve.run(build_app({"checkpoint": str(a), "generator_threads": 1}, tight),
              name="latentrag-tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{free_port}"
    serve.delete("latentrag-test")
    serve.delete("latentrag-tight")
    serve.shutdown()


def post(url, body, **kw):
    return requests.post(url, json=body, timeout=60, **kw)


@pytest.mark.parametrize("mode", ["rag-sequence", "rag-token"])
def test_answer(served, mode):
    r = post(f"{served}/v1/answer", {"question": Q, "mode": mode, "k": 3, "num_beams": 2, "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str) and body["score"] <= 0
    assert body["mode"] == mode and body["model_version"].startswith("step10-") and body["index_version"] == "v1"
    assert len(body["passages"]) == 3
    assert {"id", "title", "text", "probability"} <= set(body["passages"][0])
    assert abs(sum(p["probability"] for p in body["passages"]) - 1) < 1e-4
    r = post(f"{served}/v1/answer", {"question": Q, "mode": mode, "k": 2, "return_passages": False})
    assert r.status_code == 200 and r.json()["passages"] == []


def test_retrieve_health_info_openapi(served):
    r = post(f"{served}/v1/retrieve", {"question": Q, "k": 2})
    assert r.status_code == 200, r.text
    passages = r.json()["passages"]
    assert [p["title"] for p in passages] == ["Varnel Ostrik", "Varnel Ostrik"]
    assert passages[0]["id"] == "a"
    h = requests.get(f"{served}/healthz", timeout=10).json()
    assert h["status"] == "ok" and h["index_version"] == "v1"
    assert post(f"{served}/v1/answer", {"question": Q, "k": 2}).status_code == 200
    info = requests.get(f"{served}/v1/info", timeout=10).json()
    assert info["index_count"] == 6 and info["batching"]["max_batch_size"] == 8
    gen_stats = info["batching"]["generator_replica"]       # the answers above went through @serve.batch
    assert gen_stats["batches"] >= 1 and gen_stats["requests"] >= gen_stats["batches"]
    ret_stats = info["batching"]["retriever_replica"]
    assert ret_stats["batches"] >= 1 and ret_stats["requests"] >= ret_stats["batches"]
    spec = requests.get(f"{served}/openapi.json", timeout=10).json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    assert {"/v1/answer", "/v1/answer/stream", "/v1/retrieve", "/healthz", "/v1/info", "/v1/admin/reload"} <= set(paths)
    # the request and response models are documented, with their limits
    assert {"AnswerRequest", "AnswerResponse", "Passage", "RetrieveRequest", "RetrieveResponse", "ReloadResponse",
            "HealthResponse"} <= set(schemas)
    reload_body = paths["/v1/admin/reload"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"checkpoint", "index"} <= set(reload_body["properties"])        # inline: the token is checked first
    answer = paths["/v1/answer"]["post"]
    assert answer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnswerRequest")
    assert answer["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnswerResponse")
    assert "422" in answer["responses"]
    req = schemas["AnswerRequest"]["properties"]
    assert set(req["mode"]["enum"]) == {"rag-sequence", "rag-token"}
    assert req["k"]["minimum"] == 1 and req["k"]["maximum"] >= 20
    assert {"answer", "score", "passages", "model_version", "index_version"} <= set(schemas["AnswerResponse"]["properties"])
    assert {"id", "title", "text", "probability"} <= set(schemas["Passage"]["properties"])
    assert "text/event-stream" in paths["/v1/answer/stream"]["post"]["responses"]["200"]["content"]


def test_answers_reach_the_retriever_through_generator_batches(served):
    """/v1/answer is one handle call from the ingress; the Generator asks the Retriever for its batches' passages
    (Retriever.retrieve_many), so both replicas see every request, in batches."""
    def stats():
        b = requests.get(f"{served}/v1/info", timeout=10).json()["batching"]
        return b["generator_replica"], b["retriever_replica"]

    gen0, ret0 = stats()
    threads = [threading.Thread(target=post, args=(f"{served}/v1/answer", {"question": Q, "k": 2}))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    gen1, ret1 = stats()
    assert gen1["requests"] - gen0["requests"] == 8
    assert ret1["requests"] - ret0["requests"] == 8
    assert 1 <= ret1["batches"] - ret0["batches"] <= 8 and 1 <= gen1["batches"] - gen0["batches"] <= 8


@pytest.mark.parametrize("body, needle", [
    ({"question": ""}, "empty"),
    ({"question": "   "}, "empty"),
    ({"question": "x" * 2001}, "limit"),
    ({"question": Q, "k": 0}, "greater than or equal"),
    ({"question": Q, "k": 7}, "out of range"),        # the index holds 6 passages
    ({"question": Q, "mode": "rag-banana"}, "rag-sequence"),
    ({"question": Q, "num_beams": 0}, "greater than or equal"),
    ({"question": Q, "colour": "blue"}, "extra"),
    ({}, "missing"),
])
def test_bad_input_is_422_with_a_message(served, body, needle):
    r = post(f"{served}/v1/answer", body)
    assert r.status_code == 422, r.text
    assert needle in r.text.lower()


def _sse_events(resp):
    event, out = None, []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    return out


@pytest.mark.parametrize("mode", ["rag-token", "rag-sequence"])
def test_stream_sends_tokens_then_the_answer(served, mode):
    body = {"question": Q, "mode": mode, "k": 3, "max_new_tokens": 6}
    with requests.post(f"{served}/v1/answer/stream", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and "error" not in kinds
    done = events[-1][1]
    tokens = "".join(d["text"] for e, d in events if e == "token")
    assert tokens.replace(" ", "") == done["answer"].replace(" ", "")
    plain = post(f"{served}/v1/answer", body).json()
    assert done["answer"] == plain["answer"]
    assert done["score"] == pytest.approx(plain["score"], abs=1e-4)


def test_reload_needs_the_bearer_token(served):
    assert post(f"{served}/v1/admin/reload", {}).status_code == 401
    assert post(f"{served}/v1/admin/reload", {}, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = post(f"{served}/v1/admin/reload", {"checkpoint": "/nonexistent"},
             headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and "nonexistent" in r.text


def test_reload_under_load_has_zero_failed_requests(served, tiny_checkpoints):
    _, b, index_root = tiny_checkpoints
    before = requests.get(f"{served}/healthz", timeout=10).json()
    results, stop = [], threading.Event()

    def client(i):
        n = 0
        while not stop.is_set() and n < 60:          # bounded load
            mode = "rag-sequence" if (i + n) % 2 else "rag-token"
            try:
                r = post(f"{served}/v1/answer", {"question": Q, "mode": mode, "k": 3, "max_new_tokens": 4})
                results.append((r.status_code, r.json().get("model_version") if r.ok else r.text, time.time()))
            except Exception as exc:  # noqa: BLE001 - any failure counts
                results.append((None, repr(exc), time.time()))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    r = post(f"{served}/v1/admin/reload", {"checkpoint": str(b), "index": str(index_root)},
             headers={"Authorization": f"Bearer {TOKEN}"})
    swapped = time.time()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["current"]["index_version"] == "v2"
    failures = [x for x in results if x[0] != 200]
    assert not failures, failures[:5]
    versions = [v for _, v, _ in results]
    assert before["model_version"] in versions                       # served before the swap
    after = [v for _, v, t in results if t > swapped + 0.5]
    assert after and all(v.startswith("step20-") for v in after)      # and the new model after it
    h = requests.get(f"{served}/healthz", timeout=10).json()
    assert h["index_version"] == "v2" and h["model_version"].startswith("step20-")


def test_overload_gets_503_never_a_crash(served):
    statuses = []

    def one():
        try:
            statuses.append(post(f"{served}/tight/v1/answer", {"question": Q, "k": 3, "num_beams": 2}).status_code)
        except Exception as exc:  # noqa: BLE001
            statuses.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses
    assert requests.get(f"{served}/tight/healthz", timeout=10).status_code == 200
