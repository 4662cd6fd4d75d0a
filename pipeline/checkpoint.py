"""A latentrag checkpoint is a plain directory:

    rag.json             tau, estimator, step, index directory and version, encoder fingerprint of the index
    config.yaml          the full resolved run config
    query_encoder/       Hugging Face encoder + tokenizer (safetensors)
    posterior_encoder/   the posterior retriever q(z|x,y) of vrag / jsa (same format; absent for other estimators
                         and in older checkpoints, which load as before)
    passage_encoder/     the trained passage encoder (retriever.train_passage_encoder; absent otherwise)
    generator/           generator weights (safetensors) + its config + tokenizer
    trainer_state.pt     optimizer, schedulers, estimator state (such as JSA caches), RNG, data position

Serving and `latentrag eval` need only the first four; `--resume` also reads trainer_state.pt.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from pipeline.config import Config, from_dict, save_config
from pipeline.index import load_index
from pipeline.models.generator import load_generator
from pipeline.models.retriever import load_encoder, save_encoder
from pipeline.rag import RagModel


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or refused."""


def save_checkpoint(out_dir: str | Path, model: RagModel, cfg: Config, step: int,
                    trainer_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write into a temp directory beside `out_dir`, then rename: a reader never sees half a checkpoint."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_encoder(model.query_encoder, tmp / "query_encoder")
    if getattr(model, "posterior_encoder", None) is not None:
        save_encoder(model.posterior_encoder, tmp / "posterior_encoder")
    if getattr(model, "passage_encoder", None) is not None:
        save_encoder(model.passage_encoder, tmp / "passage_encoder")
    model.generator.save(tmp / "generator")
    save_config(cfg, tmp / "config.yaml")
    meta = {"tau": model.tau, "step": step, "estimator": cfg.train.estimator,
            "index_dir": str(Path(model.index.path).resolve()), "index_version": model.index.version,
            "index_encoder_fingerprint": model.index.manifest.get("encoder_fingerprint"), **(extra or {})}
    (tmp / "rag.json").write_text(json.dumps(meta, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_checkpoint_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / "rag.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a latentrag checkpoint (no rag.json)")
    return json.loads(meta_file.read_text())


def load_checkpoint(path: str | Path, index_dir: str | Path | None = None) -> tuple[RagModel, Config, dict]:
    """(model, config, meta). `index_dir` overrides the index the checkpoint was trained with."""
    import yaml

    path = Path(path)
    meta = read_checkpoint_meta(path)
    cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()), source=path / "config.yaml",
                    upgrade_renamed=True)
    index = load_index(index_dir or meta["index_dir"],
                       expected_encoder_fingerprint=meta.get("index_encoder_fingerprint") if index_dir is None else None)
    posterior = load_encoder(path / "posterior_encoder") if (path / "posterior_encoder").is_dir() else None
    passage = load_encoder(path / "passage_encoder") if (path / "passage_encoder").is_dir() else None
    model = RagModel(load_encoder(path / "query_encoder"), load_generator(path / "generator"), index, tau=meta["tau"],
                     posterior_encoder=posterior, passage_encoder=passage,
                     rerank_top_m=cfg.index.rerank_top_m if passage is not None else 0)
    return model, cfg, meta


def load_trainer_state(path: str | Path) -> dict | None:
    """The trainer state, read with `weights_only=True`: tensors, numbers, strings and containers only, so a
    planted pickle cannot run code on `--resume` (torch refuses any other object with an UnpicklingError)."""
    f = Path(path) / "trainer_state.pt"
    if not f.exists():
        return None
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{f}: refused, it holds objects other than tensors and plain values "
                              f"(a trainer state never does; the file is damaged or not ours): "
                              f"{str(exc).splitlines()[0]}") from None
