"""The OpenAI-compatible routes (serving/openai.py) through the real `openai` client against the served app on
127.0.0.1: a plain call, a streamed call (chat.completion.chunk events, [DONE], the passages on the final chunk),
the model list, and errors in OpenAI's shape (4xx with a message, never a 500)."""
import json

import openai
import pytest
import requests

pytestmark = pytest.mark.ray

Q = "Where was Varnel Ostrik born?"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)


def _versions(served) -> dict:
    return requests.get(f"{served}/v1/models", timeout=10).json()["data"][0]["latentrag"]


def _plain_answer(served, mode, k, max_new_tokens=None):
    body = {"question": Q, "mode": mode, "k": k}
    if max_new_tokens:
        body["max_new_tokens"] = max_new_tokens
    r = requests.post(f"{served}/v1/answer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models(client, served):
    models = client.models.list().data
    assert [m.id for m in models] == ["latentrag"]
    ext = models[0].model_extra["latentrag"]
    health = requests.get(f"{served}/healthz", timeout=10).json()
    assert ext["model_version"] == health["model_version"] and ext["index_version"] == health["index_version"]
    assert ext["modes"] == ["rag-sequence", "rag-token"] and ext["index_count"] == 6
    assert client.models.retrieve("latentrag").id == "latentrag"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert "gpt-4o" in err.value.message and err.value.code == "model_not_found"


@pytest.mark.parametrize("mode", ["rag-sequence", "rag-token"])
def test_plain_call_carries_answer_and_passages(client, served, mode):
    out = client.chat.completions.create(
        model="latentrag", max_tokens=6, temperature=0.7,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": Q}],
        extra_body={"latentrag": {"mode": mode, "k": 3}})
    assert out.object == "chat.completion" and out.model == "latentrag"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    plain = _plain_answer(served, mode, 3, 6)
    assert choice.message.content == plain["answer"]           # the same decoding as /v1/answer
    ext = out.model_extra["latentrag"]
    versions = _versions(served)
    assert ext["mode"] == mode and ext["model_version"] == versions["model_version"]
    assert ext["index_version"] == versions["index_version"]
    assert ext["history_used"] is False and ext["ignored_messages"] == 3 and "no chat prompt" in ext["note"]
    assert ext["score"] == pytest.approx(plain["score"], abs=1e-4)
    passages = ext["passages"]
    assert [p["id"] for p in passages] == [p["id"] for p in plain["passages"]] and len(passages) == 3
    assert passages[0]["title"] == "Varnel Ostrik" and passages[0]["text"]
    assert abs(sum(p["probability"] for p in passages) - 1) < 1e-4
    assert all(isinstance(p["score"], float) for p in passages)
    if mode == "rag-sequence":          # how much each passage explains the answer
        assert abs(sum(p["posterior"] for p in passages) - 1) < 1e-4
    else:
        assert all(p["posterior"] is None for p in passages)


@pytest.mark.parametrize("mode", ["rag-token", "rag-sequence"])
def test_streamed_call(client, served, mode):
    stream = client.chat.completions.create(model="latentrag", messages=[{"role": "user", "content": Q}],
                                            stream=True, max_tokens=6, stream_options={"include_usage": True},
                                            extra_body={"latentrag": {"mode": mode, "k": 3}})
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    final = chunks[-1]
    assert final.choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    plain = _plain_answer(served, mode, 3, 6)
    assert text == plain["answer"]
    ext = final.model_extra["latentrag"]
    assert [p["id"] for p in ext["passages"]] == [p["id"] for p in plain["passages"]]
    assert ext["mode"] == mode and ext["ignored_messages"] == 0
    # on the wire: `data: {chunk}` events, the last one `data: [DONE]`
    body = {"model": "latentrag", "messages": [{"role": "user", "content": Q}], "stream": True}
    with requests.post(f"{served}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines(decode_unicode=True) if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
    assert json.loads(lines[-2][6:])["latentrag"]["passages"]


def test_client_error(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": Q}])
    assert "gpt-4o" in err.value.message and "latentrag" in err.value.message
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="latentrag", messages=[{"role": "assistant", "content": "Paris"}])
    assert "last message" in err.value.message and err.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:         # also when streaming: before any chunk
        list(client.chat.completions.create(model="latentrag", messages=[], stream=True))
    assert err.value.param == "messages"


def _user(content=Q):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("body, status, param, needle", [
    ({"model": "latentrag", "messages": []}, 400, "messages", "at least one"),
    ({"model": "latentrag", "messages": [{"role": "user"}]}, 400, "messages[0].content", "no content"),
    ({"model": "latentrag", "messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", "no content"),
    ({"model": "latentrag", "messages": [{"role": "system", "content": "x"}, {"role": "user"}]}, 400,
     "messages[1].content", "no content"),
    ({"model": "latentrag", "messages": _user() + [{"role": "assistant", "content": "Paris"}]}, 400,
     "messages[1].role", "last message"),
    ({"model": "latentrag", "messages": [{"role": "system", "content": "be brief"}]}, 400, "messages[0].role",
     "last message"),
    ({"model": "nope", "messages": _user()}, 404, "model", "does not exist"),
    ({"model": "latentrag", "messages": _user(), "stream": True, "n": 2}, 400, "n", "streamed or not"),
    ({"model": "latentrag", "messages": _user(), "n": 3}, 400, "n", "deterministic"),
    ({"model": "latentrag", "messages": _user(), "stream": True, "latentrag": {"mode": "rag-banana"}}, 400,
     "latentrag.mode", "rag-sequence"),
    ({"model": "latentrag", "messages": _user(), "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ({"model": "latentrag", "messages": _user(), "top_p": 0.5}, 400, "top_p", "sampled"),
    ({"model": "latentrag", "messages": _user(), "stop": ["\n"]}, 400, "stop", "stop"),
    ({"model": "latentrag", "messages": _user(), "logprobs": True}, 400, "logprobs", "latentrag.score"),
    ({"model": "latentrag", "messages": _user("   ")}, 400, "messages[0].content", "empty"),
    ({"model": "latentrag", "messages": _user("x" * 2001)}, 400, "messages[0].content", "limit"),
    ({"model": "latentrag", "messages": _user([{"type": "image_url", "image_url": {"url": "x"}}])}, 400,
     "messages[0].content[0]", "only text"),
    ({"model": "latentrag", "messages": [{"role": "wizard", "content": Q}]}, 400, "messages[0].role", "should be"),
    ({"model": "latentrag", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ({"model": "latentrag", "messages": _user(), "latentrag": {"k": 7}}, 400, None, "out of range"),
    ({"messages": _user()}, 400, "model", "required"),
])
def test_bad_input_is_an_openai_error(served, body, status, param, needle):
    r = requests.post(f"{served}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert needle in err["message"], err
    assert "wizard" not in err["message"] and "x" * 50 not in err["message"]     # the input is not echoed


def test_invalid_json_and_text_parts(served):
    r = requests.post(f"{served}/v1/chat/completions", data=b"{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    parts = [{"type": "text", "text": "Where was Varnel "}, {"type": "text", "text": "Ostrik born?"}]
    r = requests.post(f"{served}/v1/chat/completions", timeout=60,
                      json={"model": "latentrag", "messages": _user(parts), "latentrag": {"k": 2}})
    assert r.status_code == 200, r.text
    assert r.json()["latentrag"]["passages"][0]["title"] == "Varnel Ostrik"


def test_other_routes_keep_their_error_shape(served):
    r = requests.post(f"{served}/v1/answer", json={"question": ""}, timeout=30)
    assert r.status_code == 422 and set(r.json()) == {"detail", "request_id"}
    spec = requests.get(f"{served}/openapi.json", timeout=10).json()
    assert {"/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    assert "ChatCompletionRequest" in spec["components"]["schemas"]
