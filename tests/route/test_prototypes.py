"""Exact Arrow prototypes against the dense SVD of B @ A, and the per-expert cache."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lorashelf.route.prototypes as P
from lorashelf.errors import LorashelfError
from lorashelf.route.prototypes import arrow_prototypes, top_right_singular_vectors


def dense_top_right(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: top right singular vector of the dense delta, and its singular values."""
    _, s, vh = torch.linalg.svd(B.double() @ A.double())
    return vh[0], s


def rank_deficient(d_out: int, d_in: int, r: int, g: torch.Generator):
    """Rank-r factors whose product has rank <= 2: A's rows span 2 directions, B lost a column."""
    A = torch.randn(r, 2, generator=g) @ torch.randn(2, d_in, generator=g)
    B = torch.randn(d_out, r, generator=g)
    B[:, -1] = 0.0
    return A, B


CASES = [
    (64, 64, 4),
    (192, 576, 4),
    (576, 192, 8),
    (7, 33, 1),
    (33, 7, 1),
    (16, 16, 16),
    (5, 40, 8),
]


PARAMS = [(*c, False) for c in CASES] + [(*c, True) for c in CASES if c[2] >= 4]


@pytest.mark.parametrize(("d_out", "d_in", "r", "deficient"), PARAMS)
def test_matches_dense_svd(d_out: int, d_in: int, r: int, deficient: bool) -> None:
    g = torch.Generator().manual_seed(d_out * 1000 + d_in + r)
    pairs = [
        rank_deficient(d_out, d_in, r, g)
        if deficient
        else (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g))
        for _ in range(5)
    ]
    ours = top_right_singular_vectors(
        torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    )
    assert ours.shape == (5, d_in)
    for (A, B), v in zip(pairs, ours):
        ref, s = dense_top_right(A, B)
        if len(s) > 1:  # the top vector is only defined up to sign when s1 > s2
            assert s[0] > 1.01 * s[1], "test setup: no spectral gap"
        assert abs(float(v.double() @ ref)) > 0.9999
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)


def test_float64_and_sign_convention() -> None:
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(3, 4, 20, generator=g).double(), torch.randn(3, 10, 4, generator=g).double()
    v = top_right_singular_vectors(A, B)
    assert v.dtype == torch.float64
    for i in range(3):
        ref, _ = dense_top_right(A[i], B[i])
        assert abs(float(v[i] @ ref)) > 1 - 1e-12
        assert v[i][v[i].abs().argmax()] > 0  # largest entry positive: reproducible sign


def test_modules_and_mixed_shapes(shapes: dict, kit) -> None:
    random_factors = kit.random_factors
    experts = [
        ("a", random_factors(shapes, r=4, seed=1)),
        ("b", random_factors(shapes, r=2, seed=2)),
    ]
    partial = {m: f for m, f in random_factors(shapes, r=8, seed=3).items() if "q_proj" in m}
    experts.append(("c", partial))
    protos = arrow_prototypes(experts)
    assert sorted(protos) == sorted(shapes)
    for m, (_, d_in) in shapes.items():
        present = [f[m] for _, f in experts if m in f]
        assert protos[m].shape == (len(present), d_in)
        for row, f in zip(protos[m], present):
            ref, _ = dense_top_right(f.A, f.B)
            assert abs(float(row.double() @ ref)) > 0.9999


def test_cache_computes_only_new_experts(tmp_path, shapes, monkeypatch, kit) -> None:
    random_factors = kit.random_factors
    experts = [(f"e{i}", random_factors(shapes, seed=i)) for i in range(3)]
    sums = [f"sha{i}" for i in range(3)]
    computed: list[str] = []
    real = P._compute

    def spy(jobs, device):
        computed.extend(sorted({sums[i] for i, _, _ in jobs}))
        return real(jobs, device)

    monkeypatch.setattr(P, "_compute", spy)
    cache = tmp_path / "cache" / "arrow_prototypes.safetensors"
    first = arrow_prototypes(experts[:2], checksums=sums[:2], cache_path=cache)
    assert computed == ["sha0", "sha1"] and cache.exists()
    computed.clear()
    again = arrow_prototypes(experts, checksums=sums, cache_path=cache)
    assert computed == ["sha2"]  # only the new expert
    fresh = arrow_prototypes(experts)
    for m in shapes:
        assert torch.equal(again[m][:2], first[m])
        torch.testing.assert_close(again[m], fresh[m])
    computed.clear()
    arrow_prototypes(experts[::-1], checksums=sums[::-1], cache_path=cache)
    assert computed == []
    # an expert without a checksum is computed every time and never stored
    computed.clear()
    extra = ("e3", random_factors(shapes, seed=3))
    sums.append("")
    for _ in range(2):
        out = arrow_prototypes(experts + [extra], checksums=sums, cache_path=cache)
    assert computed == ["", ""]
    torch.testing.assert_close(out, arrow_prototypes(experts + [extra]))


def test_cache_errors(tmp_path, shapes, kit) -> None:
    random_factors = kit.random_factors
    experts = [("e0", random_factors(shapes))]
    with pytest.raises(LorashelfError, match="checksum"):
        arrow_prototypes(experts, cache_path=tmp_path / "c.safetensors")
    with pytest.raises(LorashelfError, match="2 checksums for 1"):
        arrow_prototypes(experts, checksums=["a", "b"])
    bogus = tmp_path / "bogus.safetensors"
    save_file({"x": torch.zeros(2)}, str(bogus))
    with pytest.raises(LorashelfError, match="delete it"):
        arrow_prototypes(experts, checksums=["a"], cache_path=bogus)
    with pytest.raises(LorashelfError, match="no experts"):
        arrow_prototypes([])


def test_power_iteration_reference_agrees_when_gapped(shapes, kit) -> None:
    """PEFT-style power iteration (15 steps) converges to our vector given a spectral gap."""
    f = kit.random_factors(shapes, gap=True)["model.layers.0.self_attn.q_proj"]
    v = torch.randn(f.A.shape[1], generator=torch.Generator().manual_seed(0))
    for _ in range(15):
        v = f.A.T @ (f.B.T @ (f.B @ (f.A @ v)))
        v = v / v.norm()
    ours = top_right_singular_vectors(f.A[None], f.B[None])[0]
    assert abs(float(v @ ours)) > 1 - 1e-6
