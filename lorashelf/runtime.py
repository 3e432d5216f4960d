"""Device, dtype and thread choices, resolved once at the entry point.

Library code never guesses the device: it receives a ``torch.device`` and a dtype.
``resolve_device("auto")`` prefers CUDA, then Apple MPS, then the CPU; the default
dtype is bf16 where the device computes it fast (CUDA with bf16 support, and CPUs,
where AMX/AVX512-BF16 make bf16 ~3x faster than fp32), fp16 on other GPUs.
"""

from __future__ import annotations

import argparse

import torch

from lorashelf.errors import LorashelfError

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LorashelfError(
            f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LorashelfError("--device cuda asked for but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LorashelfError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 or --device cpu"
        )
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "mps" and not (mps is not None and mps.is_available()):
        raise LorashelfError(
            "--device mps asked for but Apple MPS is not available; use --device cpu"
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise LorashelfError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise LorashelfError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def setup_runtime(args: argparse.Namespace) -> None:
    """Entry-point side effects: threads and device, stored back on ``args``."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
