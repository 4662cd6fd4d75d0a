"""Train a retriever and a generator together on Ray Train.

Recipe: read config -> passages (ingest) -> embeddings + FAISS index version (Ray Data) -> evaluate the untrained
start -> TorchTrainer (one `train_loop_per_worker` per worker: retrieve top-K, estimator loss, backward, separate
retriever/generator optimiser groups, checkpoints through ray.train.report) -> evaluate the final model ->
metrics.json + MLflow.

    latentrag train --corpus corpus.jsonl --train-qa train.jsonl --eval-qa test.jsonl \\
        --estimator rag-sequence --max-steps 300 --output-dir runs/x
    ray job submit --working-dir . -- python -m jobs.train --config configs/demo.yaml ...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from jobs.guard import DriverGuard
from jobs.index import build_index
from jobs.ray_env import check_paths_on_nodes, ensure_ray, error_message, inside_job_package
from jobs.ray_env import worker_log as _log
from jobs.refresh import make_refresh_hook
from jobs.sharded_index import check_shard_room, open_search_index, release_shards
from pipeline.checkpoint import load_checkpoint, read_checkpoint_meta
from pipeline.config import Config, ConfigError, describe_defaults, from_dict, load_config, save_config
from pipeline.data import (DataError, GoldPassages, chunk_passages, iter_passage_batches, read_corpus,
                           read_manifest, read_qa, write_json, write_jsonl, write_passages)
from pipeline.estimators.registry import STRATEGIES, estimator_help, objective_for, strategy_names
from pipeline.index import load_index, read_manifest as read_index_manifest
from pipeline.models import hf_causal
from pipeline.models.retriever import encoder_fingerprint, resolve_encoder_path
from pipeline.progress import Progress, format_seconds
from pipeline.recipe import Events, TrainRecipe, evaluate_run
from pipeline.storage import fetch_input, is_uri, shared_path
from pipeline.tracking import Tracker, code_lineage, default_tracking_uri

# Imported where used, because they are heavy (1-3 s each, and `latentrag train --help` should not wait):
# ray.train, ray.train.torch, and MLflow's Ray integration.

RESULT_KEYS = ("em", "f1", "recall@1", "recall@5", "recall@20", "num_questions")


# --------------------------------------------------------------------------------------------- worker side
def _mlflow_key(k: str) -> str:
    return k.replace("@", "_at_")


def _attach_mlflow(tracking_uri: str, run_id: str):
    """Rank 0's MLflow session, through Ray's `setup_mlflow`, continuing the run the driver created.

    MLFLOW_RUN_ID (set here, in this worker process only) makes `mlflow.start_run` inside setup_mlflow resume that
    run instead of opening a new one. setup_mlflow sets process-global MLflow state (tracking URI, active run); that
    is harmless in a Train worker (its own process, gone after the run) but would leak from the driver into every
    worker it starts, which is why the driver keeps to an explicit MlflowClient (pipeline.tracking.Tracker)."""
    from ray.air.integrations.mlflow import setup_mlflow

    os.environ["MLFLOW_RUN_ID"] = run_id
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return setup_mlflow(tracking_uri=tracking_uri, experiment_id=experiment_id, rank_zero_only=True)


class _Trace:
    """OUTPUT_DIR/trace/rank<r>.jsonl (train.trace): this worker's pid and Ray node at start and the example
    indices of every step, so a test can kill a worker for real and check that no example was lost."""

    def __init__(self, out_dir: str | None, rank: int, enabled: bool):
        self.path = Path(out_dir) / "trace" / f"rank{rank}.jsonl" if enabled and out_dir else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())


class RayTrainEvents(Events):
    """The Ray Train worker's side of the recipe: the trace, the index refresh, the log line and MLflow (rank 0),
    and `ray.train.report` with the checkpoint."""

    wants_checkpoints = True

    def __init__(self, cfg: Config, rank: int, trace: _Trace, mlflow, refresh):
        self.cfg, self.rank, self.trace, self.mlflow, self.refresh = cfg, rank, trace, mlflow, refresh

    def after_step(self, recipe, metrics):
        self.trace.write(step=recipe.step - 1, indices=recipe.trainer.last_indices)
        if self.refresh is not None:
            self.refresh(recipe.model, recipe.step)   # a finished refresh build is switched to here, between steps

    def log(self, recipe, step, m):
        if self.rank != 0:
            return
        left = (self.cfg.train.max_steps - step) / max(m["steps_per_s"], 1e-9)
        _log(f"[train] step {step}/{self.cfg.train.max_steps}  loss {m['loss_mean']:.3f}  "
             f"{m['steps_per_s']:.2f} steps/s  {m['examples_per_s']:.1f} ex/s  {format_seconds(left)} left  "
             f"{recipe.trainer.phase()}")
        if self.mlflow:
            self.mlflow.log_metrics({_mlflow_key(k): float(v) for k, v in m.items()
                                     if isinstance(v, (int, float)) and v == v and k != "loss_mean"}, step=step)

    def report(self, recipe, report, write_checkpoint):
        import ray.train
        from ray.train import Checkpoint

        step = report["step"]
        if self.rank == 0 and "dev_em" in report:
            _log(f"[train] step {step} dev em {report['dev_em']:.3f} f1 {report['dev_f1']:.3f} "
                 f"recall@1 {report.get('dev_recall@1')} recall@5 {report.get('dev_recall@5')}  "
                 f"({self.cfg.train.best_metric} {report['dev_score']:.3f})")
            if self.mlflow:
                self.mlflow.log_metrics({_mlflow_key(k): float(v) for k, v in report.items()
                                         if k.startswith("dev_") and isinstance(v, (int, float))}, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_checkpoint(Path(tmp) / "ckpt") if write_checkpoint is not None else None
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(path)) if path else None)

    def close(self):
        if self.refresh is not None:
            self.refresh.close()


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker. `config` holds the resolved run config and paths, all plain values."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")

    def wrap(module):
        # DDP when world > 1 (identity otherwise); find_unused_parameters: MiniLM's pooler and any head the
        # estimator does not touch in a step get no gradient
        return ray.train.torch.prepare_model(module, move_to_device=False,
                                             parallel_strategy_kwargs={"find_unused_parameters": True})

    def open_index(version_dir, expected_encoder_fingerprint=None):
        # index.search_shards > 1: the run's shard actors, shared by every worker (named after the run); this
        # process then never loads the FAISS index, only ids, texts and the memory-mapped embeddings
        return open_search_index(version_dir, cfg.index.search_shards, expected_encoder_fingerprint,
                                 group=config.get("index_group"), scope=cfg.index.shard_scope,
                                 cpus_per_shard=cfg.index.cpus_per_shard, resource=cfg.index.shard_resource)

    recipe = TrainRecipe(cfg, config["train_rows"], config.get("dev_rows"), rank=rank, world_size=world,
                         device=device, wrap=wrap,
                         autocast="cuda" if device.type == "cuda" and cfg.train.precision == "bf16" else None,
                         open_index=open_index)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:               # restarted after a failure, or --resume of this run
        with checkpoint.as_directory() as d:
            recipe.setup(checkpoint_dir=d)
        origin = "ray checkpoint"
    elif config.get("resume_from"):          # --resume from OUTPUT_DIR/checkpoint
        recipe.setup(checkpoint_dir=config["resume_from"])
        origin = config["resume_from"]
    else:
        recipe.setup(open_index(config["index_dir"]))
    if recipe.resumed_from is not None and rank == 0:
        _log(f"[train] resumed from {origin} at step {recipe.step}")
    trace = _Trace(cfg.output_dir, rank, cfg.train.trace)
    shards = recipe.model.index.shard_memory() if trace.path and hasattr(recipe.model.index, "shard_memory") else []
    trace.write(event="start", pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(),
                step=recipe.step, world_size=world,
                estimator_state_size=sum(len(v) if isinstance(v, dict) else 1
                                         for v in recipe.trainer.estimator.state_dict().values()),
                index_shard_pids=[m["pid"] for m in shards])
    mlflow = _attach_mlflow(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") \
        else None
    refresh = make_refresh_hook(cfg, config["index_dir"], cfg.output_dir, rank, world, log=_log,
                                log_metrics=(lambda m, s: mlflow.log_metrics(m, step=s)) if mlflow else None,
                                open_index=open_index)
    recipe.events = RayTrainEvents(cfg, rank, trace, mlflow, refresh)
    recipe.train()
    recipe.cleanup()


# --------------------------------------------------------------------------------------------- driver side
RUN_STATE = "run.json"      # OUTPUT_DIR/run.json: the Ray Train run name and MLflow run that --resume continues


def read_passage_source(corpus: str, cfg: Config) -> tuple[Path | None, list[dict] | None, int]:
    """(ingested directory, None, count) when `corpus` already is one, else (None, chunked rows, count):
    read into memory, nothing written yet, so settings can be checked against the count first."""
    corpus_path = Path(corpus)
    if not corpus_path.exists():
        raise DataError(f"corpus not found: {corpus}")
    if corpus_path.is_dir() and (corpus_path / "passages.json").exists():
        return corpus_path, None, int(read_manifest(corpus_path)["count"])
    rows = chunk_passages(read_corpus(corpus_path), max_words=cfg.data.chunk_words, overlap=cfg.data.chunk_overlap)
    return None, rows, len(rows)


def write_passage_rows(rows: list[dict], output_dir: Path) -> Path:
    out = output_dir / "passages"
    write_passages(rows, out)
    _log(f"[ingest] {len(rows)} passages -> {out}")
    return out


def prepare_passages(corpus: str, output_dir: Path, cfg: Config) -> Path:
    """An ingested passages directory: `corpus` itself when it already is one, else ingest it."""
    existing, rows, _ = read_passage_source(corpus, cfg)
    return existing if existing is not None else write_passage_rows(rows, output_dir)


def check_gold_ids(cfg: Config, passage_ids, train_rows, dev_rows, eval_rows) -> None:
    """Every gold id of the QA files must name a corpus row (`GoldPassages.check`): refused before encoding."""
    gold = GoldPassages(passage_ids)
    for rows, key in ((train_rows, "train_qa"), (dev_rows, "dev_qa"), (eval_rows, "eval_qa")):
        path = getattr(cfg.data, key)
        if rows:
            gold.check(rows, f"data.{key} ({path})" if path else f"the synthetic questions (data.{key})")


def passage_ids_of(passages: Path | None, rows: list[dict] | None) -> list[str]:
    """The passage ids of an ingested directory (its id column only) or of chunked rows."""
    if rows is not None:
        return [str(r["id"]) for r in rows]
    return [str(i) for b in iter_passage_batches(passages, 8192, columns=["id"]) for i in b.column("id").to_pylist()]


def check_k_fits(cfg: Config, num_passages: int, where: str) -> None:
    """train.k / eval.k / rerank_top_m above the number of passages fail inside a Ray worker after ingest, encode
    and index; refuse them while nothing is written."""
    h = cfg.retriever.hybrid_k
    for key, k in (("train.k", cfg.train.k), ("eval.k", cfg.eval.k), ("index.rerank_top_m", cfg.index.rerank_top_m)):
        if k > num_passages:
            raise ConfigError(f"{key}={k}: more passages per question than {where} holds ({num_passages})")
        if h and key != "index.rerank_top_m" and k + h > num_passages:
            raise ConfigError(f"{key}={k} + retriever.hybrid_k={h}: more passages per question than {where} "
                              f"holds ({num_passages})")


def plan_resume(output_dir: Path) -> dict:
    """What `--resume` continues from, decided before anything runs.

    - The interrupted (or finished) Ray Train run named in OUTPUT_DIR/run.json: rerunning it under the same name
      and storage path makes Ray Train restore its newest reported checkpoint (`ray.train.get_checkpoint()` in
      the workers), which a killed or interrupted driver leaves under ray_results/.
    - Else OUTPUT_DIR/checkpoint (a run copied from elsewhere: the model, trainer state and step it holds).
    Returns {"ray_run_name" | "checkpoint", "step", "mlflow_run_id", "tracking_uri"}; raises ConfigError when
    there is nothing to resume."""
    from ray.train import Result

    state_file = output_dir / RUN_STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    plan = {"mlflow_run_id": state.get("mlflow_run_id"), "tracking_uri": state.get("tracking_uri")}
    run_dir = output_dir / "ray_results" / str(state.get("ray_run_name"))
    if state.get("ray_run_name") and run_dir.is_dir():
        step = 0
        try:
            latest = Result.from_path(str(run_dir)).checkpoint
        except RuntimeError:                      # interrupted before its first report: no snapshot yet
            latest = None
        if latest is not None:
            step = int(read_checkpoint_meta(latest.path)["step"])
        return {**plan, "ray_run_name": state["ray_run_name"], "step": step}
    if (output_dir / "checkpoint" / "rag.json").exists():
        meta = read_checkpoint_meta(output_dir / "checkpoint")
        return {**plan, "checkpoint": str(output_dir / "checkpoint"), "step": int(meta["step"])}
    raise ConfigError(f"--resume: nothing to resume in {output_dir} (no {RUN_STATE} of an earlier run and no "
                      "checkpoint/); run without --resume to start")


def finished_run(output_dir: Path) -> str | None:
    """Why `output_dir` holds a finished run (run.json says so, or there is a metrics.json), else None."""
    state_file = output_dir / RUN_STATE
    try:
        status = json.loads(state_file.read_text()).get("status") if state_file.is_file() else None
    except (OSError, ValueError):
        status = None
    if status == "finished":
        return f"{state_file} says status finished"
    if (output_dir / "metrics.json").is_file():
        return f"{output_dir / 'metrics.json'} exists"
    return None


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """A new run into a finished run's directory would silently replace its checkpoint and metrics: refused
    (before anything is written) unless --resume (continue it) or --overwrite (replace it) says what is meant."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run in OUTPUT_DIR, or replace it)")
    why = None if resume or overwrite else finished_run(output_dir)
    if why:
        raise ConfigError(f"{output_dir} holds a finished run ({why}); pass --resume to continue it (with a larger "
                          "--max-steps), --overwrite to replace it, or choose another --output-dir")


# what --overwrite removes: the previous run's results and Ray Train's copies of its checkpoints (the index,
# passages and the MLflow store stay: an index is reused by fingerprint, the MLflow history is kept)
PREVIOUS_RUN = ("checkpoint", "checkpoint.tmp", "metrics.json", "predictions.jsonl", RUN_STATE, "ray_results", "trace")


def clear_previous_run(output_dir: Path) -> None:
    for name in PREVIOUS_RUN:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_run_state(output_dir: Path, **state) -> None:
    write_json({"status": "running", **state}, output_dir / RUN_STATE)


def _start_or_reattach_tracker(cfg: Config, output_dir: Path, plan: dict | None):
    """The MLflow run: on --resume the interrupted run itself (back to RUNNING), else a new one."""
    uri = default_tracking_uri(output_dir, cfg.mlflow.tracking_uri)
    if plan and plan.get("mlflow_run_id") and plan.get("tracking_uri") == uri:
        tracker = Tracker.attach(uri, plan["mlflow_run_id"])
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        tracker.client.set_tag(tracker.run_id, f"resumed_at_step_{plan['step']}", time.strftime("%Y-%m-%dT%H:%M:%S"))
        return tracker, False
    tracker = Tracker.start(uri, cfg.mlflow.experiment, cfg.mlflow.run_name, tags=objective_for(cfg).record(),
                            artifact_location=output_dir / "mlartifacts")
    return tracker, True


def make_torch_trainer(cfg: Config, loop_config: dict, name: str, storage_path: str | Path, use_dev: bool,
                       callbacks: list | None = None):
    """The TorchTrainer of a run (also of a multi-worker Tune trial): `train_loop_per_worker` on
    train.num_workers workers; checkpoints ranked by dev_score when there is a dev set. Index-shard actors
    (index.search_shards) are named after the run (`name`): the caller of fit() releases them afterwards with
    `jobs.sharded_index.release_shards(name)`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop_config = {**loop_config, "index_group": name}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=str(storage_path), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2,
                                               checkpoint_score_attribute="dev_score" if use_dev else None,
                                               checkpoint_score_order="max")))


def _build_index(cfg: Config, passages_dir, output_dir: Path, tracker) -> Path:
    """Encode the passages with Ray Data and build a FAISS index version under OUTPUT_DIR/index."""
    t = time.time()
    index_dir = build_index(passages_dir, output_dir / "index", encoder=cfg.retriever.encoder,
                            index_type=cfg.index.type, num_actors=cfg.index.encode_actors,
                            batch_size=cfg.index.encode_map_batch_size, threads_per_actor=cfg.index.threads_per_actor,
                            bm25=cfg.retriever.hybrid_k > 0)
    tracker.log_metrics({"index_build_seconds": time.time() - t})
    return index_dir


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:                 # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def _keep_checkpoint(result, use_dev: bool, output_dir: Path) -> Path:
    """The best checkpoint by dev_score (else the last) as OUTPUT_DIR/checkpoint, atomically. Its files are hard
    links to Ray Train's copy under ray_results/ (kept there for --resume), so the bytes are stored once: a plain
    directory still, which eval, serve, MLflow and a copy to elsewhere read like any other. Checkpoint files are
    never rewritten in place (save_checkpoint writes aside and renames), so the two names cannot diverge."""
    best = result.get_best_checkpoint("dev_score", "max") if use_dev else None
    chosen = best or result.checkpoint
    final_dir, tmp_dir = output_dir / "checkpoint", output_dir / "checkpoint.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    with chosen.as_directory() as d:
        shutil.copytree(d, tmp_dir, copy_function=_link_or_copy)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    return final_dir


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def tree_fingerprint(path: Path) -> str:
    """A short hash of a saved module directory (every file below it: name, size, first MiB), like
    encoder_fingerprint but recursive, so LoRA adapters and nested generator weights count."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def run_lineage(cfg: Config, index, final_dir: Path | None = None) -> dict:
    """What a run was made from: corpus and index (fingerprints, passage count, version), encoders (the one the
    run started from, and each trained module's weights), the code (package version, git commit when in a
    repository). Logged as MLflow tags `lineage.*` and under "lineage" in metrics.json."""
    m = index.manifest
    out = {"corpus_fingerprint": m.get("corpus_fingerprint"), "passage_count": m.get("count"),
           "index_version": m.get("version"), "index_type": m.get("type"),
           "index_embeddings_sha256": m.get("embeddings_sha256"),
           "index_encoder_fingerprint": m.get("encoder_fingerprint"),
           "retriever_start_fingerprint": encoder_fingerprint(cfg.retriever.encoder), **code_lineage()}
    for name in ("query_encoder", "passage_encoder", "posterior_encoder", "generator"):
        if final_dir is not None and (final_dir / name).is_dir():
            out[f"{name}_fingerprint"] = tree_fingerprint(final_dir / name)
    return {k: v for k, v in out.items() if v is not None}


def _log_model(tracker, output_dir: Path, final_dir: Path, index, cfg: Config | None = None) -> str | None:
    """Run files, and `model/`: a checkpoint without trainer state that `runs:/<run_id>/model` serves and
    evaluates. rag.json finds the index after a move (pipeline.checkpoint.resolve_index_dir); an index of at
    most mlflow.bundle_index_mb travels inside model/index, so a download on another machine finds it too
    (else model/index holds its manifest only). With mlflow.register_as, model/ becomes a new version of that
    registered model (and mlflow.register_alias points at it); returns the version."""
    for name in ("config.yaml", "metrics.json", "predictions.jsonl"):
        tracker.log_artifact(output_dir / name)
    for name in ("generator", "query_encoder", "posterior_encoder", "passage_encoder", "rag.json", "config.yaml"):
        if (final_dir / name).exists():
            tracker.log_artifact(final_dir / name, f"model/{name}" if (final_dir / name).is_dir() else "model")
    limit = (cfg.mlflow.bundle_index_mb if cfg is not None else 0) * 2 ** 20
    if limit and _dir_bytes(Path(index.path)) <= limit:
        tracker.log_artifact(Path(index.path), "model/index")
    else:
        tracker.log_artifact(Path(index.path) / "manifest.json", "model/index")
    if cfg is not None and cfg.mlflow.register_as:
        version = tracker.register_model(cfg.mlflow.register_as, "model", alias=cfg.mlflow.register_alias)
        _log(f"[mlflow] registered model {cfg.mlflow.register_as} version {version}"
             + (f" (alias {cfg.mlflow.register_alias}: models:/{cfg.mlflow.register_as}@{cfg.mlflow.register_alias})"
                if cfg.mlflow.register_alias else f" (models:/{cfg.mlflow.register_as}/{version})"))
        return version
    return None


def run_training(cfg: Config, output_dir: str | Path, passages_dir: str | Path | None = None,
                 train_rows: list | None = None, dev_rows: list | None = None, eval_rows: list | None = None,
                 resume: bool = False, tracker=None, index_dir: str | Path | None = None,
                 overwrite: bool = False) -> dict:
    """The whole run on a running (or freshly started) Ray. Returns the metrics written to metrics.json.
    `resume`: continue the run in `output_dir` (see `plan_resume`) and end at train.max_steps. `overwrite`: remove
    the previous run's results and Ray Train copies first (`clear_previous_run`)."""
    output_dir = Path(output_dir).resolve()
    passages_dir = Path(passages_dir).resolve() if passages_dir is not None else None   # read on every node
    index_dir = Path(index_dir).resolve() if index_dir is not None else None
    plan = plan_resume(output_dir) if resume else None       # nothing to resume: refused before any write
    if overwrite and not resume:
        clear_previous_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(output_dir)
    save_config(cfg, output_dir / "config.yaml")

    own_tracker = tracker is None
    new_run = True
    if own_tracker:
        tracker, new_run = _start_or_reattach_tracker(cfg, output_dir, plan)
    if new_run:
        tracker.log_params(cfg.flat())
    _log(f"[mlflow] run {tracker.run_id} at {tracker.tracking_uri}")
    # a fresh name per run: Ray Train restores a same-named run from its last checkpoint, which must only happen
    # after a worker failure inside this run or on --resume of this run
    ray_run_name = plan.get("ray_run_name") if plan else None
    ray_run_name = ray_run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}-{tracker.run_id[:8]}"

    def run_state(status: str) -> None:
        _write_run_state(output_dir, ray_run_name=ray_run_name, mlflow_run_id=tracker.run_id,
                         tracking_uri=tracker.tracking_uri, max_steps=cfg.train.max_steps, status=status)

    run_state("running")
    guard = DriverGuard(tracker.tracking_uri, tracker.run_id, output_dir / RUN_STATE) if own_tracker else None
    own_ray = ensure_ray()
    watch_ray = guard.watch_local_ray if guard is not None and own_ray else (lambda: 0)
    watch_ray()                            # the local Ray this driver started goes when the driver is killed
    check_train_resources(cfg)
    checked = check_paths_on_nodes(paths_every_node_needs(cfg, output_dir, passages_dir, index_dir))
    if checked:
        _log(f"[cluster] {checked} other node(s) see the output dir, passages, index and model paths")
    if plan:
        _log(f"[train] resuming {output_dir} at step {plan['step']} of {cfg.train.max_steps} "
             f"({'Ray Train run ' + plan['ray_run_name'] if 'ray_run_name' in plan else plan['checkpoint']})")
    try:
        # 1. the index: encoded with Ray Data into a FAISS index version
        index = load_index(index_dir or _build_index(cfg, passages_dir, output_dir, tracker))
        _log(f"[index] version {index.version}: {len(index.ids)} passages, type {index.manifest['type']}")
        check_gold_ids(cfg, index.ids, train_rows, dev_rows, eval_rows)     # an --index the QA files do not fit
        if cfg.index.search_shards > len(index):
            raise ConfigError(f"index.search_shards={cfg.index.search_shards}: more shards than the index "
                              f"{index.path} has passages ({len(index)})")
        tracker.set_tags({f"lineage.{k}": v for k, v in run_lineage(cfg, index).items()})

        # 2. the untrained start, built as every worker builds it
        start = TrainRecipe(cfg, train_rows).setup(index)
        _log(f"[eval] untrained start on {len(eval_rows)} questions ...")
        initial, _ = start.evaluate(eval_rows, progress=Progress("[eval] untrained", "questions"))
        start.cleanup()
        tracker.log_metrics({f"initial_{k}": v for k, v in initial.items() if v is not None})
        _log("[eval] untrained: " + format_metrics(initial))

        # 3. Ray Train
        use_dev = bool(cfg.train.eval_every and dev_rows)
        trainer = make_torch_trainer(
            cfg, {"cfg": cfg.to_dict(), "index_dir": str(index.path), "train_rows": train_rows,
                  "dev_rows": dev_rows or [], "tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id,
                  "resume_from": plan.get("checkpoint") if plan else None},
            ray_run_name, output_dir / "ray_results", use_dev)
        watch_ray()                        # and whatever Ray has started since (agents, Ray Data actors)
        t = time.time()
        try:
            result = trainer.fit()
        except SystemExit as exc:
            # Ray Train's SIGINT handler aborts the run, then leaves through sys.exit(0)
            raise KeyboardInterrupt("training aborted by SIGINT") from exc
        train_seconds = time.time() - t
        if cfg.index.search_shards > 1:
            release_shards(ray_run_name)     # the workers are gone; free the shards' memory before evaluating
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
        final_dir = _keep_checkpoint(result, use_dev, output_dir)
        _log(f"[train] done in {train_seconds:.0f}s; checkpoint -> {final_dir}")

        # 4. the trained model
        model, _, meta = load_checkpoint(final_dir)
        final, predictions = evaluate_run(model, eval_rows, cfg, progress=Progress("[eval] trained", "questions"))
        lineage = run_lineage(cfg, index, final_dir)
        tracker.set_tags({f"lineage.{k}": v for k, v in lineage.items()})
        metrics = {**final, "k": cfg.eval.k, "hybrid_k": cfg.retriever.hybrid_k, **objective_for(cfg).record(),
                   "index_version": model.index.version, "index_dir": str(model.index.path), "steps": meta["step"],
                   "train_seconds": round(train_seconds, 1), "initial": initial,
                   "mlflow_run_id": tracker.run_id, "lineage": lineage}
        if cfg.mlflow.register_as:
            metrics["registered_model"] = cfg.mlflow.register_as
        write_json(metrics, output_dir / "metrics.json")
        write_jsonl(predictions, output_dir / "predictions.jsonl")
        tracker.log_metrics({k: v for k, v in final.items() if v is not None})
        version = _log_model(tracker, output_dir, final_dir, index, cfg)
        if version is not None:
            metrics["registered_version"] = version
            write_json(metrics, output_dir / "metrics.json")
        _log("[eval] trained:   " + format_metrics(final))
        run_state("finished")
        if own_tracker:
            tracker.end()
        return metrics
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        run_state("interrupted" if interrupted else "failed")
        if own_tracker:
            tracker.end("KILLED" if interrupted else "FAILED")
        raise
    finally:
        if cfg.index.search_shards > 1:
            release_shards(ray_run_name)     # the run's index-shard actors are detached: nobody else ends them
        if guard is not None:
            guard.close()


def check_train_resources(cfg: Config) -> None:
    """The train workers (and index-shard actors, `check_shard_room`) must fit on the cluster's nodes as they are,
    or Ray Train waits for them forever (after ingest and encoding): refused here with the numbers, unless
    train.wait_for_resources (an autoscaling cluster starts the nodes on demand). A worker's CPUs (and GPU) must all
    be on one node."""
    import ray

    if cfg.train.wait_for_resources:
        return
    check_shard_room(cfg.index, cfg.train.num_workers * cfg.train.cpus_per_worker)
    need = {"CPU": float(cfg.train.cpus_per_worker), **({"GPU": 1.0} if cfg.train.use_gpu else {})}
    need = {k: v for k, v in need.items() if v > 0}
    if not need:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = sum(min(int(r.get(k, 0.0) // v) for k, v in need.items()) for r in nodes)
    if fits < cfg.train.num_workers:
        each = ", ".join(f"{k} {v:g}" for k, v in need.items())
        have = "; ".join(", ".join(f"{k} {r.get(k, 0.0):g}" for k in need) for r in nodes)
        raise ConfigError(
            f"train.num_workers={cfg.train.num_workers} workers of {each} each (train.cpus_per_worker"
            f"{', train.use_gpu' if cfg.train.use_gpu else ''}) do not fit on this cluster: its {len(nodes)} node(s) "
            f"have [{have}] and hold {fits}; lower train.num_workers or train.cpus_per_worker, add nodes, or set "
            "train.wait_for_resources=true on an autoscaling cluster")


def paths_every_node_needs(cfg: Config, output_dir: Path, passages_dir: Path | None,
                           index_dir: Path | None) -> dict[str, str | None]:
    """What Ray tasks and Train workers on any node open: the output dir (checkpoints, traces, the index), the
    passages (encode read tasks, refreshes), an --index, and model directories given as absolute paths (a relative
    one travels in --working-dir; a hub name or the embedded MiniLM is each node's own install)."""
    paths = {"the output dir": str(output_dir), "the passages": passages_dir and str(passages_dir),
             "the index": index_dir and str(index_dir)}
    for key, value in (("retriever.encoder", cfg.retriever.encoder),
                       ("generator.name_or_path", getattr(cfg.generator, "name_or_path", None))):
        if value and os.path.isabs(os.path.expanduser(str(value))):
            paths[key] = os.path.expanduser(str(value))
    return paths


def check_model_paths(cfg: Config) -> None:
    """Fail fast, before any output exists, on a model path that is not there."""
    resolve_encoder_path(cfg.retriever.encoder)
    if cfg.generator.kind == "copy-bart":
        resolve_encoder_path(cfg.generator.tokenizer)
    else:
        resolve_encoder_path(cfg.generator.name_or_path)
    if cfg.generator.kind == "hf-causal":
        hf_causal.preflight(cfg.generator)     # template, tokenizer and LoRA targets, on a weightless model


def where_things_go(out: Path, tracking_uri: str) -> str:
    """The first lines of a run: where its outputs and its MLflow store are, and how to browse them."""
    ui = f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port 5000"
    return (f"[run] outputs -> {out}\n[run] MLflow  -> {tracking_uri}\n"
            f"[run] browse the runs: {ui}   (then http://127.0.0.1:5000)")


def next_steps(checkpoint: Path, question: str = "Where was Varnel Ostrik born?", port: int = 8000) -> str:
    """The last lines of a run that wrote a checkpoint: serve it, ask it, open the page."""
    body = json.dumps({"question": question})
    return "\n".join([
        "next:",
        f"  serve it    latentrag serve --checkpoint {shlex.quote(str(checkpoint))} --port {port}",
        f"  ask it      curl -s http://127.0.0.1:{port}/v1/answer -H 'Content-Type: application/json' "
        f"-d {shlex.quote(body)}",
        f"  the page    http://127.0.0.1:{port}/   (the answer as it streams, the passages and their probabilities)",
        f"  OpenAI SDK  base_url http://127.0.0.1:{port}/v1, model \"latentrag\"",
    ])


def format_metrics(m: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    return "  ".join(f"{k} {f(m.get(k))}" for k in ("em", "f1", "recall@1", "recall@5", "recall@20"))


def results_table(metrics: dict) -> str:
    rows = [("metric", "untrained", "trained")]
    for key in ("em", "f1", "recall@1", "recall@5", "recall@20"):
        a, b = metrics["initial"].get(key), metrics.get(key)
        rows.append((key, "n/a" if a is None else f"{a:.3f}", "n/a" if b is None else f"{b:.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in width))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentrag train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill(
            "defaults: without --config every setting is its built-in default, the dataclasses of "
            "pipeline/config.py; they are the settings the demo measured (configs/demo.yaml adds only its data and "
            f"MLflow experiment): {describe_defaults()}. --config and --set override them.", 100))
    p.add_argument("--corpus", help="corpus file (jsonl/parquet/csv/tsv) or directory, or an ingested passages "
                                    "directory (from `latentrag ingest`)")
    p.add_argument("--train-qa", help="training questions (jsonl/json/parquet/csv): question, answers[] or answer")
    p.add_argument("--eval-qa", help="held-out questions for the final (and untrained) evaluation")
    p.add_argument("--dev-qa", help="questions for periodic evaluation during training (train.eval_every)")
    p.add_argument("--estimator", help=estimator_help())
    p.add_argument("--strategy", choices=strategy_names(), metavar="{" + ",".join(strategy_names()) + "}",
                   help="how the estimator is trained (overrides train.strategy): "
                        + "; ".join(f"{s.name}: {s.summary}" for s in STRATEGIES.values()))
    p.add_argument("--max-steps", type=int, help="optimiser steps (overrides train.max_steps)")
    p.add_argument("--output-dir", help="where checkpoints, metrics.json and the MLflow database go")
    p.add_argument("--config", help="YAML config (e.g. configs/cmu_qa_wiki.yaml); keys it leaves out keep their "
                                    "built-in defaults (see below); flags and --set override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set retriever.lr=1e-5 (repeatable)")
    p.add_argument("--index", help="an existing index root or version directory (skip encoding)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT_DIR from its newest checkpoint (after Ctrl-C, a killed driver or "
                        "a finished run with a larger --max-steps) up to train.max_steps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in OUTPUT_DIR (its checkpoint, metrics and ray_results/; the index "
                        "and the MLflow store stay); without it, or --resume, such a directory is refused")
    p.add_argument("--register", metavar="NAME",
                   help="register the run's MLflow model/ as a new version of NAME (overrides mlflow.register_as)")
    p.add_argument("--alias", metavar="ALIAS",
                   help="with --register: point ALIAS at the new version (serve models:/NAME@ALIAS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir or "OUTPUT_DIR")
    inputs = tempfile.TemporaryDirectory(prefix="latentrag-inputs-")    # local copies of inputs given as URIs
    try:
        overrides = list(args.set)
        if args.alias and not args.register:
            raise ConfigError("--alias needs --register NAME")
        for flag, key in ((args.estimator, "train.estimator"), (args.strategy, "train.strategy"),
                          (args.register, "mlflow.register_as"), (args.alias, "mlflow.register_alias"),
                          (args.max_steps, "train.max_steps"),
                          (args.corpus, "data.corpus"), (args.train_qa, "data.train_qa"),
                          (args.eval_qa, "data.eval_qa"), (args.dev_qa, "data.dev_qa"),
                          (args.output_dir, "output_dir")):
            if flag is not None:
                overrides.append(f"{key}={flag}")
        cfg = load_config(args.config, overrides)
        for key in ("corpus", "train_qa", "eval_qa"):
            if not getattr(cfg.data, key):
                raise ConfigError(f"data.{key}: required (--{key.replace('_', '-')} or the config)")
        # absolute from here on: under `ray job submit --working-dir` every node unpacks the working dir into a
        # directory of its own, so a relative path means a different place in each worker
        cfg.output_dir = str(shared_path(cfg.output_dir).resolve())
        index_arg = str(shared_path(args.index).resolve()) if args.index is not None else None
        output_dir = Path(cfg.output_dir)
        if inside_job_package(output_dir):
            print(f"warning: output_dir {output_dir} is inside this job's copy of --working-dir, which Ray deletes "
                  "with the cluster (and a resubmitted job gets another one): pass --output-dir on storage every "
                  "node sees", file=sys.stderr, flush=True)
        # everything below up to run_training only reads: a refused setting leaves no output behind
        check_model_paths(cfg)
        check_output_dir(output_dir.resolve(), args.resume, args.overwrite)
        if args.resume:
            plan_resume(output_dir.resolve())
        def local(location: str) -> str:           # s3://, gs://, file://, ...: read through pyarrow.fs
            return str(fetch_input(location, inputs.name))

        train_rows = read_qa(local(cfg.data.train_qa))
        eval_rows = read_qa(local(cfg.data.eval_qa))
        dev_rows = read_qa(local(cfg.data.dev_qa)) if cfg.data.dev_qa else None
        passages = rows = None
        if index_arg is None:
            passages, rows, count = read_passage_source(local(cfg.data.corpus), cfg)
            check_k_fits(cfg, count, f"the corpus {cfg.data.corpus}")
            check_gold_ids(cfg, passage_ids_of(passages, rows), train_rows, dev_rows, eval_rows)
        else:
            check_k_fits(cfg, int(read_index_manifest(index_arg)["count"]), f"the index {index_arg}")
        print(where_things_go(output_dir.resolve(), default_tracking_uri(output_dir, cfg.mlflow.tracking_uri)),
              flush=True)
        if rows is not None:
            passages = write_passage_rows(rows, output_dir)
        elif passages is not None and is_uri(cfg.data.corpus):
            # an ingested passages directory fetched from a store: Ray tasks on every node read it, so it moves
            # from this process's temporary copy to the output directory, which every node sees
            passages = Path(shutil.copytree(passages, output_dir / "passages", dirs_exist_ok=True))
        metrics = run_training(cfg, output_dir, passages, train_rows, dev_rows, eval_rows, resume=args.resume,
                               index_dir=index_arg, overwrite=args.overwrite)
    except (ConfigError, DataError, FileNotFoundError, ValueError, TimeoutError) as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoints up to the last train.checkpoint_every step are kept in {output_dir}; "
              "continue with the same command and --resume", file=sys.stderr)
        return 130
    finally:
        inputs.cleanup()
    print(results_table(metrics))
    print(f"metrics -> {output_dir / 'metrics.json'}")
    print(next_steps(output_dir.resolve() / "checkpoint", *[r["question"] for r in eval_rows[:1]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
