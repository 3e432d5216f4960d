"""The exported GGUF LoRA in llama.cpp itself (slow: the real SmolLM2, llama-cpp-python).

A seeded random rank-8 adapter on every attention and MLP projection of the real model
is exported as a GGUF LoRA and loaded next to the base GGUF in llama.cpp; its per-token
log-prob shifts (adapter minus base) are compared with lorashelf's float32 forward of
the dequantised model, on two bases:

- exact: the embedded GGUF rewritten with every tensor dequantised to float32 (the very
  weights lorashelf runs). The runtimes then disagree on the base by under 0.01 nats
  (float summation order), so the shifts must agree to correlation >= 0.999 and
  0.05 nats at most. A wrong name, orientation, alpha or q/k permutation cannot pass:
  the control that drops the q/k permutation must fail these bounds.
- as shipped: the Q4_1 GGUF users run. llama.cpp also quantises activations to 8 bits
  in each quantised matmul, and any change to a layer's input re-rolls that rounding,
  so llama.cpp's shifts carry noise of the size of the runtimes' base disagreement
  (about 0.1 nats mean, 0.7 max, measured). There the test asks for correlation >= 0.8
  and a mean difference under 0.25 nats, with shifts of more than 1 nat.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install llama-cpp-python)")

pytestmark = pytest.mark.slow

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["The capital of France is", "Q: What is 27 plus 59?\nA:", "def fibonacci(n):"]
HELD_OUT = "Q: What is 46 plus 38?\nA:"


def exact(a) -> bool:
    return a.correlation >= 0.999 and a.max_abs_diff <= 0.05


@pytest.fixture(scope="module")
def real(real_home):
    from lorashelf.models import load_base

    return load_base("smollm2-135m", home=real_home, dtype=torch.float32)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from lorashelf.export.verify import dequantised_gguf
    from lorashelf.models.known import KNOWN
    from lorashelf.models.load import _locate_gguf

    q4 = str(_locate_gguf(KNOWN["smollm2-135m"]))
    return {"q4_1": q4, "f32": dequantised_gguf(q4, tmp_path_factory.mktemp("f32") / "f32.gguf")}


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


def run_check(real, lib, out, base_gguf):
    from lorashelf.export import export_adapter
    from lorashelf.export.verify import verify_gguf

    done = export_adapter(lib, "expert:random", "gguf", out, overwrite=True)
    return verify_gguf(base_gguf, str(done.path), real.model, real.tokenizer,
                       done.resolved.factors, PROMPTS, HELD_OUT)  # fmt: skip


def test_llama_cpp_shifts_match_lorashelf_exactly_on_the_f32_base(real, exported, bases):
    lib, root = exported
    a = run_check(real, lib, root / "random.gguf", bases["f32"])
    print(a.to_dict())
    assert a.max_abs_shift > 1.0  # the adapter matters, so agreement means something
    assert exact(a), a.to_dict()


def test_llama_cpp_shifts_track_lorashelf_on_the_q4_1_base(real, exported, bases):
    lib, root = exported
    a = run_check(real, lib, root / "random.gguf", bases["q4_1"])
    print(a.to_dict())
    assert a.max_abs_shift > 1.0
    assert a.correlation >= 0.8 and a.mean_abs_diff <= 0.25, a.to_dict()


def test_without_the_qk_permutation_the_shifts_disagree(real, exported, bases, monkeypatch):
    import lorashelf.export.gguf as gguf_mod

    lib, root = exported
    monkeypatch.setattr(gguf_mod, "rope_permute", lambda rows, n_head: rows)
    a = run_check(real, lib, root / "unpermuted.gguf", bases["f32"])
    print(a.to_dict())
    assert not exact(a), a.to_dict()
