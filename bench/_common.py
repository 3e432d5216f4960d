"""Shared helpers for benchmarks: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def home() -> Path:
    env = os.environ.get("LORASHELF_HOME")
    return Path(env) if env else Path.home() / ".cache" / "lorashelf"


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (
                platform.processor() or platform.machine()
            ):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # bf16 speed, and so most ratios here, depends on these more than on the model name
    units = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))
             if flag in flags]  # fmt: skip
    return {
        "cpu": f"{cpu} ({', '.join(units) or 'no bf16 matrix units'})",
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def write_json(path: str | None, payload: dict) -> None:
    if path:
        payload = {**payload, "machine": machine()}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
