"""GenKnowSub for Arrow: the PEFT variant against ``create_arrow_model(..., use_gks=True)``
logits, the delta variant against the dense ``s_i B_i A_i - mean_g s_g B_g A_g`` and its
SVD, general experts left out of routing, and the errors.

The adapters are gapped (tests/route/test_peft_arrow.py explains why: PEFT's power
iteration is then exact) and the general ones small, so the task adapters minus the
general mean keep their gap.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import ArrowConfig as PeftArrowConfig
from peft import create_arrow_model

from lorashelf.errors import LorashelfError
from lorashelf.route import ArrowConfig, build_routed_model
from lorashelf.route.genknowsub import subtract_general
from lorashelf.route.prototypes import arrow_prototypes

E, G = 4, 2


@pytest.fixture
def adapters(kit, model, shapes, tmp_path):
    """E gapped task adapters and G small general ones, as PEFT dirs and factors."""
    out = []
    for i in range(E + G):
        name = f"task{i}" if i < E else f"general{i - E}"
        size = 0.8 if i < E else 0.15
        factors = kit.random_factors(shapes, seed=200 + i, gap=True, size=size)
        path = kit.write_adapter(model, tmp_path / name, factors, lora_alpha=8)
        out.append((name, path, kit.read_lora_factors(path)))
    return out


@pytest.mark.parametrize(("top_k", "temperature"), [(2, 1.0), (1, 1.0), (3, 0.5)])
def test_peft_variant_equals_peft_create_arrow_model_with_gks(
    model, adapters, ids, top_k, temperature
):
    tasks, general = adapters[:E], adapters[E:]
    peft_cfg = PeftArrowConfig(
        top_k=top_k, router_temperature=temperature, use_gks=True, rng_seed=0
    )
    peft_model = create_arrow_model(
        copy.deepcopy(model), [str(p) for _, p, _ in tasks], arrow_config=peft_cfg,
        general_adapter_paths=[str(p) for _, p, _ in general],
    ).eval()  # fmt: skip
    experts = [(n, f) for n, _, f in adapters]
    gks = ArrowConfig(top_k, temperature, gks="peft", gks_experts=("general0", "general1"))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        with build_routed_model(model, experts[:E], "arrow", ArrowConfig(top_k, temperature)) as r:
            plain = r(input_ids=ids, attention_mask=mask).logits
        with build_routed_model(model, experts, "arrow", gks) as routed:
            assert routed.expert_names == [n for n, _, _ in tasks]  # generals are not routed
            got = routed(input_ids=ids, attention_mask=mask).logits
    assert (want - plain).abs().max() > 1e-3  # the subtraction changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_delta_variant_is_the_exact_update_difference(adapters):
    experts = [(n, f) for n, _, f in adapters]
    general = [f for _, _, f in adapters[E:]]
    out, sums = subtract_general(experts, None, ["general0", "general1"], "delta")
    assert [n for n, _ in out] == [f"task{i}" for i in range(E)] and sums is None
    protos = arrow_prototypes(out)
    for i, (_, fs) in enumerate(out):
        for m, f in fs.items():
            task = adapters[i][2][m]
            dense = task.scale * task.B.double() @ task.A.double()
            dense -= sum(g[m].scale * g[m].B.double() @ g[m].A.double() for g in general) / G
            got = f.scale * f.B.double() @ f.A.double()
            torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
            v = torch.linalg.svd(dense).Vh[0]
            assert abs(float(v @ protos[m][i].double())) == pytest.approx(1.0, abs=1e-5)


def test_peft_variant_subtracts_a_and_b_apart(adapters):
    experts = [(n, f) for n, _, f in adapters]
    out, _ = subtract_general(experts, ["c"] * (E + G), ["general0", "general1"], "peft")
    m = next(iter(out[0][1]))
    ga, gb = (torch.stack([f[m].A for _, _, f in adapters[E:]]).mean(0),
              torch.stack([f[m].B for _, _, f in adapters[E:]]).mean(0))  # fmt: skip
    torch.testing.assert_close(out[0][1][m].A, adapters[0][2][m].A - ga)
    torch.testing.assert_close(out[0][1][m].B, adapters[0][2][m].B - gb)
    assert out[0][1][m].scale == adapters[0][2][m].scale


def test_checksums_name_the_variant_and_the_general_experts(adapters):
    experts = [(n, f) for n, _, f in adapters]
    sums = [f"c{i}" for i in range(E + G)]
    _, peft = subtract_general(experts, sums, ["general0", "general1"], "peft")
    _, delta = subtract_general(experts, sums, ["general0", "general1"], "delta")
    _, one = subtract_general(experts, sums, ["general0"], "delta")
    assert len({peft[0], delta[0], one[0], "c0"}) == 4 and peft[0].startswith("c0~gks-")


def test_errors_name_the_fix(adapters, model):
    experts = [(n, f) for n, _, f in adapters]
    with pytest.raises(LorashelfError, match="gks_experts"):
        build_routed_model(model, experts, "arrow", ArrowConfig(gks="delta"))
    with pytest.raises(LorashelfError, match="did you mean"):
        subtract_general(experts, None, ["general9"], "delta")
    with pytest.raises(LorashelfError, match="unknown gks"):
        ArrowConfig(gks="mean")
    assert ArrowConfig(gks_experts="a,b").gks_experts == ("a", "b")
