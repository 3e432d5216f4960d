"""``lorashelf cluster`` end to end on a real library of PEFT experts."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main
from lorashelf.cluster.metrics import adjusted_rand_index

try:
    from lorashelf.library import Library  # noqa: F401
except ImportError:  # the library area is not in yet
    pytest.skip("lorashelf.library.Library is not available", allow_module_level=True)


def test_cluster_cli_writes_json_and_heatmap(peft_library, tmp_path, capsys):
    lib, truth = peft_library
    out, png = tmp_path / "out" / "clusters.json", tmp_path / "out" / "sim.png"
    rc = main(["--device", "cpu", "cluster", str(lib), "--k", "3", "--seed", "1",
               "--out", str(out), "--plot", str(png)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["k"] == 3 and doc["config"]["seed"] == 1 and doc["method"] == "mbc"
    labels = {e: c["id"] for c in doc["clusters"] for e in c["experts"]}
    names = sorted(truth)
    assert adjusted_rand_index([labels[n] for n in names], [truth[n] for n in names]) == 1.0
    assert doc["stats"]["mean_intra_cosine"] > doc["stats"]["mean_inter_cosine"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out
    # the random baseline with the same sizes
    out2 = tmp_path / "random.json"
    rc = main(["cluster", str(lib), "--k", "3", "--method", "random", "--sizes-from", str(out),
               "--out", str(out2)])  # fmt: skip
    assert rc == 0 and json.loads(out2.read_text())["stats"]["sizes"] == doc["stats"]["sizes"]


@pytest.mark.parametrize(
    "extra,match",
    [(["--k", "10"], "between 1 and 9"), (["--k", "2", "--method", "mbcc"], "did you mean")],
)
def test_cluster_cli_errors_write_nothing(peft_library, tmp_path, capsys, extra, match):
    lib, _ = peft_library
    out, png = tmp_path / "c.json", tmp_path / "sim.png"
    rc = main(["cluster", str(lib), *extra, "--out", str(out), "--plot", str(png)])
    assert rc == 2 and match in capsys.readouterr().err
    assert not out.exists() and not png.exists()
