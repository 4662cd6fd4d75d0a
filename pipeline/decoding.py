"""Decoding a RagModel.

- RAG-Sequence: beam search under each of the K passages, then each distinct answer y is scored by
  log sum_k p(z_k|x) p(y|x,z_k): `fast` sums only over the passages whose beams produced y,
  `thorough` rescores every distinct answer under all K passages (one batched pass).
- RAG-Token: beam search over the marginal next-token distribution sum_k p(z_k|x) p(y_t|x,z_k,y_<t).
Each returns the answer, its score (a log-probability) and the K passages with p(z|x) and p(z|x,y).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodedAnswer:
    answer: str
    score: float
    passages: list[dict] = field(default_factory=list)   # {id, text, probability, posterior}


def beam_search(step, n: int, start_id: int, eos_id: int, pad_id: int, num_beams: int, max_len: int,
                device=None, reorder=None, on_step=None) -> list[list[tuple[list[int], float]]]:
    """Generic beam search. Returns, per source, the beams as (token ids without start/eos, total log-probability),
    best first.

    Without `reorder`: `step(prefix [n*num_beams, t]) -> [n*num_beams, V]` log-probabilities, every row every step.
    With `reorder`, only live beams are stepped: `step(prefix [A, t]) -> [A, V]` for the A beams that are neither
    finished nor dead, and `reorder(parents)` is called before each further step with, for every live beam of the
    next step, the position of its parent among the rows of the previous step, so that a stateful step (a decoder
    cache) follows its beams. The step's state starts with one row per source: all beams start identical, so only
    the first is live at the start. `on_step(prefix [n*num_beams, t])`, when given, sees the beams after every
    step (streaming).
    """
    nb = num_beams
    rows_total = n * nb
    prefix = torch.full((rows_total, 1), start_id, dtype=torch.long, device=device)
    scores = torch.zeros(n, nb, device=device)
    scores[:, 1:] = float("-inf")                 # all beams start identical: keep one
    finished = torch.zeros(rows_total, dtype=torch.bool, device=device)
    live = torch.arange(n, device=device) * nb    # rows the step function holds state for, in its order
    for _ in range(max_len):
        if reorder is None:
            logp = step(prefix).float()
            vocab = logp.size(-1)
            if finished.any():
                logp[finished] = float("-inf")
                logp[finished, pad_id] = 0.0      # a finished beam only extends with padding, at no cost
            total = (scores.view(-1, 1) + logp).view(n, nb * vocab)
            top_scores, top_idx = total.topk(nb, dim=-1)
            beam = torch.div(top_idx, vocab, rounding_mode="floor")
            tokens = top_idx % vocab
        else:
            # per live beam its best nb continuations (the best nb of a source are among them), per finished beam
            # itself extended with padding at no cost; then the best nb per source
            logp = step(prefix[live]).float()                                          # [A, V]
            width = min(nb, logp.size(-1))
            cand_lp, cand_tok = logp.topk(width, dim=-1)
            cand = torch.full((rows_total, nb), float("-inf"), device=device)
            cand_tokens = torch.full((rows_total, nb), pad_id, dtype=torch.long, device=device)
            cand[live, :width] = scores.view(-1)[live].unsqueeze(1) + cand_lp
            cand_tokens[live, :width] = cand_tok
            cand[finished, 0] = scores.view(-1)[finished]
            top_scores, top_idx = cand.view(n, nb * nb).topk(nb, dim=-1)
            beam = torch.div(top_idx, nb, rounding_mode="floor")
            tokens = cand_tokens.view(n, nb * nb).gather(1, top_idx)
        rows = (torch.arange(n, device=device).unsqueeze(1) * nb + beam).view(-1)
        prefix = torch.cat([prefix[rows], tokens.view(-1, 1)], dim=1)
        finished = finished[rows] | tokens.view(-1).eq(eos_id)
        scores = top_scores
        if on_step is not None:
            on_step(prefix)
        if reorder is None:
            if bool(finished.all()):
                break
            continue
        next_live = (~finished & scores.view(-1).isfinite()).nonzero().squeeze(1)
        if next_live.numel() == 0:
            break
        position = torch.full((rows_total,), -1, dtype=torch.long, device=device)
        position[live] = torch.arange(live.numel(), device=device)
        reorder(position[rows[next_live]])
        live = next_live
    out = []
    for i in range(n):
        beams = []
        for j in range(nb):
            ids = []
            for tok in prefix[i * nb + j, 1:].tolist():
                if tok in (eos_id, pad_id):
                    break
                ids.append(tok)
            if scores[i, j] > float("-inf"):
                beams.append((ids, float(scores[i, j])))
        out.append(beams)
    return out


def _passages(cand, b: int, doc_logprobs: torch.Tensor, posterior: torch.Tensor | None) -> list[dict]:
    return [{"id": cand.ids[b][k], "text": cand.texts[b][k], "probability": float(doc_logprobs[b, k].exp()),
             "posterior": None if posterior is None else float(posterior[k])}
            for k in range(len(cand.ids[b]))]


def _retrieve_and_encode(model, questions: list[str], k: int, candidates, doc_scores=None, histories=None):
    """Top-k candidates, log p(z|x) [B, K], and generator inputs for every (question, passage) pair.
    `doc_scores` [B, >=k]: the retriever's scores of `candidates` (then `model` needs only a `.generator`).
    `histories`: per question, earlier chat turns for a generator that `uses_history` (retrieval reads the
    question alone)."""
    cand = model.retrieve(questions, k) if candidates is None else candidates.top(k)
    if cand.rows.shape[1] != k:       # a hybrid model reads k + H: the caller passes them (evaluation does)
        raise ValueError(f"decoding reads k={k} passages per question, retrieval gave {cand.rows.shape[1]} (hybrid "
                         "candidates): pass candidates=model.retrieve(questions, k) and k=model.width(k)")
    scores = model.doc_scores(questions, cand) if doc_scores is None else torch.as_tensor(doc_scores)[:, :k]
    doc_lp = torch.log_softmax(scores.float(), -1)
    inputs = model.generator.encode_inputs([q for q in questions for _ in range(k)],
                                           [p for row in cand.texts for p in row],
                                           **_history_arg(model.generator, histories, k))
    return cand, doc_lp, inputs


def _history_arg(gen, histories, repeat: int) -> dict:
    """encode_inputs' `histories=` for rows of `repeat` passages per question, when the generator reads them."""
    if not histories or not getattr(gen, "uses_history", False):
        return {}
    return {"histories": [h for h in histories for _ in range(repeat)]}


@torch.no_grad()
def rag_sequence_decode(model, questions: list[str], k: int = 5, num_beams: int = 1, max_len: int | None = None,
                        thorough: bool = False, candidates=None, doc_scores=None,
                        histories=None) -> list[DecodedAnswer]:
    """`candidates`: an earlier `model.retrieve(questions, >= k)`, reused instead of retrieving again; with
    `doc_scores` (their retriever scores) as well, no retriever is needed. `histories`: per question, the earlier
    chat turns ({role, content}, oldest first) a generator that `uses_history` puts before the question.

    All questions, passages and beams decode together: one encoder pass over the B*K (question, passage) pairs, one
    decoder step per token for every live beam, with the decoder's key/value cache."""
    gen = model.generator
    max_len = max_len or gen.max_target_length
    cand, doc_lp, inputs = _retrieve_and_encode(model, questions, k, candidates, doc_scores, histories)
    b = len(questions)
    box = {"state": gen.start_decoding(inputs)}               # one row per (question, passage): beam 0

    def reorder(parents):
        box["state"] = gen.select_state(box["state"], parents)

    beams = beam_search(lambda prefix: gen.decode_step(box["state"], prefix), b * k, gen.start_token_id,
                        gen.eos_token_id, gen.tokenizer.pad_token_id, num_beams, max_len,
                        device=inputs["input_ids"].device, reorder=reorder)
    results = []
    for i in range(b):
        # answer text -> list of (passage, log p(y|x,z_k)) from the beams that produced it
        produced: dict[str, dict[int, float]] = {}
        for kk in range(k):
            for ids, lp in beams[i * k + kk]:
                text = gen.decode(ids)
                produced.setdefault(text, {})
                produced[text][kk] = max(lp, produced[text].get(kk, float("-inf")))
        texts = list(produced)
        if thorough:
            seq_lp = _score_answers(model, questions[i], cand.texts[i], texts,
                                    histories[i] if histories else None)                     # [A, K]
        else:
            seq_lp = torch.full((len(texts), k), float("-inf"))
            for a, text in enumerate(texts):
                for kk, lp in produced[text].items():
                    seq_lp[a, kk] = lp
        joint = seq_lp + doc_lp[i].cpu().unsqueeze(0)
        scores = torch.logsumexp(joint, dim=1)
        best = int(scores.argmax())
        posterior = torch.softmax(joint[best], 0)
        results.append(DecodedAnswer(texts[best], float(scores[best]), _passages(cand, i, doc_lp.cpu(), posterior)))
    return results


def _score_answers(model, question: str, passages: list[str], answers: list[str], history=None) -> torch.Tensor:
    """[A, K] log p(answer_a | question, passage_k), in one batched forward pass."""
    gen = model.generator
    k = len(passages)
    inputs = gen.encode_inputs([question] * (len(answers) * k), passages * len(answers),
                               **_history_arg(gen, [history] if history else None, len(answers) * k))
    labels, mask = gen.encode_targets([a for a in answers for _ in range(k)])
    token_lp = gen.token_logprobs(inputs, labels)
    return (token_lp * mask).sum(-1).view(len(answers), k).cpu()


@torch.no_grad()
def rag_token_decode(model, questions: list[str], k: int = 5, num_beams: int = 1,
                     max_len: int | None = None, candidates=None, doc_scores=None,
                     on_step=None, histories=None) -> list[DecodedAnswer]:
    """`candidates`, `doc_scores`, `histories`: as for `rag_sequence_decode`. `on_step(prefix [B*num_beams, t])` is called
    after every step (the ids emitted so far, after the start token), e.g. to stream tokens."""
    gen = model.generator
    max_len = max_len or gen.max_target_length
    cand, doc_lp, inputs = _retrieve_and_encode(model, questions, k, candidates, doc_scores, histories)
    b = len(questions)
    device = inputs["input_ids"].device
    # state rows ordered (live beam, passage): every beam of a question sees all K passages; beam 0 at the start
    box = {"state": gen.start_decoding(inputs), "prior": doc_lp.to(device)}             # prior: [live, K]
    offsets = torch.arange(k, device=device)

    def reorder(parents):
        box["state"] = gen.select_state(box["state"], (parents.unsqueeze(1) * k + offsets).view(-1))
        box["prior"] = box["prior"].index_select(0, parents)

    def step(prefix):
        a = prefix.size(0)
        logp = gen.decode_step(box["state"], prefix.repeat_interleave(k, 0)).view(a, k, -1)   # [A, K, V]
        prior = box["prior"].unsqueeze(-1)
        cols = gen.support_columns(box["state"], group=k)                                # [A, C] or None
        if cols is None or cols.size(1) >= logp.size(-1):
            return torch.logsumexp(logp + prior, dim=1)
        # a token outside every passage's support has the floor value under each passage: one marginal per beam
        marginal = torch.logsumexp(logp.gather(2, cols.unsqueeze(1).expand(-1, k, -1)) + prior, dim=1)
        floor = torch.logsumexp(box["prior"] + gen.decode_floor, dim=1, keepdim=True)         # [A, 1]
        return floor.expand(a, logp.size(-1)).contiguous().scatter_(1, cols, marginal)

    beams = beam_search(step, b, gen.start_token_id, gen.eos_token_id, gen.tokenizer.pad_token_id, num_beams,
                        max_len, device=device, reorder=reorder, on_step=on_step)
    results = []
    for i in range(b):
        ids, score = beams[i][0]
        results.append(DecodedAnswer(gen.decode(ids), score, _passages(cand, i, doc_lp.cpu(), None)))
    return results
