"""``lorashelf cluster`` end to end on a real library of PEFT experts."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main
from lorashelf.cluster.metrics import adjusted_rand_index


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
    # centred similarity: the same families, recorded in the config, more contrast
    out3 = tmp_path / "centred.json"
    rc = main(["cluster", str(lib), "--k", "3", "--center", "--out", str(out3)])
    centred = json.loads(out3.read_text())
    assert rc == 0 and centred["config"]["center"] is True and doc["config"]["center"] is False
    labels3 = {e: c["id"] for c in centred["clusters"] for e in c["experts"]}
    assert adjusted_rand_index([labels3[n] for n in names], [truth[n] for n in names]) == 1.0
    gap = lambda d: d["stats"]["mean_intra_cosine"] - d["stats"]["mean_inter_cosine"]  # noqa: E731
    assert gap(centred) > gap(doc)


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


def test_cluster_cli_refuses_one_expert_and_mixed_shapes(
    peft_library, tmp_path, tiny_model, kit, capsys
):
    from lorashelf.library import Library

    lib_dir, _ = peft_library
    adapters, base = lib_dir.parent / "adapters", Library.open(lib_dir).base_model
    card = {"init_seed": 0, "base_model": base}
    one = Library.open(tmp_path / "one", create=True, base_model=base)
    one.add(adapters / "e0", name="only", card=card)
    out, png = tmp_path / "c.json", tmp_path / "sim.png"
    assert main(["cluster", str(tmp_path / "one"), "--k", "1", "--out", str(out)]) == 2
    assert "at least 2" in capsys.readouterr().err
    mixed = Library.open(tmp_path / "mixed", create=True, base_model=base, allow_mixed=True)
    for i in range(3):
        mixed.add(adapters / f"e{i}", name=f"e{i}", card=card)
    r2 = kit.write_adapter(tiny_model, tmp_path / "r2", r=2, base_id=base)
    mixed.add(r2, name="r2", card=card, allow_mixed=True)
    rc = main(
        ["cluster", str(tmp_path / "mixed"), "--k", "2", "--out", str(out), "--plot", str(png)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "'r2'" in err and "retrain or remove" in err
    assert not out.exists() and not png.exists()


def test_build_cli_trains_one_expert_per_cluster_and_resumes(peft_library, tmp_path, capsys):
    from lorashelf.library import Library

    lib, _ = peft_library
    clusters, out = tmp_path / "clusters.json", tmp_path / "built"
    assert main(["cluster", str(lib), "--k", "3", "--out", str(clusters)]) == 0
    args = ["--device", "cpu", "build", str(lib), "--clusters", str(clusters),
            "--out", str(out), "--dtype", "fp32", "--set", "steps=2", "--set", "batch_size=4",
            "--set", "max_length=32", "--set", "target_modules=[\"q_proj\", \"v_proj\"]"]  # fmt: skip
    assert main(args) == 0
    assert "built 3 of 3" in capsys.readouterr().out
    doc = json.loads(clusters.read_text())
    built = Library.open(out)
    assert built.names() == ["cluster_00", "cluster_01", "cluster_02"]
    for c in doc["clusters"]:
        card = built.get(f"cluster_{c['id']:02d}").card
        assert card["tasks"] == c["tasks"] and len(card["tasks"]) == 3
        assert card["extra"]["cluster"]["members"] == c["experts"]
        assert card["extra"]["cluster"]["config"] == doc["config"]
        assert card["training"]["steps"] == 2 and card["init_seed"] == 0
        assert built.get(f"cluster_{c['id']:02d}").lora_factors()  # a readable LoRA
    assert main(args) == 0  # resumable: nothing left to do
    assert "built 0 of 3" in capsys.readouterr().out
