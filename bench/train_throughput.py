"""Training tokens/s of lorashelf's LoRA trainer against plain PEFT + ``transformers.Trainer``.

Both train the same rank-4 LoRA (q,k,v,o projections, alpha 8) on the same real
SmolLM2-135M base (loaded once, bf16 weights) and the same BIG-bench task split,
with the same steps, batch size, learning rate, warm-up + linear decay, gradient
clipping, seed and bf16 autocast. The baseline is what a PEFT user writes: tokenized
prompt + answer + EOS with prompt labels masked (-100), ``DataCollatorForSeq2Seq``
padding to the longest in the batch, ``Trainer(bf16=True)`` computing the loss from
full logits. lorashelf adds length bucketing and runs the LM head only at answer
positions. Tokens/s counts real (non-pad) tokens over the timed steps (the first
``--skip`` steps of each are warm-up and not timed). Both final train losses and both
validation losses (mean per-token NLL on the task's valid split, computed the same
way for both adapters) are printed, so speed is not bought with quality.

    .venv/bin/python bench/train_throughput.py [--task bigbench:sports_understanding]
        [--steps 30] [--batch-size 8] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from _common import home, write_json

from lorashelf.data import load_task
from lorashelf.models import load_base
from lorashelf.train import TrainConfig, mean_target_nll, train_expert
from lorashelf.train.batches import encode_examples
from lorashelf.train.lora import lora_config


def run_lorashelf(base, task, cfg, out_dir):
    res = train_expert(base, [task], cfg, out_dir=out_dir, progress=False)
    return res.step_seconds, res.loss_curve, res.valid_loss, res.step_tokens


def run_trainer(base, task, cfg, out_dir):
    """Plain PEFT + transformers.Trainer; returns per-step seconds, losses, valid, tokens."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok = base.tokenizer
    train = task.splits(seed=cfg.split_seed).train
    rows = []
    for e in encode_examples(tok, train, cfg.max_length, cfg.chat):
        ids = list(e.ids)
        labels = [-100] * (len(ids) - e.n_target) + ids[-e.n_target :]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    tokens_per_step: list[int] = []

    def counting(features):
        batch = collate(features)
        tokens_per_step.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    torch.manual_seed(cfg.init_seed)
    model = get_peft_model(base.model, lora_config(cfg))
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=int(cfg.warmup * cfg.steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        bf16=True,
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    clock = Clock()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=counting,
        callbacks=[clock],
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
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    import tempfile
    from pathlib import Path

    base = load_base("smollm2-135m", home=home(), dtype=torch.bfloat16)
    task = load_task(args.task, home=home())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup=0.1, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ours_t, ours_l, ours_v, ours_tok = run_lorashelf(base, task, cfg, tmp / "ours")
    hf_t, hf_l, hf_v, hf_tok = run_trainer(base, task, cfg, tmp / "hf")

    # lorashelf buckets by length, so its batches differ from the Trainer's: compare
    # real tokens per second over the timed steps
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
    print(
        f"task {task.id} (real BIG-bench, {n_train} train examples), SmolLM2-135M bf16, "
        f"LoRA r={cfg.rank} on {','.join(cfg.target_modules)}, batch {cfg.batch_size}, "
        f"{args.steps} steps ({s} warm-up untimed), {torch.get_num_threads()} threads"
    )
    print(
        f"{'trainer':30s} {'tokens/s':>9s} {'s/step':>7s} {'train loss':>11s} {'valid loss':>11s}"
    )
    for name, (tps, step, losses, valid) in rows.items():
        train_loss = sum(losses[-tail:]) / tail
        print(f"{name:30s} {tps:9.1f} {step:7.3f} {train_loss:11.4f} {valid:11.4f}")
    print(
        f"RESULT train_throughput: {ratio:.2f}x tokens/s vs PEFT + transformers.Trainer "
        f"(valid loss {ours_v:.4f} vs {hf_v:.4f})"
    )
    write_json(
        args.json,
        {
            "task": task.id,
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
