"""Training tokens/s of lorashelf's LoRA trainer against plain PEFT + ``transformers.Trainer``.

Like for like: both train the same rank-4 LoRA (q,k,v,o projections, alpha 8) on the
same base (loaded once, bf16 weights, LoRA weights and optimizer state fp32, no
autocast: the base is already bf16) from the same initial LoRA ``A``
(lorashelf.train.lora.init_lora_a), on the same batches in the same order
(lorashelf's length-bucketed order, handed to the Trainer as its batch sampler), with
the same loss (mean NLL over the batch's target tokens: prompt labels -100), AdamW
settings, schedule (lorashelf's warm-up + linear decay, given to the Trainer as its
scheduler), gradient clipping and steps. So the two differ only in how a step is
computed: the baseline is what a PEFT user writes (``DataCollatorForSeq2Seq``
padding, ``Trainer`` computing the loss from full logits); lorashelf runs the LM head
only at answer positions. Tokens/s counts real (non-pad) tokens over the timed steps
(the first ``--skip`` steps of each are warm-up). Both final train losses (mean of the
last 10 steps) and validation losses (mean per-token NLL on the task's valid split,
computed the same way for both adapters) are printed, so speed is not bought with
quality; the target is >= 1.5x tokens/s with valid loss within 2%.

    .venv/bin/python bench/train_throughput.py [--task bigbench:sports_understanding]
        [--steps 30] [--batch-size 8] [--threads N] [--device D] [--model M] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import add_model_args, load_bench_task, load_model, resolve_device, write_json

from lorashelf.train import TrainConfig, mean_target_nll, train_expert
from lorashelf.train.batches import batch_order, encode_examples
from lorashelf.train.lora import init_lora_a, lora_config
from lorashelf.train.trainer import lr_factor

VALID_TOLERANCE = 0.02


def run_lorashelf(base, task, cfg, out_dir):
    res = train_expert(base, [task], cfg, out_dir=out_dir, progress=False)
    return res.step_seconds, res.loss_curve, res.valid_loss, res.step_tokens


def run_trainer(base, task, cfg, out_dir, device):
    """Plain PEFT + transformers.Trainer on lorashelf's batches; returns per-step
    seconds, losses, valid loss, tokens."""
    from datasets import Dataset
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok = base.tokenizer
    train = task.splits(seed=cfg.split_seed).train
    encoded = encode_examples(tok, train, cfg.max_length, cfg.chat)
    rows = []
    for e in encoded:
        ids = list(e.ids)
        labels = [-100] * (len(ids) - e.n_target) + ids[-e.n_target :]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    # the order lorashelf.train.trainer.optimize uses
    order = batch_order([len(e.ids) for e in encoded], cfg.batch_size, cfg.seed, cfg.bucket)
    batches = list(itertools.islice(order, cfg.steps))  # the batches lorashelf trains on
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    tokens_per_step: list[int] = []

    def counting(features):
        batch = collate(features)
        tokens_per_step.append(int(batch["attention_mask"].sum()))
        return batch

    class SameBatches(Trainer):
        def get_train_dataloader(self):
            loader = DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=counting)
            return self.accelerator.prepare(loader)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    model = get_peft_model(base.model, lora_config(cfg))
    for p in model.parameters():  # fp32 LoRA weights, as lorashelf keeps them
        if p.requires_grad:
            p.data = p.data.float()
    init_lora_a(model, cfg.init_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg))
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        max_grad_norm=cfg.max_grad_norm,
        bf16=False,  # the base is bf16 already; LoRA in fp32 as lorashelf's
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    clock = Clock()
    trainer = SameBatches(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=counting,
        callbacks=[clock],
        optimizers=(opt, sched),
    )
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    try:
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        valid = mean_target_nll(model, tok, task.splits(seed=cfg.split_seed).valid, cfg)
    finally:
        model.unload()
    return clock.times, losses, valid, tokens_per_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip", type=int, default=3, help="untimed warm-up steps of each run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    add_model_args(ap)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    base = load_model(args.model, device, torch.bfloat16)
    task = load_bench_task(args.task)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup=0.1, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ours_t, ours_l, ours_v, ours_tok = run_lorashelf(base, task, cfg, tmp / "ours")
    hf_t, hf_l, hf_v, hf_tok = run_trainer(base, task, cfg, tmp / "hf", device)

    # the same batches: real (non-pad) tokens per second over the timed steps
    s = args.skip
    ours_tps = sum(ours_tok[s:]) / sum(ours_t[s:])
    hf_tps = sum(hf_tok[s : len(hf_t)]) / sum(hf_t[s:])
    ratio = ours_tps / hf_tps
    tail = min(10, args.steps)
    rows = {
        "lorashelf": (ours_tps, statistics.median(ours_t[s:]), ours_l, ours_v),
        "PEFT + transformers.Trainer": (hf_tps, statistics.median(hf_t[s:]), hf_l, hf_v),
    }
    n_train = len(task.splits(seed=0).train)
    where = "cuda" if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"task {task.id} ({n_train} train examples), {args.model} bf16 on {where}, "
        f"LoRA r={cfg.rank} on {','.join(cfg.target_modules)}, batch {cfg.batch_size}, "
        f"{args.steps} steps ({s} warm-up untimed), same batches, init, loss and schedule"
    )
    print(
        f"{'trainer':30s} {'tokens/s':>9s} {'s/step':>7s} {'train loss':>11s} {'valid loss':>11s}"
    )
    for name, (tps, step, losses, valid) in rows.items():
        train_loss = sum(losses[-tail:]) / tail
        print(f"{name:30s} {tps:9.1f} {step:7.3f} {train_loss:11.4f} {valid:11.4f}")
    rel = abs(ours_v - hf_v) / hf_v
    print(
        f"RESULT train_throughput: {ratio:.2f}x tokens/s vs PEFT + transformers.Trainer "
        f"(target >= 1.5x) on the same batches; valid loss {ours_v:.4f} vs {hf_v:.4f} "
        f"({rel:.1%} apart, target within {VALID_TOLERANCE:.0%})"
    )
    write_json(
        args.json,
        {
            "task": task.id,
            "model": args.model,
            "device": str(device),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "ratio": ratio,
            "tokens_per_s": {"lorashelf": ours_tps, "trainer": hf_tps},
            "median_step_s": {
                "lorashelf": rows["lorashelf"][1],
                "trainer": rows["PEFT + transformers.Trainer"][1],
            },
            "train_loss": {
                "lorashelf": sum(ours_l[-tail:]) / tail,
                "trainer": sum(hf_l[-tail:]) / tail,
            },
            "valid_loss": {"lorashelf": ours_v, "trainer": hf_v},
        },
    )


if __name__ == "__main__":
    main()
