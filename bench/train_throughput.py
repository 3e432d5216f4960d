"""Training tokens/s of lorashelf's LoRA trainer against plain PEFT + ``transformers.Trainer``.

Like for like, and checked so rather than assumed:
- the same base (loaded once, bf16 weights; LoRA weights and optimizer state fp32, no
  autocast since the base is bf16 already), the same rank-4 LoRA (q,k,v,o, alpha 8,
  no dropout) from the same seeded ``A`` and zero ``B`` (``init_lora_a``);
- the same examples in the same order: lorashelf's batches (length-bucketed by prompt
  length, :func:`lorashelf.train.trainer.training_batches`) are the Trainer's batch
  sampler;
- the same loss: the summed NLL of the batch's target tokens over their count (the
  Trainer's ``num_items_in_batch`` loss with prompt labels -100);
- the same optimizer and schedule: one ``torch.optim.AdamW`` (lr 1e-3, betas 0.9/0.999,
  eps 1e-8, no weight decay) and lorashelf's warm-up + linear decay, handed to the
  Trainer; clipping at 1.0 in both (the Trainer's default), the same steps;
- the same measurement: both adapters are saved, loaded back onto the base and scored
  by ONE function (:func:`adapter_loss`, the mean NLL per target token in the model's
  own attention) on the same validation examples and on the first ``--n-train-eval``
  training examples.
The step-1 losses of the two (same weights, same batch) are printed too: they differ
only by how attention is computed in bf16 (lorashelf runs eager attention on the CPU).
So the two differ only in how a step is computed: the baseline is what a PEFT user
writes (``DataCollatorForSeq2Seq`` padding, the loss from full logits); lorashelf runs
the LM head only at answer positions. Tokens/s counts real (non-pad) tokens over the
timed steps (the first ``--skip`` of each are warm-up). The target is >= 1.5x tokens/s
with the valid loss within 2% of the Trainer's.

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
from lorashelf.train.batches import encode_examples
from lorashelf.train.lora import init_lora_a, lora_config
from lorashelf.train.trainer import lr_factor, training_batches

VALID_TOLERANCE = 0.02


def adapter_loss(base, adapter_dir, examples, cfg) -> float:
    """The one measurement of both trainers: the saved adapter loaded onto the base,
    mean NLL per target token of ``examples``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    try:
        return mean_target_nll(model, base.tokenizer, examples, cfg)
    finally:
        model.unload()


def run_lorashelf(base, task, cfg, out_dir):
    """lorashelf's trainer as a user runs it; returns seconds, losses, tokens per step."""
    res = train_expert(base, [task], cfg, out_dir=out_dir, progress=False, valid=[])
    return res.step_seconds, res.loss_curve, res.step_tokens


def run_trainer(base, task, cfg, out_dir, device):
    """Plain PEFT + transformers.Trainer on lorashelf's batches, optimizer and schedule;
    saves the adapter at ``out_dir``, returns seconds, losses, tokens per step."""
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
    batches = list(itertools.islice(training_batches(encoded, cfg), cfg.steps))
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
        output_dir=str(out_dir.parent / "trainer-run"),
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
        model.save_pretrained(str(out_dir))
    finally:
        model.unload()
    return clock.times, losses, tokens_per_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip", type=int, default=3, help="untimed warm-up steps of each run")
    ap.add_argument(
        "--n-train-eval", type=int, default=100, help="training examples the train loss scores"
    )
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
    splits = task.splits(seed=cfg.split_seed)
    scored = {"train": splits.train[: args.n_train_eval], "valid": splits.valid[: cfg.max_valid]}
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    dirs = {"lorashelf": tmp / "lorashelf", "PEFT + transformers.Trainer": tmp / "trainer"}
    runs = {
        "lorashelf": run_lorashelf(base, task, cfg, dirs["lorashelf"]),
        "PEFT + transformers.Trainer": run_trainer(
            base, task, cfg, dirs["PEFT + transformers.Trainer"], device
        ),
    }
    s = args.skip
    rows = {}
    for name, (times, losses, tokens) in runs.items():
        rows[name] = {
            "tokens_per_s": sum(tokens[s : len(times)]) / sum(times[s:]),
            "median_step_s": statistics.median(times[s:]),
            "step1_loss": losses[0],
            "last10_loss": statistics.fmean(losses[-10:]),
            **{f"{k}_loss": adapter_loss(base, dirs[name], v, cfg) for k, v in scored.items()},
        }
    ours, hf = rows["lorashelf"], rows["PEFT + transformers.Trainer"]
    ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    where = "cuda" if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"task {task.id} ({len(splits.train)} train examples), {args.model} bf16 on {where}, "
        f"LoRA r={cfg.rank} on {','.join(cfg.target_modules)}, batch {cfg.batch_size}, "
        f"{args.steps} steps ({s} warm-up untimed), same batches, init, loss, optimizer, "
        f"schedule and clipping; train/valid loss: both adapters scored by one function on "
        f"{len(scored['train'])} train / {len(scored['valid'])} valid examples"
    )
    head = ("tokens/s", "s/step", "step-1 loss", "last-10 loss", "train loss", "valid loss")
    print(f"{'trainer':30s}" + "".join(f" {h:>12s}" for h in head))
    for name, r in rows.items():
        vals = [r["tokens_per_s"], r["median_step_s"], r["step1_loss"], r["last10_loss"]]
        vals += [r["train_loss"], r["valid_loss"]]
        print(f"{name:30s}" + "".join(f" {v:12.4f}" for v in vals))
    rel = abs(ours["valid_loss"] - hf["valid_loss"]) / hf["valid_loss"]
    print(
        f"RESULT train_throughput: {ratio:.2f}x tokens/s vs PEFT + transformers.Trainer "
        f"(target >= 1.5x) on the same batches; valid loss {ours['valid_loss']:.4f} vs "
        f"{hf['valid_loss']:.4f} ({rel:.1%} apart, target within {VALID_TOLERANCE:.0%}); "
        f"train loss {ours['train_loss']:.4f} vs {hf['train_loss']:.4f}"
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
            "valid_rel_diff": rel,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
