"""Index refresh during training, on Ray: the glue between `pipeline.refresh` and the train loop.

When `retriever.train_passage_encoder` is on and `index.refresh_schedule` is set, rank 0 of the train loop
snapshots the passage encoder at each scheduled step and submits one Ray task that re-encodes the corpus with the
snapshot (Ray Data, `jobs.encode`) and builds the next index version (`jobs.index.build_index`, not made `current`
yet). Training goes on with the old index. At the first step boundary after the build is done, rank 0 broadcasts
the new version to every worker (a `torch.distributed` broadcast when there are several), all of them switch
(`RagModel.set_index`) before the next step, and rank 0 points the index root's `current` at it. Index-shard
actors of the old version (index.search_shards) are stopped before the new version's start. Each refresh and
its cost (snapshot, encode and build seconds, steps trained on the stale index, switch seconds) goes to MLflow.

Resources: the build task reserves `index.refresh_cpus` logical CPUs and its encoder actors and build tasks as
many each, so the cluster needs that much room beside the train workers (fractions oversubscribe on purpose).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import ray
import torch.distributed as dist

from jobs.index import build_index
from pipeline.index import load_index, read_manifest, resolve_version_dir, set_current
from pipeline.refresh import IndexRefresher, parse_refresh_schedule


def _refresh_build(passages_dir: str, index_root: str, encoder_dir: str, step: int, kwargs: dict) -> dict:
    """Ray task body: encode + build one refresh version (not made current); returns its costs."""
    t0 = time.perf_counter()
    version = build_index(passages_dir, index_root, encoder=encoder_dir, make_current=False,
                          encoder_name=f"passage-encoder@step{step}", extra={"refresh_step": step}, **kwargs)
    manifest = read_manifest(version)
    enc = manifest.get("build", {}).get("encode", {})
    return {"version_dir": str(version), "version": manifest["version"],
            "build_seconds": time.perf_counter() - t0, "encode_seconds": enc.get("seconds"),
            "encode_passages_per_s": enc.get("passages_per_s")}


class RayRefreshBuilder:
    """`pipeline.refresh.Builder` on Ray: one task per refresh; `done` never blocks."""

    def __init__(self, passages_dir: str, index_root: str, index_cfg):
        self.passages_dir, self.index_root = str(passages_dir), str(index_root)
        cpus = float(index_cfg.refresh_cpus)
        self.cpus = cpus
        self.kwargs = {"index_type": index_cfg.type, "num_actors": index_cfg.encode_actors,
                       "batch_size": index_cfg.encode_map_batch_size, "threads_per_actor": index_cfg.threads_per_actor,
                       "cpus_per_actor": cpus, "build_cpus": cpus, "read_cpus": cpus}

    def submit(self, encoder_dir: str, step: int):
        task = ray.remote(_refresh_build).options(num_cpus=self.cpus)
        return task.remote(self.passages_dir, self.index_root, encoder_dir, step, self.kwargs)

    def done(self, handle) -> bool:
        ready, _ = ray.wait([handle], timeout=0)
        return bool(ready)

    def result(self, handle) -> dict:
        return ray.get(handle)

    def cancel(self, handle) -> None:
        ray.cancel(handle, force=True)


class RefreshHook:
    """Called by every rank after every optimiser step: `hook(model, step)`. Rank 0 owns the `IndexRefresher`."""

    def __init__(self, refresher: IndexRefresher | None, index_root: Path, rank: int, world: int,
                 log_metrics: Callable[[dict, int], None] | None = None, log: Callable[[str], None] = print,
                 open_index: Callable[[str], object] = load_index):
        self.refresher, self.index_root, self.rank, self.world = refresher, Path(index_root), rank, world
        self.log_metrics, self.log, self.open_index = log_metrics, log, open_index
        self.switches = 0

    def __call__(self, model, step: int) -> str | None:
        target = None
        if self.rank == 0 and self.refresher is not None:
            before = self.refresher.in_flight
            target = self.refresher.on_step_boundary(step, model.passage_encoder)
            if self.refresher.in_flight is not None and self.refresher.in_flight is not before:
                rec = self.refresher.in_flight[1]
                self.log(f"[refresh] step {step}: passage encoder snapshot ({rec['snapshot_seconds']:.1f}s), "
                         f"re-encode + index build running in the background")
                self._metrics({"refresh/snapshot_seconds": rec["snapshot_seconds"]}, step)
        if self.world > 1:
            box = [target]
            dist.broadcast_object_list(box, src=0)
            target = box[0]
        if target is None:
            return None
        t0 = time.perf_counter()
        old = model.index
        if hasattr(old, "shutdown"):
            # index-shard actors: the old version's go before the new version's start, so the cluster never holds
            # both. Once every rank is here no rank searches the old version any more; shared actors (one set for
            # all ranks) are then killed once, by rank 0
            if self.world > 1:
                dist.barrier()
            old.shutdown(release_shared=self.rank == 0)
        model.set_index(self.open_index(target))
        switch_seconds = time.perf_counter() - t0
        self.switches += 1
        if self.rank == 0:
            set_current(self.index_root, Path(target).name)
            rec = self.refresher.history[-1]
            self.log(f"[refresh] step {step}: switched to index {Path(target).name} (built in "
                     f"{rec['build_seconds']:.1f}s, {rec['steps_on_stale_index']} steps on the old index)")
            self._metrics({"refresh/build_seconds": rec["build_seconds"],
                           "refresh/encode_seconds": rec.get("encode_seconds") or 0.0,
                           "refresh/wall_seconds": rec["wall_seconds"],
                           "refresh/steps_on_stale_index": rec["steps_on_stale_index"],
                           "refresh/switch_seconds": switch_seconds,
                           "refresh/index_version": float(Path(target).name.lstrip("v")),
                           "refresh/skipped": self.refresher.skipped}, step)
        return target

    def close(self) -> None:
        """End of training: a build still in flight is cancelled (the model keeps the index it trained with)."""
        if self.refresher is not None and self.refresher.in_flight is not None:
            handle, rec = self.refresher.in_flight
            self.refresher.builder.cancel(handle)
            self.refresher.in_flight = None
            self.log(f"[refresh] training ended with the build from step {rec['step_started']} unfinished: cancelled")

    def _metrics(self, values: dict, step: int) -> None:
        if self.log_metrics is not None:
            self.log_metrics({k.replace("/", "_"): float(v) for k, v in values.items()}, step)


def _check_room(cfg) -> None:
    """A refresh build that can never be scheduled would leave training on the first index forever, silently."""
    total = ray.cluster_resources().get("CPU", 0.0)
    train = cfg.train.num_workers * cfg.train.cpus_per_worker
    # the build task, its encoder actors, a read task: every task and actor of the refresh reserves refresh_cpus.
    # (jobs.encode lists the Parquet row groups itself: ray.data.read_parquet's listing task would reserve a whole
    # CPU whatever it is told, which beside one 1-CPU train worker on 2 CPUs never got scheduled, issue #4)
    need = cfg.index.refresh_cpus * (2 + cfg.index.encode_actors)
    if total - train < need:
        raise ValueError(
            f"index.refresh_schedule: a refresh build needs {need:g} logical CPUs (index.refresh_cpus="
            f"{cfg.index.refresh_cpus:g} for the build task, each of index.encode_actors={cfg.index.encode_actors} "
            f"encoder actors and a read task) beside the {train:g} of the train workers, but the cluster has "
            f"{total:g}; lower index.refresh_cpus (a reservation, not a thread count) or train.cpus_per_worker")


def make_refresh_hook(cfg, index_dir: str | Path, output_dir: str | Path, rank: int, world: int,
                      log_metrics=None, log: Callable[[str], None] = print,
                      open_index: Callable[[str], object] = load_index) -> RefreshHook | None:
    """The train loop's hook, or None when no refresh is configured. The passages directory is the one the
    current index was built from (its manifest records it); new versions go beside it. `open_index(version_dir)`
    opens a new version the way the workers open theirs (memory-mapped, or through index-shard actors)."""
    schedule = parse_refresh_schedule(cfg.index.refresh_schedule)
    if not schedule or not cfg.retriever.train_passage_encoder:
        return None
    version_dir = resolve_version_dir(index_dir)
    passages_dir = read_manifest(version_dir).get("build", {}).get("passages_dir")
    if not passages_dir or not Path(passages_dir).is_dir():
        raise FileNotFoundError(f"index.refresh_schedule: the index {version_dir} does not name an existing passages "
                                f"directory in its manifest (build.passages_dir = {passages_dir!r}); build it with "
                                f"`latentrag index` / `latentrag train --corpus` to refresh it during training")
    refresher = None
    if rank == 0:
        _check_room(cfg)
        builder = RayRefreshBuilder(passages_dir, str(version_dir.parent), cfg.index)
        refresher = IndexRefresher(schedule, builder, Path(output_dir) / "refresh")
    return RefreshHook(refresher, version_dir.parent, rank, world, log_metrics, log, open_index)
