"""Constants and helpers shared by the serving tests (a plain module: conftest.py is not importable by name)."""
import glob
import os


TOKEN = "test-admin-token"
BODY_LIMIT = 200_000          # the served app's max_body_bytes (default 1 MiB): small enough to test cheaply


def serve_log_lines(needle: str, after: int = 0) -> list[str]:
    """Lines holding `needle` in the Serve log files (logs/serve/*.log) of the local Ray sessions, each with the
    `after` lines that follow it (a logged traceback)."""
    roots = {os.environ.get("RAY_TMPDIR") or "/tmp", "/tmp"}
    out = []
    for root in roots:
        for path in glob.glob(os.path.join(root, "ray", "session_*", "logs", "serve", "*.log")):
            try:
                with open(path, errors="replace") as f:
                    lines = f.readlines()
                out += ["".join(lines[i:i + 1 + after]) for i, line in enumerate(lines) if needle in line]
            except OSError:
                pass
    return out
