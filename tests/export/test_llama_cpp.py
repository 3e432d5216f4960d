"""The exported GGUF LoRA in llama.cpp itself (slow: the real SmolLM2, llama-cpp-python).

A seeded random rank-8 adapter on every attention and MLP projection of the real model
is exported as a GGUF LoRA and loaded next to the embedded Q4_1 GGUF in llama.cpp. Its
per-token log-prob shifts must match lorashelf's float32 forward of the dequantised
model: correlation >= 0.98 and no shift off by more than 0.25 nats plus 10% of the
largest shift. Why that tolerance: both runtimes read the same Q4_1 weights, but
llama.cpp also quantises activations to 8 bits inside each quantised matmul (and keeps
its KV cache in fp16), which moves every log-prob by up to a few hundredths of a nat
and the shifts of the less likely tokens by more; a wrong name, orientation, alpha or
q/k permutation gives shifts that are uncorrelated or of the wrong size (the control
below drops the q/k permutation and must fail the same bounds).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install llama-cpp-python)")

pytestmark = pytest.mark.slow

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["The capital of France is", "Q: What is 27 plus 59?\nA:", "def fibonacci(n):"]
HELD_OUT = "Q: What is 46 plus 38?\nA:"


def within_tolerance(a) -> bool:
    return a.correlation >= 0.98 and a.max_abs_diff <= 0.25 + 0.1 * a.max_abs_shift


@pytest.fixture(scope="module")
def real(real_home):
    from lorashelf.models import load_base

    return load_base("smollm2-135m", home=real_home, dtype=torch.float32)


@pytest.fixture(scope="module")
def exported(real, tmp_path_factory):
    from lorashelf.library import Library
    from lorashelf.lora import LoraFactors, write_peft_adapter

    root = tmp_path_factory.mktemp("llama_cpp")
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, module in real.model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            d_out, d_in = module.weight.shape
            A = torch.randn(8, d_in, generator=g) / d_in**0.5
            B = torch.randn(d_out, 8, generator=g) * 0.02
            factors[name] = LoraFactors(A=A, B=B, scale=2.0)
    write_peft_adapter(factors, root / "adapter", real.base_id)
    lib = Library.open(root / "lib", create=True, base_model=real.base_id)
    lib.add(root / "adapter", "random")
    return lib, root


def run_check(real, lib, out):
    from lorashelf.export import export_adapter
    from lorashelf.export.verify import verify_gguf
    from lorashelf.models.known import KNOWN
    from lorashelf.models.load import _locate_gguf

    done = export_adapter(lib, "expert:random", "gguf", out)
    gguf = str(_locate_gguf(KNOWN["smollm2-135m"]))
    return verify_gguf(gguf, str(done.path), real.model, real.tokenizer,
                       done.resolved.factors, PROMPTS, HELD_OUT)  # fmt: skip


def test_llama_cpp_shifts_match_lorashelf(real, exported):
    lib, root = exported
    a = run_check(real, lib, root / "random.gguf")
    print(a.to_dict())
    assert a.max_abs_shift > 1.0  # the adapter matters, so agreement means something
    assert within_tolerance(a), a.to_dict()


def test_without_the_qk_permutation_the_shifts_disagree(real, exported, monkeypatch):
    import lorashelf.export.gguf as gguf_mod

    lib, root = exported
    monkeypatch.setattr(gguf_mod, "rope_permute", lambda rows, n_head: rows)
    a = run_check(real, lib, root / "unpermuted.gguf")
    print(a.to_dict())
    assert not within_tolerance(a), a.to_dict()
