"""Model assembly: a `RagModel` from a config, the one place every driver builds its model."""
from __future__ import annotations

from pipeline.config import Config
from pipeline.estimators.independent import require_context_labels
from pipeline.estimators.registry import objective_for
from pipeline.models.generator import build_generator
from pipeline.models.retriever import TextEncoder
from pipeline.rag import RagModel


def build_model(cfg: Config, index, train_rows: list[dict] | None = None) -> RagModel:
    """Query encoder, generator (its output vocabulary from the training answers), the posterior encoder the
    estimator needs and, with `retriever.train_passage_encoder`, a trainable passage encoder."""
    if cfg.train.strategy == "independent" and train_rows is not None:   # fail before any training starts
        require_context_labels(train_rows, f"data.train_qa ({cfg.data.train_qa})" if cfg.data.train_qa
                               else "the training questions")
    encoder = TextEncoder(cfg.retriever.encoder, pooling=cfg.retriever.pooling, normalize=cfg.retriever.normalize,
                          max_length=cfg.retriever.max_length)
    answers = [a for r in train_rows for a in r["answers"]] if train_rows else None
    model = RagModel(encoder, build_generator(cfg.generator, answers), index, tau=cfg.retriever.tau)
    if objective_for(cfg).needs_posterior:
        model.add_posterior_encoder()            # q(z|x,y), initialised from the prior's weights
    if cfg.retriever.train_passage_encoder:      # refreshed into new index versions by jobs/refresh.py
        attach_passage_encoder(model, cfg)
    if cfg.retriever.hybrid_k > 0:               # BM25 proposes candidates too (built once per index version)
        model.attach_bm25(cfg.retriever.hybrid_k, cfg.retriever.bm25_weight)
    return model


def attach_passage_encoder(model: RagModel, cfg: Config) -> RagModel:
    """Give `model` a trainable passage encoder that starts as the encoder the index was built with (same
    pooling, normalisation and length as the encode actors), and the re-ranking depth of `index.rerank_top_m`."""
    if model.passage_encoder is None:
        model.passage_encoder = TextEncoder(cfg.retriever.encoder)
    model.rerank_top_m = int(cfg.index.rerank_top_m)
    return model
