"""train_many and ``lorashelf train``: experts land in a real library, reruns resume."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lorashelf.cli import main
from lorashelf.errors import LorashelfError
from lorashelf.jobs.train import Job, JobResult, plan_jobs, train_many
from lorashelf.library import Library, safe_name
from lorashelf.train import TrainConfig

CFG = TrainConfig(steps=3, batch_size=4, lr=1e-2, max_length=64, warmup=0.0)


def many(model_dir, ids, lib, tmp_path, **kw):
    kw.setdefault("progress", False)
    return train_many(str(model_dir), ids, lib, kw.pop("config", CFG), home=tmp_path / "home", **kw)


def test_plan_jobs():
    assert plan_jobs(["bigbench:a/b", "x:c", "x:c"]) == [
        Job("bigbench__a__b", ("bigbench:a/b",)),
        Job("x__c", ("x:c",)),
    ]
    assert plan_jobs(["x:a", "x:b"], joint="shared") == [Job("shared", ("x:a", "x:b"))]
    assert plan_jobs(["x:a"], name="mine") == [Job("mine", ("x:a",))]
    with pytest.raises(LorashelfError, match="--joint NAME"):
        plan_jobs(["x:a", "x:b"], name="mine")
    with pytest.raises(LorashelfError, match="no tasks"):
        plan_jobs([])


def test_local_runner_writes_cards_and_resumes(tiny_model_dir, jsonl_tasks, tmp_path):
    lib = tmp_path / "lib"
    first = many(tiny_model_dir, jsonl_tasks[:2], lib, tmp_path)
    assert [r.status for r in first] == ["trained", "trained"]
    with Library.open(lib) as library:
        assert sorted(library.names()) == sorted(safe_name(t) for t in jsonl_tasks[:2])
        card = library.get(safe_name(jsonl_tasks[0])).card
    assert card["tasks"] == [jsonl_tasks[0]] and card["source"] == "train"
    assert card["init_seed"] == 0 and card["training"]["rank"] == 4
    assert card["training"]["alpha"] == 8.0 and len(card["extra"]["loss_curve"]) == 3
    assert card["train_loss"] == pytest.approx(first[0].train_loss)
    assert card["valid_loss"] == pytest.approx(first[0].valid_loss)
    # rerun with one more task: only the new one trains
    second = many(tiny_model_dir, jsonl_tasks, lib, tmp_path)
    assert [r.status for r in second] == ["skipped", "skipped", "trained"]
    with Library.open(lib) as library:
        assert len(library.names()) == 3


def test_joint_expert_on_the_union(tiny_model_dir, jsonl_tasks, tmp_path):
    lib = tmp_path / "lib"
    (res,) = many(tiny_model_dir, jsonl_tasks[:2], lib, tmp_path, joint="shared")
    assert res.name == "shared" and res.tasks == tuple(jsonl_tasks[:2])
    with Library.open(lib) as library:
        assert library.names() == ["shared"]
        assert library.get("shared").card["tasks"] == jsonl_tasks[:2]


def test_interrupted_run_keeps_finished_experts(tiny_model_dir, jsonl_tasks, tmp_path, monkeypatch):
    import lorashelf.train.trainer as trainer

    real, calls = trainer.train_expert, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(trainer, "train_expert", flaky)
    lib = tmp_path / "lib"
    with pytest.raises(KeyboardInterrupt):
        many(tiny_model_dir, jsonl_tasks, lib, tmp_path)
    with Library.open(lib) as library:
        assert library.names() == [safe_name(jsonl_tasks[0])]
        assert library.verify() == []
    monkeypatch.setattr(trainer, "train_expert", real)
    again = many(tiny_model_dir, jsonl_tasks, lib, tmp_path)
    assert [r.status for r in again] == ["skipped", "trained", "trained"]


def test_custom_runner_gets_only_pending_jobs(tiny_model_dir, jsonl_tasks, tmp_path):
    lib = tmp_path / "lib"
    many(tiny_model_dir, jsonl_tasks[:1], lib, tmp_path)
    seen = []

    def fake(jobs, spec):
        seen.append((list(jobs), spec))
        return [JobResult(j.name, j.tasks, "trained", steps=1) for j in jobs]

    out = many(tiny_model_dir, jsonl_tasks, lib, tmp_path, runner=fake, max_examples=10)
    assert [j.name for j in seen[0][0]] == [safe_name(t) for t in jsonl_tasks[1:]]
    assert seen[0][1].max_examples == 10 and seen[0][1].config == CFG
    assert [r.status for r in out] == ["skipped", "trained", "trained"]


def test_refuses_config_the_library_would_reject(tiny_model_dir, jsonl_tasks, tmp_path):
    lib = tmp_path / "lib"
    many(tiny_model_dir, jsonl_tasks[:1], lib, tmp_path)

    def never(jobs, spec):
        raise AssertionError("must fail before training")

    for bad, flag in [(dict(rank=8), "--rank 4"), (dict(target_modules=("q_proj",)), "--target")]:
        cfg = TrainConfig(**{**CFG.__dict__, **bad})
        with pytest.raises(LorashelfError, match=flag):
            many(tiny_model_dir, jsonl_tasks[1:], lib, tmp_path, config=cfg, runner=never)
    with pytest.raises(LorashelfError, match="unknown runner"):
        many(tiny_model_dir, jsonl_tasks, lib, tmp_path, runner="slurm")


def test_cli_train_end_to_end(tiny_model_dir, jsonl_tasks, tmp_path, capsys):
    lib = tmp_path / "lib"
    common = ["--home", str(tmp_path / "home"), "--device", "cpu", "train"]
    opts = ["--model", str(tiny_model_dir), "--steps", "2", "--quiet"]
    opts += ["--batch-size", "4", "--max-length", "64", "--rank", "2", "--lr", "0.01"]
    assert main([*common, str(lib), "--tasks", ",".join(jsonl_tasks[:2]), *opts]) == 0
    out = capsys.readouterr().out
    assert "2 trained, 0 skipped" in out and "valid loss" in out
    with Library.open(lib) as library:
        assert sorted(library.names()) == sorted(safe_name(t) for t in jsonl_tasks[:2])
        expert = library.get(safe_name(jsonl_tasks[1]))
        assert expert.card["training"]["rank"] == 2
        assert json.loads((expert.path / "adapter_config.json").read_text())["r"] == 2
    # rerun: skipped, printed; the model now comes from the library
    # (with the old spelling, `train TASK... --library LIB`, which still works one release)
    rerun = [o for o in opts if o not in ("--model", str(tiny_model_dir))]
    assert main([*common, *jsonl_tasks[:2], "--library", str(lib), *rerun]) == 0
    captured = capsys.readouterr()
    assert captured.out.count(": already in") == 2 and "0 trained, 2 skipped" in captured.out
    assert "deprecated" in captured.err and "train LIB --tasks" in captured.err
    # joint + name errors are one line, exit 2
    new = [*common, str(lib), "--tasks", ",".join(jsonl_tasks[:2]), *opts]
    assert main([*new, "--name", "x"]) == 2
    assert "--joint NAME" in capsys.readouterr().err
    assert main([*new, "--joint", "shared"]) == 0
    with Library.open(lib) as library:
        assert library.get("shared").card["tasks"] == jsonl_tasks[:2]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_ray_runner(tiny_model_dir, jsonl_tasks, tmp_path):
    lib = tmp_path / "lib"
    out = many(tiny_model_dir, jsonl_tasks[:2], lib, tmp_path, runner="ray")
    assert [r.status for r in out] == ["trained", "trained"]
    with Library.open(lib) as library:
        assert sorted(library.names()) == sorted(safe_name(t) for t in jsonl_tasks[:2])
        assert library.verify() == []
    # the same data and seeds give the same expert as the local runner
    local = many(tiny_model_dir, jsonl_tasks[:1], tmp_path / "lib2", tmp_path)
    assert local[0].train_loss == pytest.approx(out[0].train_loss, rel=1e-4)
