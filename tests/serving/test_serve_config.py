"""configs/serve.yaml is a Serve config that `serve deploy` accepts (Ray's own ServeDeploySchema), its application
args are valid ServeArgs, and its deployments carry the queue limits and autoscaling the API relies on."""
from pathlib import Path

import pytest
import yaml

from serving.app import DEPLOYMENT_NAMES
from serving.schemas import ServeArgs

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "serve.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


def test_serve_deploy_schema_accepts_it(config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    assert app.import_path == "serving.app:app_builder"
    assert {d.name for d in app.deployments} == set(DEPLOYMENT_NAMES)


def test_args_are_serve_args_and_deployments_are_limited_and_autoscaled(config):
    (app,) = config["applications"]
    args = ServeArgs(**app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["Ingress"]["num_replicas"] == 1                 # it holds the served version
    for name in DEPLOYMENT_NAMES:                                        # overload is a 503, never an endless queue
        assert deployments[name]["max_queued_requests"] > 0 and deployments[name]["max_ongoing_requests"] > 0
    for name in ("Retriever", "Generator"):
        auto = deployments[name]["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    # a Generator replica must be able to hold a full batch, or batches never fill
    assert deployments["Generator"]["max_ongoing_requests"] >= args.max_batch_size


def test_the_app_builder_is_importable_as_the_config_names_it(config):
    import importlib

    module, attr = config["applications"][0]["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
