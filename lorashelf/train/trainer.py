"""Train one LoRA expert on one task, or jointly on several, and save it as a PEFT dir.

The loop is plain PyTorch around a PEFT-wrapped base model (the private-expert
training of Ostapenko et al. 2024, arXiv 2405.11157): AdamW on the LoRA weights,
loss on the answer tokens only (the gold option of a multiple-choice example, the
first target of a generative one, then EOS), warm-up then linear or cosine decay.
What makes it fast on a CPU without slowing a GPU: the base runs in low precision
and the LoRA weights and optimizer state stay fp32. A base loaded in bf16/fp16 (the
default of ``load_base``) runs as is, the LoRA branch in fp32; an fp32 base runs
under ``torch.autocast`` in bf16 where the device has it (fp16 on older GPUs). On
this CPU (SmolLM2-135M, batch 8, one thread) bf16 weights took 7.5 ms/token without
autocast and 8.1 with it (within noise), fp32 weights 9.7 with autocast (weights are
re-cast every step) and 12.6 without. Batches are padded only to their longest
member and bucketed by prompt length (so a batch does not hold one answer,
:mod:`lorashelf.train.batches`), and the output head runs only at positions that
predict answer tokens (:mod:`lorashelf.train.loss`). On the CPU, attention runs in
its plain ("eager") form while training: PyTorch's CPU flash-attention backward
made a SmolLM2 step ~30% slower at 40 and at 200 tokens; other devices keep the
model's own choice, and the validation loss is always scored in it, as evaluation
scores the expert. Otherwise a step is the step of PEFT + ``transformers.Trainer``
with its defaults (the mean NLL over the batch's target tokens, AdamW, clipping at
1.0, linear decay; tests/train/test_like_trainer.py checks it). A fixed
``seed`` gives identical losses and weights on two runs on the same machine.

The adapter is written to a temporary sibling and renamed into place, so an
interrupted run never leaves a directory that looks like a finished expert.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorashelf.config import write_json_atomic
from lorashelf.data.task import Example, Task
from lorashelf.errors import LorashelfError
from lorashelf.models import BaseModel
from lorashelf.runtime import resolve_dtype
from lorashelf.train.batches import Encoded, batch_order, bucket_lengths, collate, encode_examples
from lorashelf.train.config import TrainConfig
from lorashelf.train.lora import attached
from lorashelf.train.loss import target_nll

TRAINING_FILE = "training.json"
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainResult:
    """What one run produced; ``card()`` gives the fields an expert's card records.

    ``train_loss`` is the mean of the last 10 steps' losses (each the mean NLL per
    target token of its batch); ``valid_loss`` the mean NLL per target token of the
    validation examples, counted the same way.
    """

    adapter_dir: Path
    tasks: list[str]
    config: TrainConfig
    steps: int
    train_loss: float
    valid_loss: float | None
    loss_curve: list[float]
    seconds: float
    tokens: int
    n_train: int
    n_valid: int
    data_fingerprint: str
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step
    step_tokens: list[int] = field(default_factory=list)  # real (non-pad) tokens of each
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def card(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "training": self.config.to_card(),
            "data_fingerprint": self.data_fingerprint,
            "train_loss": self.train_loss,
            "valid_loss": self.valid_loss,
            "init_seed": self.config.init_seed,
            "source": "train",
            "extra": {
                "loss_curve": self.loss_curve,
                "n_train": self.n_train,
                "n_valid": self.n_valid,
                "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.tokens_per_second, 1),
                **self.meta,
            },
        }


def data_fingerprint(tasks: Sequence[Task], config: TrainConfig) -> str:
    """Identifies the exact examples and split: the tasks' fingerprints + split choice."""
    h = hashlib.sha256()
    for t in sorted(tasks, key=lambda t: t.id):
        h.update(f"{t.id}:{t.fingerprint()};".encode())
    h.update(f"split_seed={config.split_seed};train_on={config.train_on}".encode())
    return h.hexdigest()[:16]


def training_examples(tasks: Sequence[Task], config: TrainConfig) -> tuple[list[Example], ...]:
    """(train, valid) examples: the union over ``tasks`` of the chosen splits."""
    if not tasks:
        raise LorashelfError("no tasks to train on; pass at least one task id")
    train, valid = [], []
    for t in tasks:
        s = t.splits(seed=config.split_seed)
        train += s.get(config.train_on)
        valid += s.valid[: config.max_valid]
    if not train:
        ids = ", ".join(t.id for t in tasks)
        raise LorashelfError(
            f"{ids}: no examples in split {config.train_on!r}; "
            "use a larger task or train_on='all' (--max-examples caps it too)"
        )
    return train, valid


def compute_dtype(
    config: TrainConfig, device: torch.device, weights: torch.dtype | None = None
) -> torch.dtype:
    """The dtype the forward pass autocasts to; float32 means no autocast.

    "auto" autocasts an fp32 base to the device's fast dtype and leaves a base that
    is already bf16/fp16 alone (its matmuls are low precision, the LoRA branch fp32).
    """
    if config.dtype != "auto":
        return DTYPE_NAMES[config.dtype]
    if weights in (torch.bfloat16, torch.float16):
        return torch.float32
    return resolve_dtype(None, device)


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup * total`` steps, then constant/linear/cosine decay."""
    warm = int(config.warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


@contextlib.contextmanager
def training_attention(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eager attention on the CPU for the block (faster backward); restored after."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if device.type != "cpu" or before in (None, "eager") or not callable(setter):
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(before)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (dropout) inside the block and restore the caller's RNG state after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def mean_target_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    batch_size: int | None = None,
) -> float:
    """Mean per-token NLL of the examples' targets (+ EOS), as the training loss counts it."""
    if not examples:
        raise ValueError("no examples to score")
    device = next(model.parameters()).device
    encoded = encode_examples(tokenizer, examples, config.max_length, config.chat)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    bs = batch_size or 2 * config.batch_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(order), bs):
            batch = collate([encoded[i] for i in order[start : start + bs]], pad_id, device)
            with autocast(device, compute_dtype(config, device, weights_dtype(model))):
                total += float(target_nll(model, batch))
            count += len(batch.labels)
    finally:
        model.train(was_training)
    return total / count


def training_batches(encoded: Sequence[Encoded], config: TrainConfig) -> Iterator[list[int]]:
    """The order :func:`optimize` trains on: endless batches of indices into ``encoded``,
    bucketed by prompt length, fixed by ``config.seed``."""
    return batch_order(bucket_lengths(encoded), config.batch_size, config.seed, config.bucket)


def _loop(peft_model, tokenizer, train, config, steps, device, progress, desc):
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return optimize(
        peft_model, tokenizer, params, train, config, steps,
        weights=weights_dtype(peft_model), progress=progress, desc=desc,
    )  # fmt: skip


def optimize(
    model: torch.nn.Module,
    tokenizer: Any,
    params: list[torch.Tensor],
    examples: Sequence[Example],
    config: TrainConfig,
    steps: int,
    *,
    weights: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "train",
) -> tuple[list[float], list[int], list[float]]:
    """``steps`` AdamW steps on ``params`` minimising the target NLL of ``examples``.

    The one training loop of lorashelf (LoRA experts here, PHATGOOSE gates in
    lorashelf.route.gates): length-bucketed batches, autocast to the compute dtype
    (``weights``: the model's weight dtype, which "auto" respects), a grad scaler for
    fp16, clipping, warm-up + schedule. Returns the loss per step, the target tokens
    per step and the seconds per step; a non-finite loss stops with advice.
    """
    device = params[0].device
    encoded = encode_examples(tokenizer, examples, config.max_length, config.chat)
    order = training_batches(encoded, config)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, config))
    dtype = compute_dtype(config, device, weights)
    scaler = torch.amp.GradScaler(device.type, enabled=torch.float16 in (dtype, weights))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    curve, tokens, times = [], [], []
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = collate([encoded[i] for i in next(order)], pad_id, device)
        with autocast(device, dtype):
            loss = target_nll(model, batch) / len(batch.labels)
        if not torch.isfinite(loss):
            raise LorashelfError(
                f"training diverged: loss is {loss.item()} at step {len(curve) + 1}; "
                f"lower the learning rate (now {config.lr:g}) or use dtype fp32"
            )
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        curve.append(round(loss.detach().item(), 5))
        tokens.append(batch.n_tokens)
        times.append(time.perf_counter() - t0)
        bar.update()
        bar.set_postfix(loss=f"{sum(curve[-10:]) / len(curve[-10:]):.4f}")
    bar.close()
    return curve, tokens, times


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LorashelfError(f"{out_dir} exists and is not empty; pass a new output directory")


def save_adapter(peft_model: torch.nn.Module, out_dir: Path, training: dict[str, Any]) -> None:
    """Write the PEFT dir (+ training.json) to a temporary sibling, then rename it."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        # save_embedding_layers=False: embeddings are never trained, and "auto" would look
        # the base id up on the Hub to compare vocabulary sizes
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        write_json_atomic(tmp / TRAINING_FILE, training)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def train_expert(
    base: BaseModel,
    tasks: list[Task],
    config: TrainConfig,
    *,
    out_dir: Path,
    progress: bool = True,
    valid: list[Example] | None = None,
) -> TrainResult:
    """Train one LoRA on the union of ``tasks``' ``config.train_on`` splits; save at ``out_dir``.

    ``valid`` defaults to the union of the tasks' valid splits (no valid loss if empty).
    ``base.model`` is used in place and restored afterwards, ready for the next expert.
    """
    check_out_dir(Path(out_dir))  # before, not after, the training
    train, default_valid = training_examples(tasks, config)
    valid = default_valid if valid is None else list(valid)
    steps = config.total_steps(len(train))
    device = next(base.model.parameters()).device
    names = [t.id for t in tasks]
    desc = names[0] if len(names) == 1 else f"{len(names)} tasks"
    start = time.perf_counter()
    with attached(base.model, config, base.base_id) as pm:
        with training_attention(base.model, device), seeded(config.seed, device):
            curve, tokens, times = _loop(
                pm, base.tokenizer, train, config, steps, device, progress, desc
            )
        seconds = time.perf_counter() - start
        # in the model's own attention, as lorashelf.evaluate scores the expert
        valid_loss = mean_target_nll(pm, base.tokenizer, valid, config) if valid else None
        tail = curve[-10:]
        result = TrainResult(
            adapter_dir=Path(out_dir),
            tasks=names,
            config=config,
            steps=steps,
            train_loss=sum(tail) / len(tail),
            valid_loss=valid_loss,
            loss_curve=curve,
            seconds=seconds,
            tokens=sum(tokens),
            n_train=len(train),
            n_valid=len(valid),
            data_fingerprint=data_fingerprint(tasks, config),
            step_seconds=times,
            step_tokens=tokens,
        )
        save_adapter(pm, Path(out_dir), result.card())
    return result
