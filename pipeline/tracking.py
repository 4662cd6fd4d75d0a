"""MLflow tracking through an explicit MlflowClient: no process-global run or environment variables, so Ray
workers never inherit a half-configured MLflow state from the driver."""
from __future__ import annotations

import os
import subprocess
import time
from importlib import metadata
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]


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

    def set_tags(self, tags: dict) -> None:
        items = [RunTag(str(k), str(v)[:5000]) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100])

    def register_model(self, name: str, artifact_path: str = "model", alias: str | None = None) -> str:
        """Register `runs:/<run>/<artifact_path>` as a new version of model `name` (created if new); point
        `alias` at it. Returns the version."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        mv = self.client.create_model_version(name, f"runs:/{self.run_id}/{artifact_path}", run_id=self.run_id)
        if alias:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


# ------------------------------------------------------------------------------------------------ lineage
def package_version() -> str | None:
    try:
        return metadata.version("latentrag")
    except metadata.PackageNotFoundError:
        return None


def git_commit(where: str | Path = PROJECT_ROOT, timeout: float = 5.0) -> str | None:
    """HEAD of the repository the code runs from; None outside a git checkout (an installed package, a Ray
    working_dir upload without .git) or when git is missing or slow."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(where), capture_output=True, text=True,
                             timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def code_lineage() -> dict:
    """What code produced a run: the package version and, in a git checkout, the commit."""
    return {k: v for k, v in (("package_version", package_version()), ("git_commit", git_commit()))
            if v is not None}
