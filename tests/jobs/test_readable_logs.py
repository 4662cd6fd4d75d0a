"""Logs a person can read: no ANSI colour codes when the output is not a terminal (Ray's coloured worker prefixes
and dashboard line), and the first and last lines of a run say where things are and what to do next."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.train import next_steps, where_things_go

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, threading, ray
from jobs.ray_env import plain_logs


class Watch:
    # stdout that notices the worker's line: the driver prints worker lines when they arrive, so wait for it
    def __init__(self, stream):
        self.stream, self.seen = stream, threading.Event()

    def write(self, text):
        if "hello from a worker" in text:
            self.seen.set()
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


sys.stdout = Watch(sys.stdout)
if {plain}:
    plain_logs()
ray.init(num_cpus=1)

@ray.remote
def hello():
    print("hello from a worker", flush=True)

ray.get(hello.remote())
sys.stdout.seen.wait(120)
ray.shutdown()
"""


def _run(plain: bool) -> str:
    # its own Ray (own RAY_TMPDIR, short: Ray's socket paths must stay under 107 bytes)
    tmp = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_COLOR_PREFIX", None)
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT.format(plain=plain)], cwd=ROOT, env=env, timeout=300,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-2000:]
    return out.stdout


@pytest.mark.ray
def test_no_colour_codes_when_output_is_not_a_terminal():
    coloured = _run(plain=False)           # what Ray does on its own, piped
    assert "hello from a worker" in coloured and "\x1b[" in coloured
    plain = _run(plain=True)
    assert "hello from a worker" in plain and "(hello pid=" in plain
    assert "\x1b[" not in plain, [line for line in plain.splitlines() if "\x1b[" in line]


def test_first_and_last_lines_say_where_things_are_and_what_next(tmp_path):
    first = where_things_go(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(tmp_path) in first and f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in first
    ckpt = tmp_path / "my run" / "checkpoint"
    lines = next_steps(ckpt, "Who's there?", port=8123).splitlines()
    serve = next(line for line in lines if "latentrag serve" in line)
    assert shlex.split(serve.split("serve it", 1)[1])[:4] == ["latentrag", "serve", "--checkpoint", str(ckpt)]
    curl = shlex.split(next(line for line in lines if "curl" in line).split("ask it", 1)[1])
    assert curl[:3] == ["curl", "-s", "http://127.0.0.1:8123/v1/answer"]
    assert json.loads(curl[curl.index("-d") + 1]) == {"question": "Who's there?"}
    assert any("http://127.0.0.1:8123/" in line and "page" in line for line in lines)
