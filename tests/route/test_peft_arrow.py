"""Our Arrow against PEFT's (peft.tuners.lora.arrow.create_arrow_model) on the same adapters.

How PEFT is configured here: ``ArrowConfig(top_k, router_temperature, use_gks=False,
rng_seed=0)``; ``create_arrow_model`` loads the task adapters as ``task_0..task_{E-1}``
and routes each token of each adapted layer by ``|x . prototype_e|`` with ``x`` the
layer input, top-k, softmax of the kept scores over the temperature, weights times
``scaling_e * B_e A_e x``: the rule we implement. Differences we found:

* prototypes: PEFT runs 15 steps of power iteration on ``A^T B^T B A`` from a random
  start (seeded by ``rng_seed``, else unseeded); the error of the result shrinks like
  ``(s2/s1)^30`` and is large when the top two singular values are close. Ours is
  exact. To compare the routing rules and not the approximation, the adapters here
  have a spectral gap ``s2/s1 = 0.1``, so PEFT's prototypes are exact to ~1e-30 and
  both models must agree to float32 rounding: we assert logits within 1e-4 (we see
  ~2e-7; a 5% change of temperature alone moves them by ~7e-3). On adapters without
  a gap PEFT's prototypes reach only |cos| ~0.89 to the exact ones on some modules
  and its logits differ from ours by ~0.08.
* GenKnowSub (``use_gks=True``) subtracts the mean of "general" adapters from every
  task adapter's A and B separately, which changes ``delta W`` to
  ``(B - mean B)(A - mean A)``, not ``B A - mean(B A)``; we have no such step, so it is
  disabled for the comparison.
* PEFT requires one rank and one set of target modules for all experts and fails for
  top_k > E; ours pads mixed ranks, lets partial experts route where they exist and
  clamps top_k with a warning. PEFT applies the router adapter's dropout to the mixed
  output (identity in eval) and casts the prototypes to the adapters' dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import ArrowConfig as PeftArrowConfig
from peft import create_arrow_model

from lorashelf.route import ArrowConfig, build_routed_model

E = 4


@pytest.fixture
def adapters(kit, model, shapes, tmp_path):
    """E gapped rank-4 adapters written as PEFT directories, with their factors."""
    out = []
    for i in range(E):
        factors = kit.random_factors(shapes, seed=100 + i, gap=True, size=0.8)
        path = kit.write_adapter(model, tmp_path / f"task{i}", factors, lora_alpha=8)
        out.append((f"task{i}", path))
    return out


@pytest.mark.parametrize(("top_k", "temperature"), [(2, 1.0), (E, 1.0), (1, 1.0), (3, 0.3)])
def test_same_logits_as_peft_arrow(kit, model, adapters, ids, top_k, temperature) -> None:
    peft_cfg = PeftArrowConfig(
        top_k=top_k, router_temperature=temperature, use_gks=False, rng_seed=0
    )
    peft_model = create_arrow_model(
        copy.deepcopy(model), [str(p) for _, p in adapters], arrow_config=peft_cfg
    ).eval()
    experts = [(name, kit.read_lora_factors(p)) for name, p in adapters]
    config = ArrowConfig(top_k=top_k, temperature=temperature)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        with build_routed_model(model, experts, "arrow", config) as routed:
            got = routed(input_ids=ids, attention_mask=mask).logits
    assert (want - base).abs().max() > 0.05  # the experts change the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
