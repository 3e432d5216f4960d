"""bench/gpu.sh in its CPU smoke setting: every speed benchmark runs on the tiny random
model with no download and no data cache, prints its RESULT line, and the script
writes the BENCHMARKS.md section. Keeps the GPU script from rotting on machines
without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHES = (
    "arrow_forward",
    "arrow_prototypes",
    "lorahub_speed",
    "eval_throughput",
    "train_throughput",
    "merge_speed",
)


def test_gpu_script_smoke_runs_every_benchmark(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "LORASHELF_HOME": str(tmp_path / "home"),  # nothing cached: no model, no data
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted({line.split(":")[0].removeprefix("RESULT ") for line in results}) == sorted(
        BENCHES
    )
    section = (tmp_path / "gpu_results.md").read_text()
    assert section.startswith("## GPU: ")
    for name in BENCHES:
        assert f"| `{name}` | random:tiny |" in section
        assert f"### {name}, random:tiny" in section
    assert "FAILED" not in section and "cut off" not in section
