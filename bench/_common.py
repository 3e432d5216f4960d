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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
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
