"""`latentrag serve` as a user starts it (its own Ray, in a subprocess, on 127.0.0.1) with an admin token in
LATENTRAG_ADMIN_TOKEN: the token works for /v1/admin/reload, and it is nowhere in Ray's session directory (logs,
runtime_env records) afterwards; a failed runs:/ reload leaves no files in the server's working or temporary
directory."""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                    hits.append(str(path.relative_to(root)))
            except OSError:
                pass
    return hits


def test_the_admin_token_reaches_no_log_and_failed_reloads_leave_no_files(tiny_checkpoints, tmp_path):
    a, _, _ = tiny_checkpoints
    token = "tok-" + secrets.token_hex(16)
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrs", dir="/tmp"))     # short: Ray's socket paths live under it
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env.update(LATENTRAG_ADMIN_TOKEN=token, RAY_TMPDIR=str(ray_tmp), TMPDIR=str(tmp), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--checkpoint", str(a), "--port", str(port),
                                 "--set", "generator_threads=1"], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _check_server(proc, base, token, log, ray_tmp, work, tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _check_server(proc, base, token, log, ray_tmp, work, tmp):
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        reload = f"{base}/v1/admin/reload"
        assert requests.post(reload, json={}, timeout=30, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        r = requests.post(reload, json={"checkpoint": "/nonexistent"}, timeout=60, headers=auth)
        assert r.status_code == 422 and "nonexistent" in r.text          # the token was accepted
        r = requests.post(reload, json={"checkpoint": "runs:/0123456789abcdef"}, timeout=120, headers=auth)
        assert r.status_code == 422 and "MLFLOW_TRACKING_URI" in r.text
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    sessions = list(ray_tmp.glob("ray/session_*"))
    assert sessions and any((s / "logs").is_dir() for s in sessions)
    assert list(ray_tmp.glob("ray/session_*/logs/runtime_env_agent*"))      # the log that held it before
    assert _files_holding(ray_tmp, token.encode()) == []
    assert token not in log.read_text(errors="replace")
    assert list(work.iterdir()) == []                                     # no mlflow.db, no download directory
    assert [p.name for p in tmp.iterdir() if p.name.startswith("latentrag-serve-")] == []
