"""lorashelf's training loop against plain PEFT + ``transformers.Trainer`` on the tiny model.

Fed the same batches (:func:`training_batches`) from the same LoRA initialisation, in
float32, lorashelf's ``optimize`` and a Trainer that builds its *own* AdamW, linear
schedule and gradient clipping from its defaults must take the same steps: the same
loss at every step (so the two losses are the same quantity, the mean NLL over the
batch's target tokens) and the same LoRA weights at the end. This is what makes
``bench/train_throughput.py`` a comparison of speed alone.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lorashelf.train import TrainConfig
from lorashelf.train.batches import encode_examples
from lorashelf.train.lora import attached, init_lora_a, lora_config
from lorashelf.train.trainer import optimize, training_attention, training_batches

pytest.importorskip("datasets")


def trainer_run(base, examples, cfg: TrainConfig, out_dir):
    """PEFT + Trainer with its defaults (AdamW, linear decay, no warm-up, clip 1.0) on
    lorashelf's batches; returns the logged losses and grad norms and the LoRA weights."""
    from datasets import Dataset
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    tok = base.tokenizer
    encoded = encode_examples(tok, examples, cfg.max_length)
    rows = [
        {
            "input_ids": list(e.ids),
            "attention_mask": [1] * len(e.ids),
            "labels": [-100] * (len(e.ids) - e.n_target) + list(e.ids[-e.n_target :]),
        }
        for e in encoded
    ]
    batches = list(itertools.islice(training_batches(encoded, cfg), cfg.steps))
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    class SameBatches(Trainer):
        def get_train_dataloader(self):
            loader = DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=collate)
            return self.accelerator.prepare(loader)

    model = get_peft_model(base.model, lora_config(cfg))
    init_lora_a(model, cfg.init_seed)
    args = TrainingArguments(
        output_dir=str(out_dir),
        learning_rate=cfg.lr,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = SameBatches(
        model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.unload()
    return [h["loss"] for h in logs], [h["grad_norm"] for h in logs], weights


def test_optimize_takes_the_trainers_steps(tiny_base, toy_task, tmp_path):
    # the Trainer's defaults: linear decay, no warm-up, no weight decay, clipping at 1.0
    cfg = TrainConfig(steps=5, batch_size=4, lr=2e-2, max_length=64, dtype="fp32", warmup=0.0)
    examples = toy_task.splits().train
    losses, norms, theirs = trainer_run(tiny_base, examples, cfg, tmp_path)
    device = torch.device("cpu")
    with training_attention(tiny_base.model, device), attached(tiny_base.model, cfg, "t") as pm:
        params = [p for p in pm.parameters() if p.requires_grad]
        curve, _, _ = optimize(pm, tiny_base.tokenizer, params, examples, cfg, cfg.steps)
        ours = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert max(norms) > 2 * cfg.max_grad_norm  # so clipping is part of what is compared
    assert curve == pytest.approx(losses, abs=1e-4)
    assert ours.keys() == theirs.keys()
    for name, w in ours.items():
        torch.testing.assert_close(w, theirs[name], rtol=0, atol=1e-4, msg=name)
