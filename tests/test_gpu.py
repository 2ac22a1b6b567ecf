"""On a CUDA machine only: scripts/gpu_check.py (ddp, fsdp, bf16-mixed, compile) passes end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_check_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [
        sys.executable,
        str(REPO / "scripts" / "gpu_check.py"),
        "--steps",
        "60",
        "--logs",
        str(tmp_path),
    ]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"ddp", "fsdp", "bf16-mixed", "compile"}
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in results.values())
