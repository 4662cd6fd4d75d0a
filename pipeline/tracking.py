"""MLflow tracking through an explicit MlflowClient: no process-global run or environment variables, so Ray
workers never inherit a half-configured MLflow state from the driver."""
from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient


def default_tracking_uri(output_dir: str | Path, configured: str | None = None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """One MLflow run. Create it on the driver; pass (tracking_uri, run_id) to workers and reattach with `attach`."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)
        self._pending: list[Metric] = []

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str | None = None,
              tags: dict | None = None, artifact_location: str | Path | None = None) -> "Tracker":
        """`artifact_location` applies when the experiment is new (default: MLflow's, relative to the cwd)."""
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        location = Path(artifact_location).resolve().as_uri() if artifact_location else None
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=location)
        run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
        return cls(tracking_uri, run.info.run_id)

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "Tracker":
        return cls(tracking_uri, run_id)

    def log_params(self, params: dict) -> None:
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None, flush: bool = True) -> None:
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                self._pending.append(Metric(k.replace("@", "_at_"), float(v), now, step or 0))
        if flush:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._pending), 500):
            self.client.log_batch(self.run_id, metrics=self._pending[i:i + 500])
        self._pending = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)
