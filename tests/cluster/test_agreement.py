"""ARI of clusterings against known families: labels, baselines, CLI."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main
from lorashelf.cluster.agreement import agreement, family_truth, summarise
from lorashelf.cluster.methods import ClusterConfig, ClusterContext
from lorashelf.errors import LorashelfError


def _families(planted) -> dict[str, list[str]]:
    fams: dict[str, list[str]] = {}
    for name, fam in zip(planted.names, planted.truth):
        fams.setdefault(f"f{fam}", []).extend(planted.cards[name]["tasks"])
    return fams


def test_family_truth_labels_and_singletons(planted):
    fams = _families(planted)
    dropped = fams.pop("f2")  # experts of family 2 become unrelated singletons
    truth = family_truth(planted.names, planted.cards, fams)
    lone = [n for n in planted.names if planted.cards[n]["tasks"][0] in dropped]
    assert truth.singletons == lone
    assert len(truth.families) == 2 + len(lone)
    for a, la, ta in zip(planted.names, truth.labels, planted.truth):
        for b, lb, tb in zip(planted.names, truth.labels, planted.truth):
            same = ta == tb and a not in lone and b not in lone
            assert (la == lb) == (same or a == b)


def test_family_truth_errors(planted):
    fams = _families(planted)
    with pytest.raises(LorashelfError, match="no families"):
        family_truth(planted.names, planted.cards, {})
    with pytest.raises(LorashelfError, match="two families"):
        family_truth(planted.names, planted.cards, {**fams, "dup": fams["f0"][:1]})
    everyone = {"all": [t for ts in fams.values() for t in ts]}
    with pytest.raises(LorashelfError, match="at least two families"):
        family_truth(planted.names, planted.cards, everyone)
    cards = dict(planted.cards)
    cards[planted.names[0]] = {"tasks": [fams["f0"][0], fams["f1"][0]]}
    with pytest.raises(LorashelfError, match="one family per expert"):
        family_truth(planted.names, cards, fams)


def test_agreement_mbc_recovers_families_random_does_not(planted):
    truth = family_truth(planted.names, planted.cards, _families(planted))
    ctx = ClusterContext(planted.names, planted.cards, planted.load)
    rows = agreement(ctx, truth, ClusterConfig(k=3), ["mbc", "random"], [0, 1, 2])
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, s) for s in (0, 1, 2) for m in ("mbc", "random")
    ]
    mbc = [r for r in rows if r["method"] == "mbc"]
    rnd = [r for r in rows if r["method"] == "random"]
    assert all(r["ari"] == 1.0 for r in mbc)
    assert all(r["ari"] < 0.9 for r in rnd)
    for m, r in zip(mbc, rnd):  # the paper's baseline: random clusters of MBC's sizes
        assert sorted(r["sizes"]) == sorted(m["sizes"])
    assert len({tuple(r["labels"]) for r in rnd}) == 3  # seeds differ
    summary = {s["method"]: s for s in summarise(rows)}
    assert summary["mbc"]["ari_mean"] == 1.0 and summary["mbc"]["ari_std"] == 0.0
    assert summary["random"]["seeds"] == 3
    assert (
        summary["random"]["ari_min"]
        <= summary["random"]["ari_mean"]
        <= summary["random"]["ari_max"]
    )


def test_cluster_check_cli(peft_library, tmp_path, capsys):
    lib, truth = peft_library
    from lorashelf.library import Library

    library = Library.open(lib)
    fams: dict[str, list[str]] = {}
    for name, fam in truth.items():
        fams.setdefault(f"fam{fam}", []).extend(library.get(name).card["tasks"])
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"name": "x", "families": fams}))
    out = tmp_path / "ari.json"
    rc = main(["--device", "cpu", "cluster-check", str(lib), "--families", str(suite),
               "--methods", "mbc,embedding,random", "--seeds", "2", "--dtype", "fp32",
               "--max-prompts", "4", "--json", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "adjusted Rand index" in text and "embedding" in text
    doc = json.loads(out.read_text())
    assert doc["k"] == 3 and len(doc["runs"]) == 6
    summary = {s["method"]: s for s in doc["summary"]}
    assert summary["mbc"]["ari_mean"] == 1.0
    assert summary["random"]["ari_mean"] < 1.0
    assert -1.0 <= summary["embedding"]["ari_mean"] <= 1.0


def test_cluster_check_cli_errors(peft_library, tmp_path, capsys):
    lib, _ = peft_library
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    out = tmp_path / "ari.json"
    assert main(["cluster-check", str(lib), "--families", str(bad), "--json", str(out)]) == 2
    assert "families" in capsys.readouterr().err
    good = tmp_path / "f.json"
    good.write_text(json.dumps({"a": ["jsonl:nope"], "b": ["jsonl:nada"]}))
    assert main(["cluster-check", str(lib), "--families", str(good), "--methods", "mbcc",
                 "--json", str(out)]) == 2  # fmt: skip
    assert "did you mean" in capsys.readouterr().err
    assert not out.exists()
