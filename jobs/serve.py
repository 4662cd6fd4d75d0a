"""`latentrag serve`: put a trained checkpoint online with Ray Serve (see serving/app.py for the API).

    latentrag serve --checkpoint runs/demo/checkpoint
    latentrag serve --checkpoint models:/latentrag/3 --port 8080 --config configs/serve.yaml
    curl -s 127.0.0.1:8000/v1/answer -H 'content-type: application/json' -d '{"question": "..."}'

Reads a Serve config file (default: configs/serve.yaml of this repository when present): the first application's
`args` and `deployments`, and `http_options`. Flags override them. Runs until interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ray
import yaml
from pydantic import ValidationError

from jobs.ray_env import ensure_ray
from serving.loading import ServingLoadError, is_mlflow_uri
from serving.schemas import ServeArgs

# Ray Serve and the app (which imports it) are imported in main: heavy, and `latentrag serve --help` should not wait.

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentrag serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, runs:/<run_id>[/path] or models:/...")
    p.add_argument("--index", help="serve against this index root or version instead of the checkpoint's (by "
                                   "default the checkpoint finds its own, also after its run directory moved)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ checkpoints (default: "
                                          "MLFLOW_TRACKING_URI), e.g. sqlite:///runs/x/mlflow.db")
    p.add_argument("--host", help="HTTP host (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    p.add_argument("--config", help=f"Serve config YAML (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--name", default=None, help="application name (default: the config's, else latentrag)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an application arg, e.g. --set max_batch_size=1")
    return p


def load_serve_config(path: str | Path | None) -> dict:
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            return {}
        path = DEFAULT_CONFIG
    data = yaml.safe_load(Path(path).read_text()) or {}
    apps = data.get("applications") or [{}]
    app = apps[0]
    return {"http_options": data.get("http_options") or {}, "name": app.get("name"),
            "route_prefix": app.get("route_prefix", "/"), "args": dict(app.get("args") or {}),
            "deployments": {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []},
            "env_vars": ((app.get("runtime_env") or {}).get("env_vars") or {})}


def _absolute(value: str | None) -> str | None:
    if value is None or is_mlflow_uri(value):
        return value
    return str(Path(value).expanduser().resolve())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_serve_config(args.config)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read serve config: {exc}", file=sys.stderr)
        return 2
    app_args = dict(cfg.get("args", {}))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        app_args[key] = value
    if args.tracking_uri:
        # MLflow reads it from the environment here (resolving the checkpoint) and in the deployments (reloads)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    app_args["checkpoint"] = _absolute(args.checkpoint)
    if args.index:
        app_args["index"] = _absolute(args.index)
    elif app_args.get("index"):
        app_args["index"] = _absolute(app_args["index"])
    http = dict(cfg.get("http_options", {}))
    host = args.host or http.get("host") or "127.0.0.1"
    port = args.port or http.get("port") or 8000

    from ray import serve

    from serving.app import ADMIN_TOKEN_ENV, build_app, use_serve_throughput_env

    config_token = cfg.get("env_vars", {}).get(ADMIN_TOKEN_ENV)
    if config_token and not os.environ.get(ADMIN_TOKEN_ENV) and not any(
            app_args.get(k) for k in ("admin_token", "admin_token_file", "admin_token_sha256")):
        app_args["admin_token"] = str(config_token)        # hashed by build_app, never a runtime_env variable
    try:
        serve_args = ServeArgs(**app_args)
        app = build_app(serve_args, cfg.get("deployments"))
    except (ValidationError, ServingLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The admin token (LATENTRAG_ADMIN_TOKEN, args.admin_token or admin_token_file) reached build_app above, which
    # keeps only its SHA-256 for the deployments. It must not travel further: a runtime_env variable is written
    # into Ray's logs, and Ray's processes would inherit it from this one.
    os.environ.pop(ADMIN_TOKEN_ENV, None)
    if not ray.is_initialized():
        # Serve's processes read the throughput settings when Ray starts
        ensure_ray({**{k: v for k, v in cfg.get("env_vars", {}).items() if k != ADMIN_TOKEN_ENV},
                    **use_serve_throughput_env(),
                    **({"MLFLOW_TRACKING_URI": args.tracking_uri} if args.tracking_uri else {})})
    serve.start(http_options={"host": host, "port": int(port)})
    name = args.name or cfg.get("name") or "latentrag"
    print(f"[serve] {serve_args.checkpoint} -> http://{host}:{port}{cfg.get('route_prefix', '/')}  "
          f"(docs at /docs; Ctrl-C stops)", flush=True)
    try:
        serve.run(app, name=name, route_prefix=cfg.get("route_prefix", "/"), blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
