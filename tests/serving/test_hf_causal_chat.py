"""Chat history for an hf-causal generator with a chat template (no Ray): earlier turns go into the chat prompt
before the user turn that holds the passage and the question, the oldest are dropped when they would crowd the
passage, decoding with them equals a direct computation, and the Generator deployment's decoding and the OpenAI
extension report history_used. A tiny Qwen2-family model with a chat template built in the test."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))       # the tiny-model helpers
from test_hf_causal_helpers import tiny_generator, tiny_tokenizer  # noqa: E402

from pipeline.decoding import rag_sequence_decode  # noqa: E402
from pipeline.rag import Candidates  # noqa: E402
from serving import openai as oai  # noqa: E402
from serving.app import _decode_group  # noqa: E402
from serving.batching import AnswerItem, Retrieved  # noqa: E402

QUESTION = "Where was Varnel Ostrik born?"
PASSAGES = ["Varnel Ostrik was born in the town of Meridale.", "Varnel Ostrik worked for the Quendle Guild.",
            "Kela Dorn grew up beside the river Ashvane."]
HISTORY = ({"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": "Who is Kela Dorn?"},
           {"role": "assistant", "content": "A zumbrel player."})


def chat_generator(max_source_length=160):
    return tiny_generator("qwen2", tokenizer=tiny_tokenizer(chat=True), chat_template=True,
                          max_source_length=max_source_length).eval()


def prompt_text(gen, inputs, row=0):
    mask = inputs["attention_mask"][row].bool()
    return gen.tokenizer.decode(inputs["input_ids"][row][mask])


def test_earlier_turns_precede_the_user_turn_that_holds_the_passage():
    gen = chat_generator()
    assert gen.uses_history
    text = prompt_text(gen, gen.encode_inputs([QUESTION], [PASSAGES[0]], histories=[HISTORY]))
    assert text == ("<s>system: Answer in a few words.\n<s>user: Who is Kela Dorn?\n<s>assistant: A zumbrel player.\n"
                    "<s>user: Passage: " + PASSAGES[0] + "\nQuestion: " + QUESTION + "\nAnswer:\n<s>assistant:")
    # a plain prompt has no place for turns: ignored
    plain = tiny_generator("qwen2")
    assert not plain.uses_history
    assert torch.equal(plain.encode_inputs([QUESTION], [PASSAGES[0]], histories=[HISTORY])["input_ids"],
                       plain.encode_inputs([QUESTION], [PASSAGES[0]])["input_ids"])


def test_the_oldest_turns_go_when_they_would_crowd_the_passage():
    gen = chat_generator(max_source_length=80)
    long = tuple({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} about the Quendle Guild"}
                 for i in range(12))
    inputs = gen.encode_inputs([QUESTION], [PASSAGES[0]], histories=[long])
    text = prompt_text(gen, inputs)
    assert int(inputs["attention_mask"].sum()) <= 80
    assert "turn 11 about" in text and "turn 0 about" not in text                 # newest kept, oldest dropped
    assert "Passage: Varnel Ostrik was born" in text and text.endswith(QUESTION + "\nAnswer:\n<s>assistant:")


def test_decoding_with_history_scores_the_answer_under_the_chat_prompt():
    gen = chat_generator()
    k = len(PASSAGES)
    cand = Candidates(rows=np.array([[0, 1, 2]]), ids=[["a", "b", "c"]], texts=[PASSAGES], query_vectors=None)
    scores = torch.tensor([[2.0, 1.0, 0.5]])
    model = type("M", (), {"generator": gen})()
    with torch.no_grad():
        out = rag_sequence_decode(model, [QUESTION], k=k, max_len=4, thorough=True, candidates=cand,
                                  doc_scores=scores, histories=[HISTORY])[0]
        bare = rag_sequence_decode(model, [QUESTION], k=k, max_len=4, thorough=True, candidates=cand,
                                   doc_scores=scores)[0]
        # direct: log sum_z p(z|x) p(y | history, passage z, question)
        labels, mask = gen.encode_targets([out.answer] * k)
        inputs = gen.encode_inputs([QUESTION] * k, PASSAGES, histories=[HISTORY] * k)
        seq = (gen.token_logprobs(inputs, labels) * mask).sum(-1)
        direct = torch.logsumexp(seq + torch.log_softmax(scores[0], -1), 0)
    assert out.score == pytest.approx(float(direct), abs=1e-4)
    assert out.score != pytest.approx(bare.score, abs=1e-4)                       # the turns did change the prompt


def test_the_generator_deployment_reports_history_used():
    gen = chat_generator()
    retrieved = Retrieved([{"id": str(i), "title": "", "text": p, "row": i, "score": 1.0 - i, "probability": 0.0,
                            "generator_text": p} for i, p in enumerate(PASSAGES)])
    with_history = AnswerItem({}, QUESTION, "rag-sequence", 3, 1, 4, retrieved=retrieved, history=HISTORY)
    without = AnswerItem({}, QUESTION, "rag-sequence", 3, 1, 4, retrieved=retrieved)
    outs = _decode_group(gen, [with_history, without], thorough=False)
    assert [o.history_used for o in outs] == [True, False]
    assert outs[0].answer == _decode_group(gen, [with_history], thorough=False)[0].answer   # batched == alone
    # a generator without a chat prompt decodes the same item as if it had no history
    plain = tiny_generator("qwen2").eval()
    a, b = _decode_group(plain, [with_history, without], thorough=False)
    assert not a.history_used and (a.answer, a.score) == (b.answer, b.score)

    # the OpenAI extension: the earlier messages are used, a tool message never is
    req = oai.ChatCompletionRequest(model="latentrag", messages=[
        {"role": "developer", "content": "Answer in a few words."}, {"role": "user", "content": "Who is Kela Dorn?"},
        {"role": "tool", "content": "{}"}, {"role": "user", "content": QUESTION}])
    areq, earlier = oai.to_answer_request(req)
    history = oai.chat_history(earlier)
    assert areq.question == QUESTION and [m["role"] for m in history] == ["system", "user"]
    ref = type("Ref", (), {"model_version": "m", "index_version": "v1"})()
    ext = oai.extension(areq, ref, outs[0], retrieved, earlier, "rid")
    assert ext["history_used"] is True and ext["ignored_messages"] == 1 and "tool" in ext["note"]
    ext = oai.extension(areq, ref, b, retrieved, earlier, "rid")
    assert ext["history_used"] is False and ext["ignored_messages"] == 3
