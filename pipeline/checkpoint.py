"""A latentrag checkpoint is a plain directory:

    rag.json             tau, estimator, step, index directory and version, encoder fingerprint of the index, and
                         `index_ref`: where the index is after a move (see `resolve_index_dir`)
    config.yaml          the full resolved run config
    query_encoder/       Hugging Face encoder + tokenizer (safetensors)
    posterior_encoder/   the posterior retriever q(z|x,y) of vrag / jsa (same format; absent for other estimators
                         and in older checkpoints, which load as before)
    passage_encoder/     the trained passage encoder (retriever.train_passage_encoder; absent otherwise)
    generator/           generator weights (safetensors) + its config + tokenizer
    trainer_state.pt     optimizer, schedulers, estimator state (such as JSA caches), RNG, data position; large
                         state tensors whose rows are mostly zero are stored row-sparse (`pack_state`)
    index/               optional: a bundled copy of the index version (MLflow's `model/` when the index is small)

Serving and `latentrag eval` need only the first four; `--resume` also reads trainer_state.pt.

A checkpoint finds its index after the run directory moved: rag.json's `index_ref` holds the index version's path
relative to the run directory (`run_relative`, tried from the checkpoint directory and each directory above it),
the absolute path as a fallback, and the version's fingerprint (version, embeddings SHA-256, encoder fingerprint,
count) that every candidate must match.
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
from pipeline.models.retriever import encoder_fingerprint, load_encoder, save_encoder
from pipeline.rag import RagModel


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or refused."""


# How far above a checkpoint directory its run directory may be: OUTPUT_DIR/checkpoint (1),
# OUTPUT_DIR/ray_results/<run>/checkpoint_N (3), OUTPUT_DIR/mlartifacts/[<exp>/]<run>/artifacts/model (4-5).
RUN_DIR_DEPTH = 6
BUNDLED_INDEX = "index"


def index_reference(index, run_dir: str | Path | None) -> dict:
    """rag.json's `index_ref`: where the index version is (relative to the run directory, and absolute) and what
    it must be (its fingerprint), so that a moved or downloaded checkpoint finds it and never takes another."""
    version_dir = Path(index.path).resolve()
    m = index.manifest
    ref = {"absolute": str(version_dir), "version": m.get("version"), "count": m.get("count"),
           "embeddings_sha256": m.get("embeddings_sha256"), "encoder_fingerprint": m.get("encoder_fingerprint"),
           "corpus_fingerprint": m.get("corpus_fingerprint")}
    if run_dir:
        ref["run_relative"] = os.path.relpath(version_dir, Path(run_dir).resolve())
    return ref


def _manifest_mismatch(manifest: dict, ref: dict) -> str | None:
    for key in ("version", "embeddings_sha256", "encoder_fingerprint"):
        if ref.get(key) and manifest.get(key) != ref[key]:
            return f"another index ({key} {manifest.get(key)}, expected {ref[key]})"
    return None


def _bundled_complete(path: Path) -> bool:
    """A bundled index counts only when all its files came along (MLflow's model/index always holds the
    manifest, the data files only when the index was small enough to bundle)."""
    try:
        files = json.loads((path / "manifest.json").read_text()).get("files") or {}
    except (OSError, ValueError):
        return False
    return bool(files) and all((path / name).is_file() for name in files.values())


def index_candidates(path: str | Path, meta: dict) -> list[tuple[str, Path]]:
    """(how, directory) in the order they are tried: relative to the run directory (from the checkpoint and each
    directory above it), a bundled copy, the absolute path (also the older `index_dir`)."""
    path = Path(path).absolute()
    ref = meta.get("index_ref") or {}
    out: list[tuple[str, Path]] = []
    if ref.get("run_relative"):
        for parent in [path, *path.parents][:RUN_DIR_DEPTH + 1]:
            out.append(("relative to the run directory", parent / ref["run_relative"]))
    out.append(("bundled", path / BUNDLED_INDEX))
    for absolute in (ref.get("absolute"), meta.get("index_dir")):
        if absolute:
            out.append(("absolute path", Path(absolute)))
    seen, unique = set(), []
    for how, d in out:
        key = os.path.normpath(str(d))
        if key not in seen:
            seen.add(key)
            unique.append((how, Path(key)))
    return unique


def resolve_index_dir(path: str | Path, meta: dict | None = None) -> Path:
    """The index version this checkpoint was trained with, wherever the run directory is now (see the module
    doc). Raises CheckpointError naming what is missing, where it looked, and `--index` to point at it."""
    meta = meta if meta is not None else read_checkpoint_meta(path)
    ref = meta.get("index_ref") or {"version": meta.get("index_version"),
                                    "encoder_fingerprint": meta.get("index_encoder_fingerprint"),
                                    **({"embeddings_sha256": (meta.get("index_manifest") or {}).get("embeddings_sha256")}
                                       if meta.get("index_manifest") else {})}
    tried, relative_missing = [], 0
    for how, d in index_candidates(path, meta):
        manifest_file = d / "manifest.json"
        if not manifest_file.is_file() or (how == "bundled" and not _bundled_complete(d)):
            if how.startswith("relative"):
                relative_missing += 1
            elif how != "bundled" or manifest_file.is_file():
                tried.append(f"{d} ({how}: {'incomplete' if manifest_file.is_file() else 'missing'})")
            continue
        why = _manifest_mismatch(json.loads(manifest_file.read_text()), ref)
        if why is None:
            return d
        tried.append(f"{d} ({how}: {why})")
    if relative_missing:
        tried.insert(0, f"{ref['run_relative']} under {Path(path).absolute()} and the directories above it (missing)")
    what = ", ".join(f"{k} {ref[k]}" for k in ("version", "count", "embeddings_sha256") if ref.get(k))
    raise CheckpointError(f"{path}: the index this model was trained with ({what or 'unnamed'}) is not found; "
                          f"looked at {'; '.join(tried) or 'nothing (the checkpoint names no index)'}. Point at "
                          "it with --index DIR (`latentrag eval --index`, `latentrag serve --index`)")


# ------------------------------------------------------------------------------------------------ trainer state
# AdamW keeps two fp32 moments per parameter. MiniLM's 30522x384 word embedding (and the generator's) get a dense
# gradient every step, but only the rows of tokens the run has seen are ever non-zero: in a 40-step demo 539 of
# 30522 (MiniLM) and 1358 of 30522 (copy-bart), 119 of the 210 MB trainer_state.pt otherwise. Such tensors are stored as (row indices, those rows); every other row is exactly zero (compared bit for
# bit, so -0.0 survives), and unpacking restores the same tensor.
_SPARSE_TAG = "__row_sparse__"
_SPARSE_MIN_NUMEL = 1 << 16


def _pack_tensor(t: torch.Tensor):
    if t.dim() < 2 or t.numel() < _SPARSE_MIN_NUMEL or t.layout != torch.strided:
        return t
    bits = t.detach().contiguous().view(torch.uint8).reshape(t.shape[0], -1)
    rows = bits.ne(0).any(dim=1).nonzero().flatten()
    if rows.numel() * 2 > t.shape[0]:
        return t
    return {_SPARSE_TAG: True, "shape": list(t.shape), "rows": rows, "values": t[rows].clone()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a, b) if a.dim() == 0 else torch.equal(a.contiguous().view(torch.uint8),
                                                               b.contiguous().view(torch.uint8))


# train.retriever_anchor_kl keeps a frozen copy of the starting query encoder (90 MB for MiniLM). When it is the
# configured encoder as shipped, trainer_state.pt names it instead (with its fingerprint) and loading rebuilds it.
_START_TAG = "__start_encoder__"
_start_cache: dict = {}


def _start_encoder_state(name: str) -> tuple[str, dict]:
    from pipeline.models.retriever import TextEncoder

    fp = encoder_fingerprint(name)
    if _start_cache.get("key") != (name, fp):
        _start_cache.clear()
        _start_cache.update(key=(name, fp), state=TextEncoder(name).state_dict())
    return fp, _start_cache["state"]


def anchor_by_reference(state: dict, encoder_name: str) -> dict:
    """`state` with the anchor's encoder replaced by a reference to `encoder_name`, when it is bit for bit that
    encoder's weights (a run that started from a trained checkpoint keeps its full copy)."""
    anchor = state.get("anchor")
    if not isinstance(anchor, dict) or not isinstance(anchor.get("encoder"), dict):
        return state
    fp, start = _start_encoder_state(encoder_name)
    enc = anchor["encoder"]
    if enc.keys() != start.keys() or not all(_bits_equal(enc[k], start[k]) for k in enc):
        return state
    return {**state, "anchor": {**anchor, "encoder": {_START_TAG: encoder_name, "fingerprint": fp}}}


def _anchor_from_reference(state: dict, f: Path) -> dict:
    anchor = state.get("anchor")
    ref = anchor.get("encoder") if isinstance(anchor, dict) else None
    if not (isinstance(ref, dict) and _START_TAG in ref):
        return state
    fp, start = _start_encoder_state(ref[_START_TAG])
    if fp != ref["fingerprint"]:
        raise CheckpointError(f"{f}: the retriever anchor is the start encoder {ref[_START_TAG]!r} with fingerprint "
                              f"{ref['fingerprint']}, but that encoder's files now have fingerprint {fp}")
    return {**state, "anchor": {**anchor, "encoder": dict(start)}}


def pack_state(obj):
    """trainer state -> the same with mostly-zero tensors stored row-sparse (still tensors and plain values)."""
    if isinstance(obj, torch.Tensor):
        return _pack_tensor(obj)
    if isinstance(obj, dict):
        return {k: pack_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [pack_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(pack_state(v) for v in obj)
    return obj


def unpack_state(obj):
    if isinstance(obj, dict):
        if obj.get(_SPARSE_TAG) is True:
            values = obj["values"]
            out = torch.zeros(obj["shape"], dtype=values.dtype)
            out[obj["rows"]] = values
            return out
        return {k: unpack_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(unpack_state(v) for v in obj)
    return obj


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
            "index_encoder_fingerprint": model.index.manifest.get("encoder_fingerprint"),
            "index_ref": index_reference(model.index, cfg.output_dir), **(extra or {})}
    (tmp / "rag.json").write_text(json.dumps(meta, indent=2))
    if trainer_state is not None:
        trainer_state = anchor_by_reference(trainer_state, cfg.retriever.encoder)
        torch.save(pack_state(trainer_state), tmp / "trainer_state.pt")
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


def load_checkpoint(path: str | Path, index_dir: str | Path | None = None,
                    open_index=None) -> tuple[RagModel, Config, dict]:
    """(model, config, meta). `index_dir` overrides the index the checkpoint was trained with (else it is found
    by `resolve_index_dir`, also after a move). `open_index(version_dir, expected_encoder_fingerprint)` opens it
    another way than `load_index` (a training worker: through index-shard actors, never the whole index here)."""
    import yaml

    path = Path(path)
    meta = read_checkpoint_meta(path)
    cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()), source=path / "config.yaml",
                    upgrade_renamed=True)
    index = (open_index or load_index)(
        index_dir or resolve_index_dir(path, meta),
        expected_encoder_fingerprint=meta.get("index_encoder_fingerprint") if index_dir is None else None)
    posterior = load_encoder(path / "posterior_encoder") if (path / "posterior_encoder").is_dir() else None
    passage = load_encoder(path / "passage_encoder") if (path / "passage_encoder").is_dir() else None
    model = RagModel(load_encoder(path / "query_encoder"), load_generator(path / "generator"), index, tau=meta["tau"],
                     posterior_encoder=posterior, passage_encoder=passage,
                     rerank_top_m=cfg.index.rerank_top_m if passage is not None else 0)
    if cfg.retriever.hybrid_k > 0:       # trained with hybrid candidates: evaluated and served with them
        model.attach_bm25(cfg.retriever.hybrid_k, cfg.retriever.bm25_weight)
    return model, cfg, meta


def load_trainer_state(path: str | Path) -> dict | None:
    """The trainer state, read with `weights_only=True`: tensors, numbers, strings and containers only, so a
    planted pickle cannot run code on `--resume` (torch refuses any other object with an UnpicklingError)."""
    f = Path(path) / "trainer_state.pt"
    if not f.exists():
        return None
    try:
        state = torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{f}: refused, it holds objects other than tensors and plain values "
                              f"(a trainer state never does; the file is damaged or not ours): "
                              f"{str(exc).splitlines()[0]}") from None
    return _anchor_from_reference(unpack_state(state), f)
