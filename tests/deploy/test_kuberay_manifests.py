"""deploy/kuberay/: the RayJob (training) and RayService (endpoint) manifests against KubeRay's own CRD schemas
(tests/data/kuberay/, copied from ray-project/kuberay: see the README there), no cluster needed.

Kubernetes rejects unknown fields (kubectl's default server-side field validation is Strict), while a CRD's
openAPIV3Schema lists properties without forbidding others: `strict` adds additionalProperties: false wherever
the schema names its properties and does not keep unknown fields, so a misspelt key fails here as it would there.
The Serve config inside the RayService is checked with Ray Serve's own schema, and against configs/serve.yaml.
"""
import copy
import functools
import gzip
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "tests" / "data" / "kuberay"
DEPLOY = ROOT / "deploy" / "kuberay"


def strict(schema):
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict:
    # 1-1.4 MB of YAML each (every Pod field): libyaml's loader when PyYAML has it, parsed once
    text = gzip.decompress((CRDS / f"ray.io_{kind.lower()}s.yaml.gz").read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict(served[version]["schema"]["openAPIV3Schema"])
    # metadata is Kubernetes' ObjectMeta, which the CRD leaves open: name and labels are what these use
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    return schema


def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def validate(doc: dict) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, crd_schema(doc["kind"]), cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("name,kind", [("rayjob-train.yaml", "RayJob"), ("rayservice-serve.yaml", "RayService")])
def test_manifest_matches_the_kuberay_crd(name, kind):
    doc = manifest(name)
    assert doc["kind"] == kind
    validate(doc)


def test_strict_schema_rejects_a_misspelt_field_and_a_wrong_type():
    doc = manifest("rayjob-train.yaml")
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate(typo)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="'yes' is not of type 'boolean'"):
        validate(wrong)


def test_rayjob_runs_the_train_job_on_shared_storage():
    spec = manifest("rayjob-train.yaml")["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.train"]
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config).is_file()
    out = entry[entry.index("--output-dir") + 1]
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:                      # every pod mounts the volume that holds the output dir
        mounts = [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(out.startswith(m + "/") for m in mounts), (group.get("groupName", "head"), mounts)
    # enough GPU workers for the config's train.num_workers
    train = yaml.safe_load((ROOT / config).read_text())["train"]
    gpus = sum(g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in spec["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert gpus >= train["num_workers"]


def test_rayservice_serve_config_is_configs_serve_yaml_with_cluster_settings():
    from ray.serve.schema import ServeDeploySchema

    served = yaml.safe_load(manifest("rayservice-serve.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)           # Ray Serve's own schema of a `serve deploy` config
    local = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    app, local_app = served["applications"][0], local["applications"][0]
    # the same application: import path, deployments and their settings, and every arg but where things are
    assert app["import_path"] == local_app["import_path"]
    assert app["deployments"] == local_app["deployments"]
    assert {k: v for k, v in app["args"].items() if k not in ("checkpoint", "admin_token_file")} == \
        {k: v for k, v in local_app["args"].items() if k != "checkpoint"}
    assert served["http_options"]["host"] == "0.0.0.0"      # reachable through the Kubernetes service
    assert Path(app["args"]["checkpoint"]).is_absolute()
