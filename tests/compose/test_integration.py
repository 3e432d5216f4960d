"""Integration: LoraHub on the real SmolLM2 and a real BIG-bench task, through the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorashelf.cli import main
from lorashelf.library import Library

pytestmark = pytest.mark.slow
TASK = "bigbench:logical_deduction/three_objects"


def test_compose_real_model(real_home, ensure_bigbench, tmp_path, capsys):
    from lorashelf.models import load_base

    ensure_bigbench(["logical_deduction"])
    base = load_base("smollm2-135m", home=real_home, dtype=torch.float32)
    lib = Library.open(tmp_path / "lib", create=True, base_model="smollm2-135m")
    for i in range(3):  # random rank-4 attention experts, scaled like trained ones
        torch.manual_seed(i)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False)  # fmt: skip
        peft_model = get_peft_model(copy.deepcopy(base.model), cfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01)
        peft_model.peft_config["default"].base_model_name_or_path = base.base_id
        peft_model.save_pretrained(str(tmp_path / f"e{i}"))
        lib.add(tmp_path / f"e{i}", name=f"e{i}", card={"tasks": [f"toy:{i}"]})
    out = tmp_path / "result.json"
    argv = ["--home", str(real_home), "compose", str(lib.path), "--tasks", TASK, "--budget", "6",
            "--popsize", "6", "--name", "hub", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "added hub" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["trace"]) == 6 and result["passes"] == 1
    assert 0.0 < result["ce"] < 5.0  # reference loss: per-token CE / 5 shots
    card = Library.open(lib.path).get("hub").card
    assert card["source"] == "compose" and set(card["extra"]["weights"]) == {"e0", "e1", "e2"}
