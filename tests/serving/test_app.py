"""The Serve application end to end over HTTP on 127.0.0.1: answers in both modes, retrieval, streaming, input
errors, the admin token, a reload under concurrent load with zero failed requests, and 503 on overload."""
import json
import threading
import time

import pytest
import requests
from serve_testlib import BODY_LIMIT, TOKEN, serve_log_lines

pytestmark = pytest.mark.ray

Q = "Where was Varnel Ostrik born?"
LONG = " ".join(["where", "was", "the", "person", "named", "Varnel", "Ostrik", "born", "and", "why"] * 15)  # 150 words


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
    import ray                                               # where each replica runs and what it holds, no paths
    for stats in (gen_stats, ret_stats):
        assert stats["node_id"] == ray.nodes()[0]["NodeID"] and stats["replica"]
        assert f"{h['model_version']}@v1" in stats["versions"] and "/" not in "".join(stats["versions"])
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
    k = next(x for x in req["k"]["anyOf"] if x.get("type") == "integer")      # null: the server's default_k
    assert k["minimum"] == 1 and k["maximum"] >= 20
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
    ({"question": "\x00\x00"}, "empty"),
    ({"question": "\u200b\u200b"}, "empty"),
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


def _wait_until(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_reload_under_load_has_zero_failed_requests(served, tiny_checkpoints):
    """Ordering, not durations: a request answered before the reload was sent has the old model, one sent after
    the reload returned has the new one, and none fails, however slow the machine is."""
    _, b, index_root = tiny_checkpoints
    before = requests.get(f"{served}/healthz", timeout=10).json()
    results, stop = [], threading.Event()

    def client(i):
        n = 0
        while not stop.is_set() and n < 300:         # bounded load
            mode = "rag-sequence" if (i + n) % 2 else "rag-token"
            sent = time.monotonic()
            try:
                r = post(f"{served}/v1/answer", {"question": Q, "mode": mode, "k": 3, "max_new_tokens": 4})
                results.append((r.status_code, r.json().get("model_version") if r.ok else r.text, sent,
                                time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - any failure counts
                results.append((None, repr(exc), sent, time.monotonic()))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    _wait_until(lambda: len(results) >= 8)            # load on the old model first
    reload_sent = time.monotonic()
    r = post(f"{served}/v1/admin/reload", {"checkpoint": str(b), "index": str(index_root)},
             headers={"Authorization": f"Bearer {TOKEN}"})
    swapped = time.monotonic()
    _wait_until(lambda: sum(1 for x in results if x[2] > swapped) >= 8)   # and on the new one after it
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["current"]["index_version"] == "v2"
    failures = [x for x in results if x[0] != 200]
    assert not failures, failures[:5]
    old = [v for _, v, _, done in results if done < reload_sent]
    new = [v for _, v, sent, _ in results if sent > swapped]
    assert old and all(v == before["model_version"] for v in old)
    assert new and all(v.startswith("step20-") for v in new)
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


# ------------------------------------------------------------------------------------------ issue 18
def _concurrently(calls):
    """Run the thunks at once (a barrier releases them together, so that they queue into the same batches)."""
    barrier, out = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except Exception as exc:  # noqa: BLE001 - a failure to report, not to hide
            out[i] = repr(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def _raw(url, text):
    return requests.post(url, data=text.encode(), headers={"content-type": "application/json"}, timeout=60)


def _stream_result(url, body):
    with requests.post(url, json=body, stream=True, timeout=60) as r:
        if r.status_code != 200:
            return r.status_code, r.text
        return 200, [e for e, _ in _sse_events(r)]


@pytest.mark.parametrize("endpoint", ["/v1/answer", "/v1/answer/stream", "/v1/retrieve"])
def test_a_poisonous_request_fails_alone(served, endpoint):
    """A 150-word question (the tokenizer's pair truncation used to raise) and a lone surrogate (a TypeError in
    the tokenizer) sent together with good requests: the good ones answer, the long one is truncated and answers,
    the surrogate is a 422; nothing is a 500."""
    url = f"{served}{endpoint}"
    if endpoint.endswith("stream"):
        def good():
            return _stream_result(url, {"question": Q, "k": 3, "max_new_tokens": 4})

        def long():
            return _stream_result(url, {"question": LONG, "k": 3, "max_new_tokens": 4})
    else:
        def good():
            r = post(url, {"question": Q, "k": 3, "max_new_tokens": 4} if "answer" in url else {"question": Q, "k": 3})
            return r.status_code, r.text

        def long():
            body = {"question": LONG, "k": 3}
            r = post(url, dict(body, max_new_tokens=4) if "answer" in url else body)
            return r.status_code, r.text

    def surrogate():
        r = _raw(url, '{"question": "who \\ud83d", "k": 3}')
        return r.status_code, r.text

    calls = [good] * 10 + [long] * 3 + [surrogate] * 3
    out = _concurrently(calls)
    goods, longs, surrogates = out[:10], out[10:13], out[13:]
    assert all(s == 200 for s, _ in goods + longs), [o for o in goods + longs if o[0] != 200][:3]
    if endpoint.endswith("stream"):
        assert all(kinds[-1] == "done" and "error" not in kinds for _, kinds in goods + longs)
    assert all(s == 422 and "surrogate" in body for s, body in surrogates), surrogates


def test_error_bodies_are_short_and_carry_the_request_id(served):
    r = post(f"{served}/v1/answer", {"question": "", "k": 3})
    body = r.json()
    assert r.status_code == 422 and set(body) == {"detail", "request_id"}
    assert body["request_id"] == r.headers["x-request-id"]          # Serve's request id, also in the log
    assert body["detail"][0]["loc"] == ["body", "question"] and "input" not in body["detail"][0]


def test_big_bodies_get_413_and_validation_errors_do_not_echo_input(served):
    big = json.dumps({"question": "x" * (BODY_LIMIT + 10)})
    r = _raw(f"{served}/v1/answer", big)
    assert r.status_code == 413 and len(r.content) < 300 and "limit" in r.json()["detail"]
    chunked = requests.post(f"{served}/v1/answer", data=iter([big[:100].encode(), big[100:].encode()]),
                            headers={"content-type": "application/json"}, timeout=60)   # no content-length
    assert chunked.status_code == 413
    r = post(f"{served}/v1/answer", {"question": "y" * 100_000, "z" * 1000: 1})     # under the limit: 422
    assert r.status_code == 422 and len(r.content) < 1000
    assert "y" * 50 not in r.text and "z" * 100 not in r.text
    r = post(f"{served}/v1/retrieve", {"question": Q, "k": 2})        # the limit leaves small bodies alone
    assert r.status_code == 200


def test_info_shows_versions_not_paths(served, tiny_checkpoints):
    a, _, root = tiny_checkpoints
    for path in ("/v1/info", "/healthz"):
        text = requests.get(f"{served}{path}", timeout=10).text
        assert str(a) not in text and str(root) not in text and str(root.parent) not in text
    info = requests.get(f"{served}/v1/info", timeout=10).json()
    assert info["model_version"] and info["index_version"] and "checkpoint" not in info and "index_dir" not in info


def test_docs_render_offline(served):
    r = requests.get(f"{served}/docs", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/answer" in r.text and "openapi.json" in r.text
    assert "http://" not in r.text and "https://" not in r.text and "<script" not in r.text    # nothing fetched
    assert requests.get(f"{served}/redoc", timeout=10).status_code == 404
    assert "/docs lists the endpoints" in requests.get(f"{served}/openapi.json", timeout=10).json()["info"][
        "description"]


def test_default_k_is_used(served):
    assert len(post(f"{served}/v1/retrieve", {"question": Q}).json()["passages"]) == 5          # default_k 5
    assert len(post(f"{served}/tight/v1/retrieve", {"question": Q}).json()["passages"]) == 2    # default_k=2
    assert requests.get(f"{served}/tight/v1/info", timeout=10).json()["limits"]["default_k"] == 2


def test_a_failed_reload_is_a_short_500_and_the_traceback_is_in_the_server_log(served, tiny_checkpoints, tmp_path):
    import shutil

    a, _, root = tiny_checkpoints
    broken = tmp_path / "broken"
    shutil.copytree(a, broken)
    for f in (broken / "generator").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")                      # resolves, but cannot load
    before = requests.get(f"{served}/healthz", timeout=10).json()
    r = post(f"{served}/v1/admin/reload", {"checkpoint": str(broken), "index": str(root / "v1")},
             headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 500
    body = r.json()
    rid = body["request_id"]
    assert rid in body["detail"] and "still serving" in body["detail"] and len(r.content) < 400
    for leak in ("Traceback", "\x1b[", "pid=", "ip=", "actor", str(broken), ".venv", "site-packages"):
        assert leak not in r.text
    assert requests.get(f"{served}/healthz", timeout=10).json() == before
    deadline = time.time() + 30                                      # Serve writes its log files asynchronously
    while not (logged := serve_log_lines(f"request {rid}", after=60)) and time.time() < deadline:
        time.sleep(0.5)
    assert logged and "reload" in logged[0] and "Traceback" in logged[0]
