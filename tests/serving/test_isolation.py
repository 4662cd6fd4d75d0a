"""One request's input never fails its neighbours (no Ray): questions the tokenizer cannot take are refused by the
schema (422) or truncated before the batched tokenizer call, a batched call that raises is rerun item by item,
and error texts are short (no tracebacks, no echoed input)."""
import asyncio
import json
import logging

import pytest
from pydantic import ValidationError

from serving.app import _decode_group, _retrieve_group, docs_page, sse_events
from serving.batching import Answer, AnswerItem, ItemError, RetrieveItem, run_each
from serving.errors import validation_details
from serving.loading import load_generator_part, load_retriever_part, resolve_model_ref
from serving.schemas import AnswerRequest, RetrieveRequest, ServeArgs

GOOD = ["Where was Varnel Ostrik born?", "What does Kela Dorn play?", "Where does Tamsin Vey keep bees?"]
LONG = " ".join(["where", "was", "the", "person", "named", "Varnel", "Ostrik", "born", "and", "why"] * 15)  # 150 words


@pytest.fixture(scope="module")
def parts(tiny_checkpoints):
    ref = resolve_model_ref(str(tiny_checkpoints[0]))
    return load_retriever_part(ref), load_generator_part(ref)


def answer_items(retriever, questions, mode="rag-sequence"):
    found = _retrieve_group(retriever, [RetrieveItem({}, q, 3, f"r{i}") for i, q in enumerate(questions)])
    return [AnswerItem({}, q, mode, 3, 1, 4, f"r{i}", r) for i, (q, r) in enumerate(zip(questions, found))]


# ------------------------------------------------------------------------------------------ the schema
@pytest.mark.parametrize("question", ["who \ud83d", "\udc00 where", "a\ud800b"])
def test_lone_surrogates_are_refused_by_the_schema(question):
    for model in (AnswerRequest, RetrieveRequest):
        with pytest.raises(ValidationError, match="not valid Unicode"):
            model(question=question)


@pytest.mark.parametrize("question", ["\x00\x00", "\u200b\u200b", "\ufeff\u200d\u2060", "\x00 \u200b\t\n", "\x7f"])
def test_only_control_or_format_characters_is_an_empty_question(question):
    with pytest.raises(ValidationError, match="empty"):
        AnswerRequest(question=question)


def test_control_characters_inside_a_question_become_spaces_and_format_characters_go():
    assert AnswerRequest(question="where\x00was\u200b he\tborn\n").question == "where was he born"
    assert AnswerRequest(question=GOOD[0]).question == GOOD[0]
    assert AnswerRequest(question="Où est né Ostrik? 東京 🙂").question == "Où est né Ostrik? 東京 🙂"


def test_default_k_is_an_argument_that_must_fit_max_k():
    assert AnswerRequest(question="q").k is None                  # the server's default_k applies
    with pytest.raises(ValidationError, match="default_k"):
        ServeArgs(checkpoint="x", default_k=30, max_k=20)


# ------------------------------------------------------------------------------------------ long questions
def test_a_long_question_is_truncated_to_the_generators_question_budget(parts):
    _, gen = parts
    budget = gen.question_budget()
    assert budget == gen.max_source_length // 2 - 3                # [CLS] q [SEP] p [SEP]
    cut = gen.fit_question(LONG)
    assert LONG.startswith(cut) and len(cut) < len(LONG)
    assert len(gen.tokenizer(cut, add_special_tokens=False)["input_ids"]) == budget
    assert gen.fit_question(GOOD[0]) == GOOD[0]


def test_a_long_question_in_a_batch_decodes_and_leaves_the_others_unchanged(parts):
    retriever, gen = parts
    alone = _decode_group(gen, answer_items(retriever, GOOD), thorough=False)
    mixed = answer_items(retriever, GOOD[:1] + [LONG] + GOOD[1:])
    together = _decode_group(gen, mixed, thorough=False)          # raised "Truncation error" before
    assert all(isinstance(o, Answer) for o in together)
    assert [o.answer for o in together[:1] + together[2:]] == [o.answer for o in alone]


# ------------------------------------------------------------------------------------------ per-item fallback
def test_a_failing_item_fails_alone_and_its_neighbours_get_their_results(parts):
    retriever, gen = parts
    items = answer_items(retriever, GOOD)
    poison = AnswerItem({}, "who \ud83d", "rag-sequence", 3, 1, 4, "poison", items[0].retrieved)
    batch = items[:1] + [poison] + items[1:]
    out = run_each(lambda its: _decode_group(gen, its, False), batch, "generation")
    assert [type(o) for o in out] == [Answer, ItemError, Answer, Answer]
    assert out[1] == ItemError("generation failed", "poison")
    expected = _decode_group(gen, items, False)
    assert [o.answer for o in out if isinstance(o, Answer)] == [o.answer for o in expected]
    rout = run_each(lambda its: _retrieve_group(retriever, its), [RetrieveItem({}, GOOD[0], 2, "a"),
                                                                   RetrieveItem({}, "x \udc00", 2, "b")], "retrieval")
    assert len(rout[0].passages) == 2 and rout[1] == ItemError("retrieval failed", "b")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_run_each_logs_the_traceback_with_the_request_id():
    def fn(items):
        if any(i.request_id == "bad" for i in items):
            raise RuntimeError("secret internals /home/x pid 123")
        return [i.question for i in items]

    handler = _Records()
    logging.getLogger("ray.serve").addHandler(handler)         # Serve's logger does not propagate to the root
    try:
        out = run_each(fn, [RetrieveItem({}, "a", 1, "ok"), RetrieveItem({}, "b", 1, "bad")], "retrieval")
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)
    assert out == ["a", ItemError("retrieval failed", "bad")]
    assert "secret internals" not in out[1].message
    failed = [r for r in handler.records if "request bad" in r.getMessage()]
    assert failed and failed[0].exc_info and "secret internals" in str(failed[0].exc_info[1])


# ------------------------------------------------------------------------------------------ error texts
def test_an_sse_error_event_is_short_and_names_the_request_id():
    traceback = ("\x1b[36mray::ServeReplica:latentrag:Generator.handle_request()\x1b[39m (pid=4242, "
                 "ip=10.1.2.3, actor_id=abc)\n  File \"/home/user/latentrag/.venv/lib/python3.11/x.py\", line 1\n"
                 + "RuntimeError: boom\n" * 200)

    async def failing():
        yield {"token": "Mer"}
        raise RuntimeError(traceback)

    async def collect(events):
        return [e async for e in sse_events(events, lambda out: {}, "rid-1")]

    events = asyncio.run(collect(failing()))
    assert events[0].startswith("event: token")
    assert events[-1].startswith("event: error")
    body = json.loads(events[-1].split("data: ", 1)[1])
    assert body == {"detail": body["detail"], "request_id": "rid-1"} and "rid-1" in body["detail"]
    for leak in ("pid=", "10.1.2.3", "/home/", "\x1b[", "Traceback", "boom", "actor_id"):
        assert leak not in events[-1]
    assert len(events[-1]) < 300

    async def replica_error():                 # the Generator reported its own failure in-band
        yield {"error": ItemError("generation failed", "rid-1")}
        yield {"token": "never sent"}

    events = asyncio.run(collect(replica_error()))
    assert len(events) == 1 and json.loads(events[0].split("data: ", 1)[1])["request_id"] == "rid-1"


def test_validation_details_never_echo_the_input():
    with pytest.raises(ValidationError) as err:
        AnswerRequest(question="x" * 100_000, **{"y" * 5000: 1})
    details = validation_details(err.value.errors())
    text = json.dumps(details)
    assert len(text) < 1000 and "x" * 100 not in text and "y" * 100 not in text
    assert all(set(d) == {"loc", "msg", "type"} for d in details)
    assert {d["type"] for d in details} == {"value_error", "extra_forbidden"}


def test_the_docs_page_is_self_contained():
    from serving.app import api

    page = docs_page(api.openapi())
    assert "/v1/answer" in page and "openapi.json" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert api.docs_url is None and api.redoc_url is None          # Swagger UI/ReDoc would load from a CDN
