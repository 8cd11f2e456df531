"""benchmarks/soak.py in a tiny configuration: the real server as a subprocess, honest streams
(some dropped by the client) beside hostile requests; no 5xx, every honest stream ends as it should,
the KV blocks all come back and nothing is generated after a disconnect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import chatserve

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def test_soak_tiny():
    src = str(Path(chatserve.__file__).resolve().parent.parent)  # this checkout's package, in the server too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SOAK), "--streams", "3", "--requests", "36", "--hostile", "0.4",
                          "--max-tokens", "12", "--duration", "120"], capture_output=True, text=True, env=env,
                         timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert lines, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(lines[-1][len("SUMMARY "):])
    assert summary["requests"] == 36
    assert any(kind.startswith("hostile") for kind in summary["by_kind"]), summary
    assert summary["server_errors"] == 0 and summary["abnormal_honest_streams"] == 0, summary
    assert summary["kv_blocks_used_after"] == 0 and summary["tokens_after_disconnect"] == 0, summary
    assert run.returncode == 0, run.stdout[-3000:]
