"""The copy generator, the RagModel glue and decoding, on the real MiniLM and a tiny real index (no Ray)."""
import itertools

import pytest
import torch
from testlib import PASSAGES as BASE_PASSAGES
from testlib import minilm_index

from pipeline.config import GeneratorConfig
from pipeline.decoding import beam_search, rag_sequence_decode, rag_token_decode
from pipeline.estimators import REGISTRY, build_estimator
from pipeline.index import load_index
from pipeline.models.generator import build_generator, load_generator
from pipeline.models.retriever import TextEncoder
from pipeline.rag import RagModel

PASSAGES = BASE_PASSAGES[:4]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


@pytest.fixture(scope="module", params=["bart", "minilm"])
def model(encoder, tmp_path_factory, request):
    """copy-bart with its own small encoder, and with the pretrained MiniLM reading (generator.encoder)."""
    root = minilm_index(tmp_path_factory.mktemp("index"), PASSAGES, encoder)
    torch.manual_seed(0)
    cfg = GeneratorConfig(dropout=0.0, encoder=request.param, decoder_layers=1 if request.param != "bart" else 2)
    gen = build_generator(cfg, ["Meridale", "Quendle Guild", "zumbrel", "Ashvane"])
    return RagModel(encoder, gen, load_index(root), tau=0.05).eval()


def test_copy_head_prefers_passages_that_contain_the_answer_from_the_start(model):
    gen = model.generator
    q = "Where was Varnel Ostrik born?"
    inputs = gen.encode_inputs([q] * 4, [p["text"] for p in PASSAGES])
    labels, mask = gen.encode_targets(["Meridale"] * 4)
    with torch.no_grad():
        seq = (gen.token_logprobs(inputs, labels) * mask).sum(-1)
    print(seq)
    assert int(seq.argmax()) == 0
    assert float(seq[0] - seq[1:].max()) > 3.0       # nats: a signal the retriever can follow


def test_token_logprobs_equal_stepwise_decoding(model):
    gen = model.generator
    inputs = gen.encode_inputs(["Who employed Varnel Ostrik?"] * 2, [PASSAGES[1]["text"], PASSAGES[2]["text"]])
    labels, mask = gen.encode_targets(["Quendle Guild", "zumbrel"])
    with torch.no_grad():
        full = gen.token_logprobs(inputs, labels)
        state = gen.start_decoding(inputs)
        prefix = torch.full((2, 1), gen.start_token_id)
        for t in range(labels.size(1)):
            step = gen.decode_step(state, prefix).gather(1, labels[:, t:t + 1]).squeeze(1)
            assert torch.allclose(step * mask[:, t], full[:, t], atol=1e-5)
            prefix = torch.cat([prefix, labels[:, t:t + 1]], 1)


def test_decode_step_is_a_distribution(model):
    gen = model.generator
    inputs = gen.encode_inputs(["Where was Varnel Ostrik born?"], [PASSAGES[0]["text"]])
    with torch.no_grad():
        logp = gen.decode_step(gen.start_decoding(inputs), torch.full((1, 1), gen.start_token_id))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_generator_save_load_round_trip(model, tmp_path):
    gen = model.generator
    gen.save(tmp_path / "g")
    again = load_generator(tmp_path / "g").eval()
    inputs = gen.encode_inputs(["Where was Varnel Ostrik born?"], [PASSAGES[0]["text"]])
    labels, _ = gen.encode_targets(["Meridale"])
    with torch.no_grad():
        assert torch.allclose(gen.token_logprobs(inputs, labels), again.token_logprobs(inputs, labels), atol=1e-6)


def test_beam_search_finds_the_best_sequence_by_brute_force():
    torch.manual_seed(1)
    vocab, length, eos, start = 4, 3, 3, 0
    table = torch.log_softmax(torch.randn(vocab ** length, vocab), -1)   # next-token table keyed by prefix

    def key(prefix_row):
        k = 0
        for tok in prefix_row[1:].tolist():
            k = k * vocab + tok
        return k

    def step(prefix):
        return torch.stack([table[key(row) % table.size(0)] for row in prefix])

    best = beam_search(step, 1, start, eos, pad_id=2, num_beams=16, max_len=length)[0][0]
    # brute force over all sequences of length <= 3 ending in eos, or of length 3
    scores = {}
    for n in range(1, length + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if 2 in seq or (eos in seq[:-1]) or (n < length and seq[-1] != eos):
                continue
            prefix, total = torch.tensor([[start]]), 0.0
            for tok in seq:
                total += float(step(prefix)[0, tok])
                prefix = torch.cat([prefix, torch.tensor([[tok]])], 1)
            scores[tuple(t for t in seq if t != eos)] = max(total, scores.get(tuple(t for t in seq if t != eos), -1e9))
    target = max(scores, key=scores.get)
    assert tuple(best[0]) == target and best[1] == pytest.approx(scores[target], abs=1e-4)


@pytest.mark.parametrize("thorough", [False, True])
def test_rag_sequence_decode_returns_answer_score_and_passages(model, thorough):
    out = rag_sequence_decode(model, ["Where was Varnel Ostrik born?", "What does Kela Dorn play?"], k=3,
                              num_beams=2, thorough=thorough)
    assert len(out) == 2
    for d in out:
        assert isinstance(d.answer, str) and d.score <= 0.0
        assert len(d.passages) == 3
        assert sum(p["probability"] for p in d.passages) == pytest.approx(1.0, abs=1e-4)
        assert sum(p["posterior"] for p in d.passages) == pytest.approx(1.0, abs=1e-4)


def test_rag_token_decode(model):
    out = rag_token_decode(model, ["Where was Varnel Ostrik born?"], k=3, num_beams=3)
    assert len(out) == 1 and len(out[0].passages) == 3 and out[0].score <= 0.0


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_estimator_loss_backpropagates_into_retriever_and_generator(model, name):
    from pipeline.config import EstimatorConfig

    model.train()
    est = build_estimator(name, k=3, cfg=EstimatorConfig(jsa_num_proposals=4, dro_num_lists=3))
    est.prepare(model)
    out = est.loss(model, ["Where was Varnel Ostrik born?"], ["Meridale"])
    model.zero_grad()
    out.loss.backward()
    assert torch.isfinite(out.loss) and "nll" in out.diagnostics
    q_grad = sum(p.grad.abs().sum() for p in model.query_encoder.parameters() if p.grad is not None)
    g_grad = sum(p.grad.abs().sum() for p in model.generator.parameters() if p.grad is not None)
    assert q_grad > 0 and g_grad > 0
    if est.needs_posterior:
        assert sum(p.grad.abs().sum() for p in model.posterior_encoder.parameters() if p.grad is not None) > 0
        assert "acceptance_rate" in out.diagnostics or "kl" in out.diagnostics
    model.zero_grad()
    model.posterior_encoder = None
    model.eval()


def test_posterior_encoder_starts_as_the_prior_and_round_trips_through_checkpoints(model, tmp_path):
    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.config import Config
    from pipeline.rag import posterior_query

    save_checkpoint(tmp_path / "old", model, Config(), step=1)          # no posterior: loads as before
    plain, _, _ = load_checkpoint(tmp_path / "old")
    assert plain.posterior_encoder is None and not (tmp_path / "old" / "posterior_encoder").exists()
    post = model.add_posterior_encoder()
    try:
        text = [posterior_query("Where was Varnel Ostrik born?", "Meridale")]
        with torch.no_grad():
            assert torch.allclose(post(text), model.query_encoder(text))          # initialised from the prior
            next(post.parameters()).add_(0.01)                                    # now it differs
            cfg = Config()
            cfg.train.estimator = "jsa"
            save_checkpoint(tmp_path / "new", model, cfg, step=2)
            again, _, _ = load_checkpoint(tmp_path / "new")
            assert again.posterior_encoder is not None
            assert torch.allclose(again.posterior_encoder(text), post(text), atol=1e-6)
            assert not torch.allclose(again.posterior_encoder(text), again.query_encoder(text))
    finally:
        model.posterior_encoder = None


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        build_estimator("nope")


def test_a_long_question_is_cut_by_the_generator_and_its_batch_neighbours_are_unchanged(model):
    gen = model.generator
    long_q = "who " + " ".join(["quendle"] * 150) + "?"          # ~600 characters: failed the tokenizer call
    good = ["Where was Ashvane born?", "Which guild made the zumbrel?"]
    passages = ["Ashvane was born in Meridale.", "The Quendle Guild made the zumbrel."]
    alone = gen.encode_inputs(good, passages)
    mixed = gen.encode_inputs([good[0], long_q, good[1]], [passages[0], passages[0], passages[1]])
    assert mixed["input_ids"].shape[1] <= gen.max_source_length
    for i, j in ((0, 0), (2, 1)):
        n = int(alone["attention_mask"][j].sum())
        assert torch.equal(mixed["input_ids"][i, :n], alone["input_ids"][j, :n])
    # the cut question keeps its start and leaves passage tokens to read
    cut = gen.fit_question(long_q)
    assert long_q.startswith(cut) and len(gen.tokenizer(cut, add_special_tokens=False)["input_ids"]) == \
        gen.question_budget()
    labels, _ = gen.encode_targets(["Meridale", "Meridale", "zumbrel"])
    assert torch.isfinite(gen.token_logprobs(mixed, labels)).all()


def test_the_generator_can_be_called_from_several_threads():
    """Serving decodes streams beside batches on one generator: with the fast tokenizer's per-call truncation
    state unguarded, 4 threads x 300 calls mixing pair and single-sequence encodes raised a few "Truncation
    error"s; the generator's tokenizer serialises its calls."""
    import copy
    import pickle
    import threading

    gen = build_generator(GeneratorConfig(d_model=32, ffn_dim=64, encoder_layers=1, decoder_layers=1,
                                          attention_heads=2), ["Meridale"])
    long_q = "who " + " ".join(["quendle"] * 150) + "?"
    errors = []

    def work(i):
        for _ in range(300):
            try:
                if i % 2:
                    gen.encode_inputs([long_q], ["Varnel Ostrik was born in Meridale."])
                else:
                    gen.encode_targets(["Meridale"])
                    gen.decode([5, 6, 7])
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for clone in (copy.deepcopy(gen), pickle.loads(pickle.dumps(gen))):     # the lock does not travel
        assert clone.encode_inputs(["q"], ["p"])["input_ids"].tolist() == gen.encode_inputs(["q"], ["p"])["input_ids"].tolist()


def test_a_pretrained_reader_trains_only_its_top_layers_and_round_trips(tmp_path):
    """generator.encoder=minilm with encoder_train_layers=2: the embeddings (tied to the decoder's input and
    vocabulary head) and the lower 4 layers keep their weights through a step and stay frozen when the trainer
    switches the generator back on; the top layers and the decoder change; save -> load gives the same scores."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(dropout=0.0, encoder="minilm", encoder_train_layers=2, decoder_layers=1)
    gen = build_generator(cfg, ["Meridale", "Ashvane"])
    gen.requires_grad_(False).requires_grad_(True)          # what the trainer does between phases
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    opt = torch.optim.AdamW(gen.trainable_parameters(), lr=1e-2)
    inputs = gen.encode_inputs(["Where was Varnel Ostrik born?"], [PASSAGES[0]["text"]])
    labels, mask = gen.encode_targets(["Meridale"])
    (-(gen.token_logprobs(inputs, labels) * mask).sum()).backward()
    opt.step()
    changed = {n for n, p in gen.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith(("text_encoder.embeddings", "text_encoder.encoder.layer.0.",
                                 "text_encoder.encoder.layer.3.", "bart.shared")) for n in changed)
    assert any(n.startswith("text_encoder.encoder.layer.5.") for n in changed)
    assert any(n.startswith("bart.decoder.layers.0.") for n in changed)
    assert gen.bart.decoder.embed_tokens.weight is gen.text_encoder.embeddings.word_embeddings.weight
    gen.eval().save(tmp_path / "g")
    again = load_generator(tmp_path / "g").eval()
    assert again.hparams["encoder"] == "minilm" and again.hparams["encoder_train_layers"] == 2
    with torch.no_grad():
        assert torch.allclose(gen.token_logprobs(inputs, labels), again.token_logprobs(inputs, labels), atol=1e-6)
    assert {id(p) for p in again.trainable_parameters()} == {
        id(p) for n, p in again.named_parameters() if p.requires_grad}


def test_a_pretrained_reader_refuses_another_tokenizer():
    with pytest.raises(ValueError, match="use the encoder's own tokenizer"):
        build_generator(GeneratorConfig(encoder="minilm", tokenizer=str(_bert_like_tokenizer_dir())))


def _bert_like_tokenizer_dir():
    """A WordPiece tokenizer with a different vocabulary size than MiniLM's, written to a temp dir."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out = tempfile.mkdtemp()
    fast.save_pretrained(out)
    return out
