"""Clustering a library object and building one expert per cluster (resumable)."""

from __future__ import annotations

import json

import pytest

from lorashelf.cluster.build import build_library, plan_jobs
from lorashelf.cluster.methods import ClusterConfig
from lorashelf.cluster.report import load_clusters
from lorashelf.cluster.run import cluster_library
from lorashelf.errors import LorashelfError


@pytest.fixture
def clusters_json(planted_library, tmp_path):
    out = tmp_path / "clusters.json"
    cluster_library(planted_library, ClusterConfig(k=3), out=out, home=tmp_path)
    return out


@pytest.fixture
def peft_trainer(planted_base, kit):
    """Writes a random PEFT adapter of the experts' base; records the jobs it ran."""
    calls = []
    model, base_dir = planted_base

    def train(job, out_dir):
        calls.append(job.name)
        kit.write_adapter(model, out_dir, r=2, target_modules=["q_proj"], base_id=str(base_dir))
        return {"init_seed": 0, "extra": {"trainer": "fake"}}

    train.calls = calls
    return train


def test_cluster_library_writes_json(planted_library, clusters_json, planted):
    doc = json.loads(clusters_json.read_text())
    assert doc["source"]["n_experts"] == 15 and doc["k"] == 3
    tasks = sorted(t for c in doc["clusters"] for t in c["tasks"])
    assert tasks == sorted(planted.cards[n]["tasks"][0] for n in planted.names)


def test_build_one_expert_per_cluster_then_resume(
    planted_library, clusters_json, peft_trainer, new_library, tmp_path
):
    out = new_library(tmp_path / "built")
    built = build_library(clusters_json, planted_library, out, peft_trainer)
    assert built == ["cluster_00", "cluster_01", "cluster_02"] == out.names()
    cf = load_clusters(clusters_json)
    for job in plan_jobs(cf):
        card = out.get(job.name).card
        assert card["tasks"] == list(job.tasks) and card["init_seed"] == 0
        assert card["extra"]["trainer"] == "fake"
        cl = card["extra"]["cluster"]
        assert cl["id"] == job.id and cl["members"] == list(job.members)
        assert cl["sha256"] == cf.sha256 and cl["config"]["method"] == "mbc"
    # a rerun skips what is built; a lost expert is rebuilt alone
    assert build_library(clusters_json, planted_library, out, peft_trainer) == []
    out.remove("cluster_01")
    assert build_library(clusters_json, planted_library, out, peft_trainer) == ["cluster_01"]
    assert peft_trainer.calls == ["cluster_00", "cluster_01", "cluster_02", "cluster_01"]


def test_build_refuses_other_clustering_and_foreign_members(
    planted_library, clusters_json, peft_trainer, new_library, tmp_path
):
    out = new_library(tmp_path / "built")
    build_library(clusters_json, planted_library, out, peft_trainer)
    other = tmp_path / "other.json"
    cluster_library(
        planted_library, ClusterConfig(method="random", k=3, seed=9), out=other, home=tmp_path
    )
    with pytest.raises(LorashelfError, match="another clustering.*new --library"):
        build_library(other, planted_library, out, peft_trainer)
    planted_library.remove("expert_03")
    with pytest.raises(LorashelfError, match="expert_03.*recluster"):
        build_library(clusters_json, planted_library, new_library(tmp_path / "b2"), peft_trainer)


def test_clusters_without_tasks_are_refused(make_planted_library, planted, tmp_path):
    lib = make_planted_library(cards={n: {"init_seed": 0} for n in planted.names})
    out = tmp_path / "c.json"
    cluster_library(lib, ClusterConfig(k=2), out=out, home=tmp_path)
    with pytest.raises(LorashelfError, match="lists no tasks"):
        plan_jobs(load_clusters(out))


def test_bad_request_writes_nothing(planted_library, make_planted_library, planted, tmp_path):
    with pytest.raises(LorashelfError, match="between 1 and 15"):
        cluster_library(
            planted_library,
            ClusterConfig(k=16),
            out=tmp_path / "c.json",
            plot=tmp_path / "p.png",
            home=tmp_path,
        )
    one_module = dict(list(planted.factors["expert_07"].items())[:1])
    odd = make_planted_library(tmp_path / "odd", factors={"expert_07": one_module})
    with pytest.raises(LorashelfError, match="expert_07"):
        cluster_library(
            odd,
            ClusterConfig(k=3),
            out=tmp_path / "c.json",
            plot=tmp_path / "p.png",
            home=tmp_path,
        )
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "p.png").exists()


def test_training_options_default_to_the_source_experts():
    from lorashelf.cli.cluster import override
    from lorashelf.cli.options import parse_sets as parse_overrides
    from lorashelf.cluster.build import training_from_cards

    t = {"rank": 4, "steps": 200, "epochs": None, "init_seed": 7}
    assert training_from_cards({"a": {"training": t}, "b": {"training": dict(t)}, "c": {}}) == t
    assert training_from_cards({"a": {}}) == {}
    with pytest.raises(LorashelfError, match="rank differ.*--train-config"):
        training_from_cards({"a": {"training": t}, "b": {"training": {**t, "rank": 8}}})
    changes = parse_overrides(["epochs=2", "lr=3e-4", "schedule=cosine"])
    assert changes == {"epochs": 2, "lr": 3e-4, "schedule": "cosine"}
    assert override(t, changes) == {**t, **changes, "steps": None}
    with pytest.raises(LorashelfError, match="KEY=VALUE"):
        parse_overrides(["epochs"])
