"""Decoding with copy-bart's key/value cache and live-beam stepping gives what full recomputation gives: the same
log-probabilities step by step (also against the pre-cache full-vocabulary formula) and the same beams."""
import math

import pytest
import torch

from pipeline.config import GeneratorConfig
from pipeline.decoding import beam_search
from pipeline.models.generator import build_generator

QUESTIONS = ["Where was Varnel Ostrik born?", "Who employed Varnel Ostrik?", "What does Kela Dorn play?"]
PASSAGES = ["Varnel Ostrik was born in the town of Meridale.", "Varnel Ostrik worked for the Quendle Guild.",
            "Kela Dorn plays the zumbrel at festivals.", "Kela Dorn grew up beside the river Ashvane."]
ANSWERS = ["Meridale", "Quendle Guild", "zumbrel", "Ashvane"]


@pytest.fixture(scope="module", params=[ANSWERS, None], ids=["answer-vocab", "full-vocab"])
def gen(request):
    torch.manual_seed(3)
    g = build_generator(GeneratorConfig(dropout=0.0, d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=2,
                                        output_vocab_size=64 if request.param else 0), request.param)
    with torch.no_grad():                          # a sharper, less uniform model than the init: beams differ
        g.gate.bias.fill_(0.0)
        g.copy_query.weight.mul_(20)
    return g.eval()


def reference_step(gen, state, prefix):
    """decode_step as it was before the cache: the whole prefix through the decoder, the mixture over all V."""
    enc = state["enc"]
    dec = gen.bart.decoder(input_ids=prefix, encoder_hidden_states=enc,
                           encoder_attention_mask=state["attention_mask"]).last_hidden_state[:, -1:]
    vocab_logits, attn, p_gen, stop_prob = gen._heads_from_states(state, enc, dec, prefix[:, -1:])
    assert stop_prob is None                       # the bart-encoder copy head has no stop slot
    n, vocab = dec.size(0), len(gen.out_position)
    vocab_prob = dec.new_zeros(n, 1, vocab).index_copy_(-1, gen.out_ids, torch.softmax(vocab_logits, -1))
    copy_prob = dec.new_zeros(n, 1, vocab).scatter_add_(-1, state["input_ids"].unsqueeze(1), attn)
    return torch.log((p_gen * vocab_prob + (1 - p_gen) * copy_prob).clamp_min(1e-12))[:, -1]


def pairs():
    return [q for q in QUESTIONS for _ in PASSAGES], PASSAGES * len(QUESTIONS)


@torch.no_grad()
def test_cached_steps_equal_full_recomputation_through_reorders(gen):
    inputs = gen.encode_inputs(*pairs())
    n = inputs["input_ids"].size(0)
    cached, plain = gen.start_decoding(inputs), gen.start_decoding(inputs)
    prefix = torch.full((n, 1), gen.start_token_id)
    g = torch.Generator().manual_seed(0)
    for t in range(6):
        a = gen.decode_step(cached, prefix)
        b = gen.decode_step(plain, prefix, use_cache=False)
        c = reference_step(gen, plain, prefix)
        assert a.shape == (n, len(gen.tokenizer))
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, c, atol=1e-5)
        assert cached["cache"] is not None and cached["cache"].get_seq_length() == t + 1
        # reorder and drop rows, as beam search does, then extend by the sampled tokens
        rows = torch.randint(0, n, (n - 1,), generator=g) if t % 2 else torch.randperm(n, generator=g)
        tokens = torch.multinomial(a.exp(), 1, generator=g)
        cached, plain = gen.select_state(cached, rows), gen.select_state(plain, rows)
        prefix = torch.cat([prefix, tokens], 1)[rows]
        n = rows.numel()


@torch.no_grad()
def test_a_prefix_that_does_not_extend_the_cache_is_recomputed(gen):
    inputs = gen.encode_inputs(*pairs())
    n = inputs["input_ids"].size(0)
    state = gen.start_decoding(inputs)
    start = torch.full((n, 1), gen.start_token_id)
    gen.decode_step(state, torch.cat([start, torch.full((n, 1), 2000)], 1))
    other = torch.cat([start, torch.full((n, 1), 2001), torch.full((n, 1), 2002)], 1)   # not an extension
    assert torch.allclose(gen.decode_step(state, other), reference_step(gen, state, other), atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_beam_search_with_cache_and_live_beams_equals_full_recomputation(gen, num_beams):
    inputs = gen.encode_inputs(*pairs())
    n = inputs["input_ids"].size(0)
    args = (gen.start_token_id, gen.eos_token_id, gen.tokenizer.pad_token_id, num_beams, 8)
    # before: every beam of every source stepped every step, whole prefixes through the decoder
    full = gen.select_state(gen.start_decoding(inputs), torch.arange(n).repeat_interleave(num_beams))
    expected = beam_search(lambda p: reference_step(gen, full, p), n, *args)
    box = {"state": gen.start_decoding(inputs)}
    calls = []

    def step(prefix):
        calls.append(prefix.size(0))
        return gen.decode_step(box["state"], prefix)

    def reorder(parents):
        box["state"] = gen.select_state(box["state"], parents)

    got = beam_search(step, n, *args, reorder=reorder)
    assert [[ids for ids, _ in src] for src in got] == [[ids for ids, _ in src] for src in expected]
    for src_got, src_exp in zip(got, expected):
        assert [s for _, s in src_got] == pytest.approx([s for _, s in src_exp], abs=1e-4)
    assert calls[0] == n                       # the identical start beams are stepped once
    assert max(calls) <= n * num_beams


def test_live_beam_search_equals_stepping_every_beam_on_random_tables():
    torch.manual_seed(5)
    vocab, eos, pad = 7, 3, 2
    table = torch.log_softmax(torch.randn(997, vocab) * 2, -1)

    def step(prefix):                          # stateless: a function of the prefix only
        keys = (prefix * torch.tensor([7 ** i for i in range(prefix.size(1))])).sum(1) % table.size(0)
        return table[keys]

    for nb in (1, 2, 4):
        a = beam_search(step, 5, 0, eos, pad, nb, 6)
        b = beam_search(step, 5, 0, eos, pad, nb, 6, reorder=lambda parents: None)
        assert [[i for i, _ in s] for s in a] == [[i for i, _ in s] for s in b]
        assert [s for x in a for _, s in x] == pytest.approx([s for x in b for _, s in x], abs=1e-6)
        assert len(b[0]) == nb
        assert all(not math.isinf(s) for x in b for _, s in x)


@torch.no_grad()
def test_encoding_by_length_equals_one_padded_pass(gen):
    qs, ps = pairs()
    qs, ps = qs * 2, [p + " and more words" * (i % 5) for i, p in enumerate(ps * 2)]     # 24 rows, mixed lengths
    inputs = gen.encode_inputs(qs, ps)
    mask = inputs["attention_mask"].bool()
    assert mask.sum(1).unique().numel() > 3
    whole = gen._encode(inputs)
    by_length = gen._encode_by_length(inputs)
    assert torch.allclose(whole[mask], by_length[mask], atol=1e-5)
    assert by_length.shape == whole.shape
    state = gen.start_decoding(inputs)
    prefix = torch.full((len(qs), 1), gen.start_token_id)
    assert torch.allclose(gen.decode_step(state, prefix), reference_step(gen, {**state, "enc": whole}, prefix),
                          atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_rag_token_decode_equals_the_uncached_marginal_beam_search(gen, num_beams):
    """rag_token_decode (cache, live beams, state rows reordered per beam x passage) against the plain algorithm:
    every beam of every question stepped every step over all K passages, whole prefixes through the decoder."""
    from types import SimpleNamespace

    from pipeline.decoding import rag_token_decode
    from pipeline.rag import Candidates

    k, b = len(PASSAGES), len(QUESTIONS)
    scores = torch.randn(b, k, generator=torch.Generator().manual_seed(7)) * 2
    cand = Candidates(rows=torch.zeros(b, k, dtype=torch.long).numpy(), ids=[[str(i) for i in range(k)]] * b,
                      texts=[PASSAGES] * b, query_vectors=None)
    got = rag_token_decode(SimpleNamespace(generator=gen), QUESTIONS, k=k, num_beams=num_beams, max_len=8,
                           candidates=cand, doc_scores=scores)

    inputs = gen.encode_inputs(*pairs())
    rows = (torch.arange(b).view(b, 1, 1) * k + torch.arange(k).view(1, 1, k)).expand(b, num_beams, k).reshape(-1)
    state = gen.select_state(gen.start_decoding(inputs), rows)
    prior = torch.log_softmax(scores, -1).repeat_interleave(num_beams, 0)

    def step(prefix):
        logp = reference_step(gen, state, prefix.repeat_interleave(k, 0)).view(prefix.size(0), k, -1)
        return torch.logsumexp(logp + prior.unsqueeze(-1), dim=1)

    expected = beam_search(step, b, gen.start_token_id, gen.eos_token_id, gen.tokenizer.pad_token_id, num_beams, 8)
    assert [a.answer for a in got] == [gen.decode(src[0][0]) for src in expected]
    assert all(a.answer for a in got) and len({a.answer for a in got}) > 1     # real, question-dependent output
    assert [a.score for a in got] == pytest.approx([src[0][1] for src in expected], abs=1e-4)


@torch.no_grad()
def test_outside_the_support_columns_every_row_of_a_group_has_the_floor(gen):
    inputs = gen.encode_inputs(*pairs())
    state = gen.start_decoding(inputs)
    logp = gen.decode_step(state, torch.full((inputs["input_ids"].size(0), 1), gen.start_token_id))
    k = len(PASSAGES)
    cols = gen.support_columns(state, group=k)
    outside = torch.ones(len(QUESTIONS), logp.size(-1), dtype=torch.bool).scatter_(1, cols, False)
    grouped = logp.view(len(QUESTIONS), k, -1)
    assert bool(outside.any()) == (len(gen.out_ids) < logp.size(-1))     # a full-vocabulary head covers all
    assert bool((grouped.masked_select(outside.unsqueeze(1).expand_as(grouped)) == gen.decode_floor).all())
    inside = grouped.gather(2, cols.unsqueeze(1).expand(-1, k, -1))
    assert bool((inside > gen.decode_floor).any())
