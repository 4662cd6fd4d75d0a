"""The Generator deployment's batch path without Ray: a batch of requests is decoded with one encoder pass and one
decoder step per token for all of them, and gives what decoding each request alone gives."""
import asyncio
from dataclasses import replace

import pytest

from serving.app import _decode_group, _retrieve_group
from serving.batching import AnswerItem, Coalescer, Retrieved, RetrieveItem
from serving.loading import load_generator_part, load_retriever_part, resolve_model_ref

QUESTIONS = ["Where was Varnel Ostrik born?", "Who employed Varnel Ostrik?", "What does Kela Dorn play?",
             "Where did Kela Dorn grow up?", "What boat does Tamsin Vey sail?", "Where does Tamsin Vey keep bees?"]


@pytest.fixture(scope="module")
def parts(tiny_checkpoints):
    ref = resolve_model_ref(str(tiny_checkpoints[0]))
    return load_retriever_part(ref), load_generator_part(ref)


def items(retriever, mode, k, num_beams):
    found = _retrieve_group(retriever, [RetrieveItem({}, q, k) for q in QUESTIONS])
    return [AnswerItem({}, q, mode, k, num_beams, 6, retrieved=r) for q, r in zip(QUESTIONS, found)]


@pytest.mark.parametrize("mode, num_beams", [("rag-sequence", 1), ("rag-sequence", 3), ("rag-token", 2)])
def test_a_batch_is_one_encoder_pass_and_equals_one_at_a_time(parts, monkeypatch, mode, num_beams):
    retriever, gen = parts
    batch = items(retriever, mode, 3, num_beams)
    alone = [_decode_group(gen, [it], thorough=False)[0] for it in batch]
    calls = {"start": 0, "step": 0, "rows": []}
    start, step = gen.start_decoding, gen.decode_step

    def counting_start(inputs):
        calls["start"] += 1
        calls["rows"].append(inputs["input_ids"].size(0))
        return start(inputs)

    def counting_step(state, prefix, **kw):
        calls["step"] += 1
        return step(state, prefix, **kw)

    monkeypatch.setattr(gen, "start_decoding", counting_start)
    monkeypatch.setattr(gen, "decode_step", counting_step)
    together = _decode_group(gen, batch, thorough=False)
    assert calls["start"] == 1 and calls["rows"] == [len(QUESTIONS) * 3]   # every (question, passage) pair at once
    assert 1 <= calls["step"] <= 6                                          # one step per token for the batch
    assert [o.answer for o in together] == [o.answer for o in alone]
    assert [o.score for o in together] == pytest.approx([o.score for o in alone], abs=1e-4)
    assert all(o.answer for o in together)


def test_retrieval_scores_reach_the_decoder(parts):
    """The passages' prior comes from the Retriever's scores (doc_scores=), not from a second retrieval."""
    retriever, gen = parts
    batch = items(retriever, "rag-sequence", 3, 1)
    flat = [replace(it, retrieved=Retrieved([dict(p, score=0.0) for p in it.retrieved.passages])) for it in batch]
    out, uniform = _decode_group(gen, batch, False), _decode_group(gen, flat, False)
    assert [o.score for o in out] != pytest.approx([o.score for o in uniform], abs=1e-3)
    assert all(len(o.posterior) == 3 and sum(o.posterior) == pytest.approx(1.0, abs=1e-4) for o in uniform)


def test_batches_that_queue_while_the_model_is_busy_run_as_one():
    calls = []

    async def main():
        release = asyncio.Event()

        async def fn(items):
            calls.append(list(items))
            if len(calls) == 1:
                await release.wait()              # the "model" is busy with the first batch
            return [x * 10 for x in items]

        c = Coalescer(fn, max_items=5)
        first = asyncio.ensure_future(c.submit([1]))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(c.submit(b)) for b in ([2, 3], [4], [5, 6], [7])]
        await asyncio.sleep(0)
        release.set()
        return await first, [await r for r in rest]

    first, rest = asyncio.run(main())
    assert calls == [[1], [2, 3, 4, 5, 6], [7]]           # merged up to max_items, in order
    assert first == [10] and rest == [[20, 30], [40], [50, 60], [70]]


def test_a_failed_merged_call_fails_each_of_its_callers():
    async def main():
        async def fn(items):
            raise RuntimeError("boom")

        c = Coalescer(fn, max_items=4)
        return await asyncio.gather(c.submit([1]), c.submit([2]), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))
