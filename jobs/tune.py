"""Sweep the retriever and generator learning rates with Ray Tune.

Recipe: read a tune config (a train config + `sweep:`, see configs/tune.yaml and pipeline/sweep.py) -> prepare the
data and build the FAISS index once (synthetic KB by default, or data.* paths) -> MLflow parent run -> Ray Tune
(ASHA on `score` = dev metric with a tie-break) over trials that all reuse that index:
  - train.num_workers == 1: a function trainable runs the RagTrainer loop in the trial process;
  - train.num_workers > 1: the trial function launches a TorchTrainer (jobs.train.train_loop_per_worker) and a
    Train callback passes its dev reports on to Tune.
Each trial is an MLflow child run (tag mlflow.parentRunId). At the end: results.csv, heatmap.png and
best_config.yaml (accepted as is by `latentrag train --config`), logged to the parent run.
`sweep.mode: two-phase` runs two Tune experiments: generator LR with the retriever frozen, then retriever LR with
the best generator LR. `--resume` continues an interrupted sweep (Tuner.restore): finished trials are kept.

    latentrag tune --config configs/tune.yaml --output-dir runs/tune
    latentrag tune --config configs/tune.yaml --output-dir runs/tune --resume
    python -m jobs.tune --config configs/tune.yaml --set sweep.mode=two-phase --set train.max_steps=200
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import ray

from jobs.index import build_index
from jobs.ray_env import ensure_ray
from jobs.sharded_index import release_shards
from jobs.train import check_gold_ids, make_torch_trainer, passage_ids_of, prepare_passages
from pipeline import sweep
from pipeline.config import Config, ConfigError, from_dict, save_config
from pipeline.data import DataError, chunk_passages, read_qa, write_passages
from pipeline.index import load_index
from pipeline.recipe import Events, TrainRecipe
from pipeline.synthetic import generate_knowledge_base, write_knowledge_base
from pipeline.tracking import Tracker, default_tracking_uri

# Ray Tune and Train are imported where used: heavy (1-3 s), and `latentrag tune --help` should not wait.

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tune.yaml"
STATE_FILE = "sweep_state.json"


class SweepInterrupted(RuntimeError):
    """Tune stopped before every trial ended (the experiment state is saved: `--resume` continues it)."""


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- MLflow
def child_tracker(tracking_uri: str, parent_run_id: str, trial_id: str, trial_name: str, phase: str):
    """The child run of a trial; a restarted trial (after `--resume` or a failure) reuses its run."""
    parent = Tracker.attach(tracking_uri, parent_run_id)
    exp_id = parent.client.get_run(parent_run_id).info.experiment_id
    found = parent.client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                              f"and tags.trial_id = '{trial_id}'")
    if found:
        parent.client.update_run(found[0].info.run_id, status="RUNNING")
        return Tracker.attach(tracking_uri, found[0].info.run_id)
    run = parent.client.create_run(exp_id, run_name=f"{phase}-{trial_name}",
                                   tags={"mlflow.parentRunId": parent_run_id, "trial_id": trial_id, "phase": phase})
    return Tracker.attach(tracking_uri, run.info.run_id)


# --------------------------------------------------------------------------------------------- trial side
class TuneEvents(Events):
    """A function trainable's side of the recipe: per-step metrics to the trial's MLflow run, dev reports with
    `score` to Tune."""

    def __init__(self, tracker, metric: str, tie_break: str | None):
        self.tracker, self.metric, self.tie_break = tracker, metric, tie_break

    def log(self, recipe, step, metrics):
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("loss_mean",)}, step=step)

    def report(self, recipe, report, write_checkpoint):
        import ray.tune

        report = {**report, "score": sweep.combined_score(report, self.metric, self.tie_break,
                                                          report.get("dev_num_questions"))}
        self.tracker.log_metrics({k: v for k, v in report.items() if k != "step"}, step=report["step"])
        if report["step"] == recipe.cfg.train.max_steps:
            self.tracker.end()          # before the last report: after it, Tune may stop this process at once
        ray.tune.report(report)


def trial_in_process(params: dict, base_cfg: dict, settings: dict, index_dir: str, train_rows: list,
                     dev_rows: list, tracking_uri: str, parent_run_id: str, phase: str, metric: str,
                     tie_break: str | None, every: int) -> None:
    """A function trainable (train.num_workers == 1): the training recipe in this process; dev metrics go to Tune
    every `every` steps and at the last."""
    import ray.tune

    cfg = sweep.trial_config(from_dict(base_cfg), params, settings)
    cfg.train.eval_every, cfg.train.checkpoint_every = every, 0
    ctx = ray.tune.get_context()
    tracker = child_tracker(tracking_uri, parent_run_id, ctx.get_trial_id(), ctx.get_trial_name(), phase)
    tracker.log_params({**cfg.flat(), **{f"trial.{k}": v for k, v in params.items()}})
    recipe = TrainRecipe(cfg, train_rows, dev_rows, events=TuneEvents(tracker, metric, tie_break))
    recipe.setup(load_index(index_dir))
    recipe.train()
    recipe.cleanup()


def _score_callback(metric: str, tie_break: str | None):
    """A Ray Train callback that forwards rank 0's dev reports to Tune with `score` added (reports without dev
    metrics, such as checkpoint-only ones, are not forwarded: ASHA needs the metric in every result)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if metric not in m:
                return
            m["score"] = sweep.combined_score(m, metric, tie_break, m.get("dev_num_questions"))
            super().after_report(run_context, [m] + list(metrics[1:]), checkpoint)

    return ScoreReportCallback()


def trial_torch_trainer(params: dict, base_cfg: dict, settings: dict, index_dir: str, train_rows: list,
                        dev_rows: list, tracking_uri: str, parent_run_id: str, phase: str, metric: str,
                        tie_break: str | None, every: int, storage_path: str) -> None:
    """A trial driver (train.num_workers > 1): launches a TorchTrainer running jobs.train.train_loop_per_worker
    (Train V2 + Tune, as documented: a unique run name per trial, TuneReportCallback)."""
    import ray.tune

    cfg = sweep.trial_config(from_dict(base_cfg), params, settings)
    cfg.train.eval_every = every
    ctx = ray.tune.get_context()
    tracker = child_tracker(tracking_uri, parent_run_id, ctx.get_trial_id(), ctx.get_trial_name(), phase)
    tracker.log_params({**cfg.flat(), **{f"trial.{k}": v for k, v in params.items()}})
    name = f"train-trial_id={ctx.get_trial_id()}"
    trainer = make_torch_trainer(
        cfg, {"cfg": cfg.to_dict(), "index_dir": index_dir, "train_rows": train_rows, "dev_rows": dev_rows,
              "tracking_uri": tracking_uri, "run_id": tracker.run_id, "resume_from": None},
        name, storage_path, use_dev=True, callbacks=[_score_callback(metric, tie_break)])
    try:
        result = trainer.fit()
    finally:
        release_shards(name)                 # the trial's index-shard actors (index.search_shards), if any
    tracker.end("FAILED" if result.error else "FINISHED")
    if result.error:
        raise RuntimeError(f"trial training failed: {result.error}")


# --------------------------------------------------------------------------------------------- driver side
def prepare_data(cfg: Config, out: Path, index: str | None, resume: bool) -> dict:
    """Rows and the index every trial reuses, plus the data paths best_config.yaml points at."""

    if cfg.data.corpus is None:                     # the built-in synthetic knowledge base

        kb = generate_knowledge_base(seed=cfg.data.synthetic_seed, num_entities=cfg.data.synthetic_entities,
                                     template_set=cfg.data.synthetic_templates)
        paths = write_knowledge_base(kb, out / "data")
        passages = out / "passages"
        if not (passages / "passages.json").exists():
            write_passages(chunk_passages(kb.passages, cfg.data.chunk_words, cfg.data.chunk_overlap), passages)
        train_rows, dev_rows = kb.train, kb.dev
        data = {"corpus": str(passages), "train_qa": paths["train"], "dev_qa": paths["dev"],
                "eval_qa": paths["test"]}
        _log(f"[data] synthetic knowledge base: {len(kb.passages)} passages, {len(kb.train)} train / "
             f"{len(kb.dev)} dev questions -> {out / 'data'}")
    else:
        for key in ("train_qa", "dev_qa", "eval_qa"):
            if not getattr(cfg.data, key):
                raise ConfigError(f"data.{key}: required for a sweep on your own data (dev_qa ranks the trials)")
        train_rows, dev_rows = read_qa(cfg.data.train_qa), read_qa(cfg.data.dev_qa)
        passages = prepare_passages(cfg.data.corpus, out, cfg) if index is None else None
        if passages is not None:              # refused before encoding: a gold id that names no corpus row
            check_gold_ids(cfg, passage_ids_of(passages, None), train_rows, dev_rows, None)
        data = {"corpus": str(Path(passages or cfg.data.corpus).resolve()),
                **{k: str(Path(getattr(cfg.data, k)).resolve()) for k in ("train_qa", "dev_qa", "eval_qa")}}
    if index is None:
        root = out / "index"
        if resume and (root / "current").exists():
            index = str(root)
        else:
            t = time.time()
            index = str(build_index(passages, root, encoder=cfg.retriever.encoder, index_type=cfg.index.type,
                                    num_actors=cfg.index.encode_actors, batch_size=cfg.index.encode_map_batch_size,
                                    threads_per_actor=cfg.index.threads_per_actor))
            _log(f"[index] built in {time.time() - t:.0f}s")
    loaded = load_index(index)
    _log(f"[index] version {loaded.version}: {len(loaded.ids)} passages (reused by every trial)")
    check_gold_ids(cfg, loaded.ids, train_rows, dev_rows, None)
    return {"train_rows": train_rows, "dev_rows": dev_rows, "index_dir": str(loaded.path), "data": data}


def _tune_dims(dims: dict) -> dict:
    from ray import tune

    return {name: tune.grid_search(d[1]) if d[0] == "grid" else tune.loguniform(d[1], d[2])
            for name, d in dims.items()}


def run_phase(cfg: Config, spec: sweep.SweepSpec, plan: dict, prepared: dict, out: Path, tracking_uri: str,
              parent_run_id: str, resume: bool) -> list[dict]:
    """One Tune experiment (restored when `resume` and it exists); returns one results row per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    storage = out / "ray_results"
    every = sweep.eval_interval(cfg, spec)
    common = dict(base_cfg=cfg.to_dict(), settings=plan["set"], index_dir=prepared["index_dir"],
                  train_rows=prepared["train_rows"], dev_rows=prepared["dev_rows"], tracking_uri=tracking_uri,
                  parent_run_id=parent_run_id, phase=plan["name"], metric=spec.metric, tie_break=spec.tie_break,
                  every=every)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if cfg.train.num_workers > 1:
        per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
        # the trial driver holds no CPU (a token of memory only): the TorchTrainer's workers hold them
        trainable = tune.with_resources(tune.with_parameters(trial_torch_trainer, **common,
                                                             storage_path=str(storage / "train_runs")),
                                        {"CPU": 0, "memory": 64 * 1024 * 1024})
        # Tune cannot see the workers' demand: limit the drivers so that their workers fit
        max_concurrent = spec.max_concurrent or max(1, cpus // per_trial)
    else:
        trainable = tune.with_resources(tune.with_parameters(trial_in_process, **common),
                                        {"CPU": cfg.train.cpus_per_worker})
        max_concurrent = spec.max_concurrent or None    # the trials' CPU requests limit them
    path = storage / plan["name"]
    if resume and tune.Tuner.can_restore(str(path)):
        _log(f"[tune] {plan['name']}: restoring {path} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="step", max_t=plan["max_t"], grace_period=plan["grace"],
                                   reduction_factor=spec.reduction_factor)
                     if spec.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=_tune_dims(plan["dims"]),
            tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=plan["name"], storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures)))
    t = time.time()
    grid = tuner.fit()
    _log(f"[tune] {plan['name']}: {len(grid)} trials in {time.time() - t:.0f}s")
    # trials not yet created (a concurrency limit holds them back) count as unfinished too
    unfinished = sweep.num_trials(plan["dims"], spec.num_samples) - grid.num_terminated - grid.num_errors
    if unfinished:                   # Ctrl+C / SIGINT: Tune saved the experiment state and returned early
        raise SweepInterrupted(f"sweep interrupted with {unfinished} trial(s) unfinished; continue it with "
                               f"`latentrag tune --config ... --output-dir {out} --resume`")
    return _rows(grid, plan["name"], plan["max_t"], tracking_uri, parent_run_id)


def _rows(grid, phase: str, max_t: int, tracking_uri: str, parent_run_id: str) -> list[dict]:
    """Results rows (last report of each trial); child runs still marked RUNNING (stopped by ASHA) are closed."""

    client = Tracker.attach(tracking_uri, parent_run_id).client
    exp_id = client.get_run(parent_run_id).info.experiment_id
    children = {r.data.tags.get("trial_id"): r for r in client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")}
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        cfg = result.config or {}
        child = children.get(trial_id)
        status = "ERROR" if result.error else ("COMPLETE" if (m.get("step") or 0) >= max_t else "STOPPED")
        if child is not None and child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "FAILED" if result.error else "KILLED")
        rows.append({"phase": phase, "trial_id": trial_id, "status": status,
                     **{k: cfg.get(k) for k in ("retriever_lr", "generator_lr", "estimator", "k", "tau")},
                     **{k: m.get(k) for k in ("step", "score", "dev_em", "dev_f1", "dev_recall@1", "dev_recall@5",
                                              "dev_nll")},
                     "mlflow_run_id": child.info.run_id if child is not None else None})
    return rows


def run_sweep(cfg: Config, spec: sweep.SweepSpec, output_dir: str | Path, resume: bool = False,
              index: str | None = None) -> dict:
    """The whole sweep on a running (or freshly started) Ray. Returns the summary written to sweep.json."""
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(out)
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else {}
    ensure_ray()
    uri = default_tracking_uri(out, cfg.mlflow.tracking_uri)
    if state.get("parent_run_id"):
        parent = Tracker.attach(uri, state["parent_run_id"])
        parent.client.update_run(parent.run_id, status="RUNNING")
        _log(f"[mlflow] resuming sweep run {parent.run_id}")
    else:
        parent = Tracker.start(uri, cfg.mlflow.experiment, cfg.mlflow.run_name or f"sweep-{spec.mode}",
                               tags={"sweep_mode": spec.mode}, artifact_location=out / "mlartifacts")
        parent.log_params({**cfg.flat(), **{f"sweep.{k}": v for k, v in vars(spec).items()}})
        state = {"parent_run_id": parent.run_id}
        state_path.write_text(json.dumps(state))
        _log(f"[mlflow] sweep run {parent.run_id} at {uri}")
    start = time.time()
    try:
        prepared = prepare_data(cfg, out, index, resume)
        save_config(cfg, out / "config.yaml")
        plans = sweep.phase_plan(cfg, spec)
        rows = run_phase(cfg, spec, plans[0], prepared, out, uri, parent.run_id, resume)
        best = sweep.best_row(rows)
        if spec.mode == "two-phase":
            _log(f"[tune] phase 1 best generator lr {best['generator_lr']:.3g} (score {best['score']:.4f})")
            plans.append(sweep.second_phase(cfg, spec, best["generator_lr"]))
            rows += run_phase(cfg, spec, plans[1], prepared, out, uri, parent.run_id, resume)
            best = sweep.best_row([r for r in rows if r["phase"] == "phase2"])
        best_plan = next(p for p in plans if p["name"] == best["phase"])
        params = {k: best[k] for k in sweep.PARAM_KEYS if best.get(k) is not None}

        sweep.write_results_csv(rows, out / "results.csv")
        sweep.plot_heatmap(rows, out / "heatmap.png", value="score",
                           title=f"score = {spec.metric} (ties: {spec.tie_break}) over learning rates")
        best_cfg = sweep.write_best_config(cfg, params, out / "best_config.yaml", best_plan["set"],
                                           data=prepared["data"], output_dir=str(out / "best"))
        summary = {"best": best, "best_params": params, "trials": len(rows), "mode": spec.mode,
                   "seconds": round(time.time() - start, 1), "parent_run_id": parent.run_id,
                   "best_config": str(out / "best_config.yaml"), "index_dir": prepared["index_dir"]}
        (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
        parent.log_metrics({"best_score": best["score"], "best_retriever_lr": best_cfg.retriever.lr,
                            "best_generator_lr": best_cfg.generator.lr, "num_trials": len(rows),
                            **{f"best_{k}": best[k] for k in ("dev_em", "dev_f1", "dev_recall@1", "dev_nll")
                               if best.get(k) is not None}})
        for name in ("results.csv", "heatmap.png", "best_config.yaml", "config.yaml", "sweep.json"):
            parent.log_artifact(out / name)
        parent.end()
        return summary
    except SweepInterrupted:
        parent.end("KILLED")
        raise
    except BaseException:
        parent.end("FAILED")
        raise


def results_table(rows: list[dict]) -> str:
    cols = ("phase", "retriever_lr", "generator_lr", "step", "score", "dev_em", "dev_recall@1", "dev_nll", "status")

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    table = [cols] + [tuple(fmt(r.get(c)) for c in cols) for r in rows]
    width = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, width)) for r in table]
    lines.insert(1, "-+-".join("-" * w for w in width))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="tune YAML: a train config + `sweep:` "
                                                                  "(default: configs/tune.yaml)")
    p.add_argument("--output-dir", help="where data, index, Ray results, MLflow and best_config.yaml go "
                                        "(default: output_dir of the config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sweep.mode=two-phase or --set train.max_steps=50")
    p.add_argument("--index", help="an existing index root or version directory (skip encoding)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in OUTPUT_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        cfg, spec = sweep.load_sweep_config(args.config, overrides)
        summary = run_sweep(cfg, spec, cfg.output_dir, resume=args.resume, index=args.index)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130

    with open(Path(cfg.output_dir) / "results.csv") as f:
        rows = [{k: (float(v) if k not in ("phase", "status", "trial_id", "estimator", "mlflow_run_id") and v
                     else v or None) for k, v in r.items()} for r in csv.DictReader(f)]
    print(results_table(rows))
    best = summary["best_params"]
    print(f"\nbest: retriever lr {best.get('retriever_lr')}  generator lr {best.get('generator_lr')}  "
          f"score {summary['best']['score']:.4f}   ({summary['seconds']:.0f}s)")
    print(f"best config -> {summary['best_config']}   (latentrag train --config {summary['best_config']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
