"""From "what to serve" (a checkpoint directory or an MLflow URI, optionally another index) to a `ModelRef`: plain
values naming one model version and one index version, which deployments load (and cache) by its `key`.

MLflow URIs (`runs:/<run_id>[/path]`, `models:/<name>/<version>` or `models:/<name>@<alias>`) are downloaded with
`mlflow.artifacts.download_artifacts` from the tracking URI the process has (MLFLOW_TRACKING_URI, or
`latentrag serve --tracking-uri`). The train job logs `model/`: a checkpoint without trainer state (rag.json,
config.yaml, the encoders, the generator) and `model/index/` (the whole index version when it is small, else its
manifest). Its index is found the way every checkpoint finds it (`pipeline.checkpoint.resolve_index_dir`: relative
to the run directory, bundled, absolute; fingerprint checked), unless an `index` is given. Runs logged before
model/ held rag.json are rebuilt into a checkpoint here (rag.json derived from config.yaml and the logged manifest;
the index looked up at `<config output_dir>/index/<version>`).

What was evaluated is what is served: the trained passage encoder and its re-rank depth (`index.rerank_top_m`)
when the checkpoint has one, hybrid candidates (`retriever.hybrid_k`: BM25 from the index version's bm25/), tau, and the checkpoint's eval settings (eval.k, eval.decode, eval.num_beams, the
estimator's decoder) as the defaults of requests and of the application args that were not given.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

MLFLOW_SCHEMES = ("runs:/", "models:/")


class ServingLoadError(ValueError):
    """The checkpoint or index cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelRef:
    key: str                    # cache key: checkpoint contents + index version directory
    checkpoint: str             # local checkpoint directory
    index_dir: str              # index version directory
    model_version: str
    index_version: str
    source: str                 # what the user asked for (directory or URI)
    index_source: str | None    # index root / version the user asked for, if any
    step: int | None = None
    estimator: str | None = None
    tau: float = 0.05
    index_count: int = 0
    # what the checkpoint was evaluated with (its config.yaml): the serving defaults
    rerank_top_m: int = 0       # > 0 with a trained passage encoder: re-rank the index's top-M with it
    hybrid_k: int = 0           # retriever.hybrid_k: BM25's top-H join the dense top-k (k + H passages)
    bm25_weight: float = 0.0    # retriever.bm25_weight: the fused prior's BM25 weight (0 = BM25 only proposes)
    eval_k: int | None = None
    decode: str | None = None
    num_beams: int | None = None
    decoder: str | None = None  # rag-sequence | rag-token: the estimator's decoder, the default request mode

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | "ModelRef") -> "ModelRef":
        return d if isinstance(d, ModelRef) else cls(**d)

    def public(self) -> dict:
        """What anyone may see (/v1/info, /healthz): versions, never the server's paths."""
        return {"model_version": self.model_version, "index_version": self.index_version, "step": self.step}

    def admin(self) -> dict:
        """What an admin sees after a reload: the versions and what they were loaded from."""
        return {**self.public(), "checkpoint": self.source, "index_dir": self.index_dir}


def is_mlflow_uri(source: str) -> bool:
    return str(source).startswith(MLFLOW_SCHEMES)


# ------------------------------------------------------------------------------------------------ MLflow
def tracking_hint() -> str:
    import mlflow

    return (f"tracking URI asked: {mlflow.get_tracking_uri()}; set MLFLOW_TRACKING_URI (or `latentrag serve "
            "--tracking-uri URI`) to the store that holds the run (`latentrag train` uses "
            "sqlite:///OUTPUT_DIR/mlflow.db)")


def _run_id_of_model_uri(uri: str) -> str | None:
    from mlflow.tracking import MlflowClient

    rest = uri[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        parts = rest.split("/")
        if len(parts) < 2:
            return None
        mv = client.get_model_version(parts[0], parts[1])
    return mv.run_id


def _check_tracking_store() -> None:
    """Refuse a local MLflow store that does not exist rather than let MLflow create an empty one (an
    `mlflow.db` in the server's working directory) that cannot hold the run anyway."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    local = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else \
        (uri[len("file://"):] if uri.startswith("file://") else (uri if "://" not in uri else None))
    if local and not Path(local).exists():
        raise ServingLoadError(f"the MLflow tracking store {uri} does not exist; set MLFLOW_TRACKING_URI (or "
                               "`latentrag serve --tracking-uri URI`) to the store that holds the run "
                               "(`latentrag train` uses sqlite:///OUTPUT_DIR/mlflow.db)")


def download_mlflow_checkpoint(uri: str, dst: str | Path) -> Path:
    """Download the artifacts behind `uri` into the directory `dst` and lay them out as a checkpoint directory
    (see the module doc)."""
    import mlflow.artifacts
    import yaml

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _check_tracking_store()
    rest = uri[len("runs:/"):].strip("/") if uri.startswith("runs:/") else None
    try:
        if rest is not None and "/" not in rest:          # a whole run: runs:/<run_id>
            local = Path(mlflow.artifacts.download_artifacts(run_id=rest, artifact_path="",
                                                             dst_path=str(dst / "artifacts")))
        else:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst / "artifacts")))
    except Exception as exc:  # MlflowException and friends: unknown run, model, alias, unreachable server
        raise ServingLoadError(f"cannot download {uri}: {str(exc).splitlines()[0] if str(exc) else exc!r} "
                               f"({tracking_hint()})") from exc
    if (local / "rag.json").is_file():                    # model/ (or a whole checkpoint directory) was logged
        return local
    model_dir = local / "model" if (local / "model").is_dir() else local
    if (model_dir / "rag.json").is_file():                # runs:/<run_id>: the run's model/
        return model_dir
    config_file = next((p for p in (local / "config.yaml", model_dir / "config.yaml") if p.is_file()), None)
    if config_file is None and uri.startswith("models:/"):
        run_id = _run_id_of_model_uri(uri)
        if run_id:
            config_file = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/config.yaml",
                                                                   dst_path=str(dst / "run")))
    missing = [name for name in ("generator", "query_encoder") if not (model_dir / name).is_dir()]
    if missing or config_file is None:
        raise ServingLoadError(f"{uri}: the artifacts do not make a checkpoint (missing "
                               f"{', '.join(missing + ([] if config_file else ['config.yaml']))}); expected what "
                               "`latentrag train` logs: config.yaml, model/generator, model/query_encoder, "
                               "model/index/manifest.json")
    cfg = yaml.safe_load(config_file.read_text())
    manifest_file = model_dir / "index" / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    index_dir = None
    out_dir = cfg.get("output_dir")
    if out_dir and manifest.get("version"):
        candidate = Path(out_dir) / "index" / manifest["version"]
        if (candidate / "manifest.json").is_file():
            index_dir = str(candidate)
    ckpt = dst / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    for name in ("generator", "query_encoder"):
        link = ckpt / name
        if not link.exists():
            link.symlink_to((model_dir / name).resolve(), target_is_directory=True)
    (ckpt / "config.yaml").write_text(config_file.read_text())
    meta = {"tau": float(cfg.get("retriever", {}).get("tau", 0.05)), "step": None,
            "estimator": cfg.get("train", {}).get("estimator"), "index_dir": index_dir,
            "index_version": manifest.get("version"),
            "index_encoder_fingerprint": manifest.get("encoder_fingerprint"),
            "index_manifest": manifest, "source": uri}
    (ckpt / "rag.json").write_text(json.dumps(meta, indent=2))
    return ckpt


# ------------------------------------------------------------------------------------------------ resolving
def _model_version(ckpt: Path, meta: dict) -> str:
    h = hashlib.sha256()
    rag = ckpt / "rag.json"
    h.update(str(ckpt.resolve()).encode())
    h.update(rag.read_bytes())
    h.update(str(rag.stat().st_mtime_ns).encode())
    step = meta.get("step")
    return (f"step{step}-" if step is not None else "") + h.hexdigest()[:10]


def resolve_model_ref(source: str, index: str | None = None, download_dir: str | None = None) -> ModelRef:
    """Check that `source` (+ `index`) can be served and name the exact versions. Raises ServingLoadError. An
    MLflow URI is downloaded into a new `latentrag-serve-*` directory under `download_dir` (default: the system's
    temporary directory); it is removed when resolving fails."""
    source = str(source)
    downloaded = None
    if is_mlflow_uri(source):               # a fresh directory per download, removed again if anything fails
        if download_dir:
            Path(download_dir).mkdir(parents=True, exist_ok=True)
        downloaded = Path(tempfile.mkdtemp(prefix="latentrag-serve-", dir=download_dir))
    try:
        return _resolve(source, index, downloaded)
    except BaseException:
        if downloaded is not None:
            shutil.rmtree(downloaded, ignore_errors=True)
        raise


def _checkpoint_settings(ckpt: Path, has_passage_encoder: bool) -> dict:
    """The ModelRef fields that come from the checkpoint's config.yaml: what it was evaluated with."""
    import yaml

    from pipeline.evaluation import decoder_for

    cfg_file = ckpt / "config.yaml"
    cfg = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    ev, train, idx = cfg.get("eval") or {}, cfg.get("train") or {}, cfg.get("index") or {}
    out = {"eval_k": ev.get("k"), "decode": ev.get("decode"), "num_beams": ev.get("num_beams"),
           "rerank_top_m": int(idx.get("rerank_top_m") or 0) if has_passage_encoder else 0,
           "hybrid_k": int((cfg.get("retriever") or {}).get("hybrid_k") or 0),
           "bm25_weight": float((cfg.get("retriever") or {}).get("bm25_weight") or 0.0)}
    try:
        out["decoder"] = decoder_for(train["estimator"]) if train.get("estimator") else None
    except ValueError:                     # an estimator this installation does not know: no default mode
        out["decoder"] = None
    return out


def _resolve(source: str, index: str | None, downloaded: Path | None) -> ModelRef:
    from pipeline.checkpoint import read_checkpoint_meta, resolve_index_dir
    from pipeline.index import read_manifest, resolve_version_dir

    try:
        ckpt = download_mlflow_checkpoint(source, downloaded) if downloaded is not None else Path(source)
        if not ckpt.is_dir():
            raise ServingLoadError(f"checkpoint {source!r} is not a directory")
        meta = read_checkpoint_meta(ckpt)
        if index:
            version_dir = resolve_version_dir(index)
        elif meta.get("index_ref") or meta.get("index_dir"):
            version_dir = resolve_index_dir(ckpt, meta)   # also after the run directory moved
        else:
            raise ServingLoadError(f"{source}: the checkpoint names no index that exists here; pass an index "
                                   "(latentrag serve --index DIR, or index=DIR)")
        manifest = read_manifest(version_dir)
    except ServingLoadError:
        raise
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ServingLoadError(str(exc)) from exc
    expected = meta.get("index_encoder_fingerprint")
    if expected and manifest.get("encoder_fingerprint") != expected:
        raise ServingLoadError(f"index {version_dir} was built with encoder fingerprint "
                               f"{manifest.get('encoder_fingerprint')}, but checkpoint {source} expects {expected}")
    logged = meta.get("index_manifest")
    if logged and logged.get("embeddings_sha256") and \
            logged.get("embeddings_sha256") != manifest.get("embeddings_sha256"):
        raise ServingLoadError(f"index {version_dir} is not the index logged with {source} (embeddings differ); "
                               "pass the right index")
    model_version = _model_version(ckpt, meta)
    version_dir = Path(version_dir).resolve()
    return ModelRef(key=f"{model_version}|{version_dir}", checkpoint=str(ckpt.resolve()), index_dir=str(version_dir),
                    model_version=model_version, index_version=str(manifest.get("version")), source=source,
                    index_source=index, step=meta.get("step"), estimator=meta.get("estimator"),
                    tau=float(meta.get("tau", 0.05)), index_count=int(manifest.get("count", 0)),
                    **_checkpoint_settings(ckpt, (ckpt / "passage_encoder").is_dir()))


# ------------------------------------------------------------------------------------------------ defaults
def app_defaults(args, ref: ModelRef) -> dict:
    """Application args the user did not give (`args.model_fields_set`), taken from what the checkpoint was
    evaluated with: default_k (eval.k, within max_k) and decode (eval.decode)."""
    given = args.model_fields_set
    out = {}
    if "default_k" not in given and ref.eval_k:
        out["default_k"] = max(1, min(int(ref.eval_k), args.max_k))
    if "decode" not in given and ref.decode in ("fast", "thorough"):
        out["decode"] = ref.decode
    return out


def request_defaults(req, ref: ModelRef):
    """An answer request with the fields it did not give (mode, num_beams) from the checkpoint: the estimator's
    decoder and eval.num_beams, as `latentrag eval` decodes."""
    given = req.model_fields_set
    update = {}
    if "mode" not in given and ref.decoder in ("rag-sequence", "rag-token"):
        update["mode"] = ref.decoder
    if "num_beams" not in given and ref.num_beams:
        update["num_beams"] = int(ref.num_beams)
    return req.model_copy(update=update) if update else req


# ------------------------------------------------------------------------------------------------ loading parts
def load_retriever_part(ref: ModelRef):
    """RagModel with the query encoder, the trained passage encoder and its re-rank depth when the checkpoint has
    one (scores and order as in evaluation), the index, and its BM25 index when the checkpoint was trained with
    hybrid candidates (the Retriever deployment's share)."""
    from pipeline.index import load_index
    from pipeline.models.retriever import load_encoder
    from pipeline.rag import RagModel

    index = load_index(ref.index_dir)
    encoder = load_encoder(Path(ref.checkpoint) / "query_encoder")
    passage_dir = Path(ref.checkpoint) / "passage_encoder"
    passage = load_encoder(passage_dir) if passage_dir.is_dir() else None
    model = RagModel(encoder, None, index, tau=ref.tau, passage_encoder=passage,
                     rerank_top_m=ref.rerank_top_m if passage is not None else 0).eval()
    if ref.hybrid_k > 0:        # the version's BM25 index (bm25/, built there if missing): the candidates of eval
        model.attach_bm25(ref.hybrid_k, ref.bm25_weight)
    return model


def load_generator_part(ref: ModelRef):
    from pipeline.models.generator import load_generator

    return load_generator(Path(ref.checkpoint) / "generator").eval()
