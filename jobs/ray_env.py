"""How every job joins Ray: the cluster named by RAY_ADDRESS (`ray job submit`, a driver on the head node), or a
local Ray started here. Workers get the variables that keep them offline and quiet, and nothing else: Ray writes
runtime_env variables into its logs, so no secret may travel this way."""
from __future__ import annotations

import os

import ray


def worker_env(extra: dict | None = None) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
            **{k: str(v) for k, v in (extra or {}).items()}}


def ensure_ray(extra_env: dict | None = None) -> bool:
    """Join (or start) Ray unless this process already has; True when this call did."""
    if ray.is_initialized():
        return False
    ray.init(runtime_env={"env_vars": worker_env(extra_env)})
    return True
