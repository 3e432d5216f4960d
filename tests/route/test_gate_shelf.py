"""GateShelf: a library's gate directory as the job runner's shelf (resume + hand-over)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lorashelf.route.gate_store import GATES_FILE, GateShelf, load_gates, save_gates

SUMS = {"alpha": "ab" * 32, "beta": "cd" * 32}
MODULE = "model.layers.0.self_attn.q_proj"
GATES = {MODULE: torch.randn(8)}


def test_names_are_the_experts_with_sound_gates(tmp_path):
    shelf = GateShelf(tmp_path, SUMS)
    assert shelf.names() == []
    save_gates(tmp_path, SUMS["beta"], GATES, {"expert": "beta"})
    assert shelf.names() == ["beta"]
    assert GateShelf(tmp_path, SUMS, overwrite=True).names() == []  # everything is redone
    path = tmp_path / f"{SUMS['beta']}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # corrupt gates count as missing, so a rerun retrains them
    path.write_bytes(bytes(data))
    assert shelf.names() == []


def test_add_stores_the_jobs_file_under_the_experts_checksum(tmp_path):
    job_dir = tmp_path / "job" / "alpha"
    job_dir.mkdir(parents=True)
    save_file(GATES, str(job_dir / GATES_FILE))
    shelf = GateShelf(tmp_path / "gates", SUMS)
    shelf.add(job_dir, name="alpha", card={"expert": "alpha", "stats": {"steps": 3}})
    stored = load_gates(tmp_path / "gates", SUMS["alpha"], expert="alpha")
    assert torch.equal(stored.gates[MODULE], GATES[MODULE])
    assert stored.meta["stats"] == {"steps": 3} and shelf.names() == ["alpha"]
