"""Index refresh while the passage encoder trains (no Ray here; `jobs/refresh.py` runs the builds on Ray).

When `retriever.train_passage_encoder` is on, the vectors in the index go stale as the passage encoder moves. On a
schedule (`index.refresh_schedule`, e.g. "0-1000:200,1000-:1000": every 200 steps before step 1000, then every
1000) the trainer snapshots the current passage-encoder weights, a background job re-encodes the corpus with the
snapshot and builds the next index version, and training goes on with the old index meanwhile. When the build is
done, every worker switches to the new version at the next step boundary. Against the staleness in between,
`rerank_rows` re-scores the retrieved top-M with the current passage encoder (`index.rerank_top_m`).

    schedule = parse_refresh_schedule("0-1000:200,1000-:1000")
    refresher = IndexRefresher(schedule, builder, snapshot_root)      # builder: submit / done / result
    ...after each optimiser step:
    new_version = refresher.on_step_boundary(step, model.passage_encoder)   # None, or a version dir to switch to
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

_SPAN_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d*)\s*:\s*(\d+)\s*$")


class ScheduleError(ValueError):
    """An `index.refresh_schedule` that cannot be used; the message names the key and the bad part."""


@dataclass(frozen=True)
class Span:
    start: int              # first step of the span (inclusive)
    end: int | None         # last step, exclusive; None = open-ended
    every: int              # refresh every `every` steps, counted from `start`


def parse_refresh_schedule(text: str | None, key: str = "index.refresh_schedule") -> list[Span]:
    """ "START-END:EVERY,START-:EVERY" -> spans, in order, without gaps' overlap. Empty or None -> [] (no refresh).

    A refresh is due at step s > 0 when some span has start <= s < end and (s - start) % every == 0."""
    if text is None or not str(text).strip():
        return []
    spans: list[Span] = []
    for part in str(text).split(","):
        m = _SPAN_RE.match(part)
        if not m:
            raise ScheduleError(f"{key}: cannot read {part.strip()!r} in {text!r}; write spans as START-END:EVERY "
                                f"or START-:EVERY, separated by commas, e.g. '0-1000:200,1000-:1000'")
        start, end, every = int(m.group(1)), (int(m.group(2)) if m.group(2) else None), int(m.group(3))
        if every < 1:
            raise ScheduleError(f"{key}: {part.strip()!r}: the interval must be >= 1 step")
        if end is not None and end <= start:
            raise ScheduleError(f"{key}: {part.strip()!r}: the span ends at or before it starts")
        if spans:
            prev = spans[-1]
            if prev.end is None:
                raise ScheduleError(f"{key}: {part.strip()!r} comes after the open-ended span "
                                    f"'{prev.start}-:{prev.every}'; the open-ended span must be last")
            if start < prev.end:
                raise ScheduleError(f"{key}: {part.strip()!r} overlaps '{prev.start}-{prev.end}:{prev.every}'; "
                                    f"spans must be in step order and must not overlap")
        spans.append(Span(start, end, every))
    return spans


def refresh_due(schedule: list[Span], step: int) -> bool:
    if step <= 0:
        return False
    for span in schedule:
        if span.start <= step and (span.end is None or step < span.end):
            return (step - span.start) % span.every == 0
    return False


def refresh_steps(schedule: list[Span], max_steps: int) -> list[int]:
    """The steps in (0, max_steps) at which a refresh is due."""
    return [s for s in range(1, max_steps) if refresh_due(schedule, s)]


@torch.no_grad()
def rerank_rows(query_vectors: torch.Tensor, rows: np.ndarray, texts: list[list[str]], passage_encoder,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each question's retrieved rows [B, M] with the *current* passage encoder (texts [B][M], as the
    encoder reads them) and keep the best k: (rows [B, k], scores [B, k]), best first, ties by retrieval order."""
    rows = np.asarray(rows)
    b, m = rows.shape
    if k > m:
        raise ValueError(f"cannot keep the top {k} of {m} retrieved rows")
    flat = [t for row in texts for t in row]
    if len(flat) != b * m:
        raise ValueError(f"{len(flat)} texts for {b} x {m} rows")
    p = passage_encoder.encode(flat) if hasattr(passage_encoder, "encode") else passage_encoder(flat)
    p = p.to(query_vectors.device, query_vectors.dtype).view(b, m, -1)
    scores = (query_vectors.detach().unsqueeze(1) * p).sum(-1).float().cpu().numpy()
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


class Builder(Protocol):
    """How a refresh build runs (jobs/refresh.py: a Ray task). `submit` must return at once."""

    def submit(self, encoder_dir: str, step: int) -> Any: ...

    def done(self, handle: Any) -> bool: ...

    def result(self, handle: Any) -> dict: ...     # at least {"version_dir": str}; the rest is logged


class IndexRefresher:
    """The refresh state machine, called at every step boundary. At most one build is in flight: a refresh that
    falls due while one runs is skipped (counted in `skipped`), so a slow build never queues up behind itself.

    `on_step_boundary(step, passage_encoder)` returns the version directory to switch to once a build has finished
    (the caller loads it, swaps it into the model and reports the switch), else None. `history` holds one record
    per refresh: steps of snapshot/switch, snapshot seconds, build seconds and what the builder reports."""

    def __init__(self, schedule: list[Span], builder: Builder, snapshot_root: str | Path, keep_snapshots: int = 2,
                 save_fn=None):
        """`save_fn(encoder, dir)` writes a snapshot (default `pipeline.models.retriever.save_encoder`)."""
        self.schedule, self.builder = schedule, builder
        self.save_fn = save_fn
        self.snapshot_root = Path(snapshot_root)
        self.keep_snapshots = keep_snapshots
        self.in_flight: tuple[Any, dict] | None = None
        self.history: list[dict] = []
        self.skipped = 0

    def on_step_boundary(self, step: int, passage_encoder) -> str | None:
        switch_to = self.poll(step)
        if refresh_due(self.schedule, step):
            if self.in_flight is not None:
                self.skipped += 1
            else:
                self.start(step, passage_encoder)
        return switch_to

    def start(self, step: int, passage_encoder) -> dict:
        from pipeline.models.retriever import save_encoder

        save = self.save_fn or save_encoder
        t0 = time.perf_counter()
        snap = self.snapshot_root / f"passage-encoder-step{step:07d}"
        tmp = snap.with_name(snap.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save(passage_encoder, tmp)
        shutil.rmtree(snap, ignore_errors=True)
        tmp.rename(snap)
        record = {"step_started": step, "snapshot": str(snap), "snapshot_seconds": time.perf_counter() - t0,
                  "submitted_at": time.time()}
        handle = self.builder.submit(str(snap), step)
        self.in_flight = (handle, record)
        self._prune_snapshots()
        return record

    def poll(self, step: int) -> str | None:
        if self.in_flight is None or not self.builder.done(self.in_flight[0]):
            return None
        handle, record = self.in_flight
        self.in_flight = None
        result = self.builder.result(handle)          # raises if the build failed: a refresh never fails silently
        record.update({k: v for k, v in result.items() if k != "version_dir"})
        record.update({"version_dir": str(result["version_dir"]), "step_switched": step,
                       "steps_on_stale_index": step - record["step_started"],
                       "wall_seconds": time.time() - record.pop("submitted_at")})
        self.history.append(record)
        return str(result["version_dir"])

    def wait(self, step: int, timeout: float | None = None) -> str | None:
        """Block until the build in flight (if any) is done; returns its version directory."""
        t0 = time.time()
        while self.in_flight is not None and not self.builder.done(self.in_flight[0]):
            if timeout is not None and time.time() - t0 > timeout:
                return None
            time.sleep(0.2)
        return self.poll(step)

    def _prune_snapshots(self) -> None:
        snaps = sorted(p for p in self.snapshot_root.glob("passage-encoder-step*") if not p.name.endswith(".tmp"))
        in_use = {self.in_flight[1]["snapshot"]} if self.in_flight else set()
        for old in snaps[:-self.keep_snapshots] if self.keep_snapshots else []:
            if str(old) not in in_use:
                shutil.rmtree(old, ignore_errors=True)
