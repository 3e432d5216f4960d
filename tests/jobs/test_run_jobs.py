"""run_jobs on a real Library: resume after an interruption, atomic hand-over, runners."""

from __future__ import annotations

import importlib.util
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lorashelf.errors import LorashelfError
from lorashelf.jobs import Job, Output, run_jobs
from lorashelf.library import Library
from lorashelf.lora import LoraFactors, write_peft_adapter

JOBS = [Job(n, (f"jsonl:{n}.jsonl",)) for n in ("a", "b", "c")]
MODULES = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


@dataclass
class Seeded:
    """A work function: a rank-2 LoRA seeded by the job's name; raises on call ``fail_on``."""

    base: str
    fail_on: int | None = None
    nan: bool = False
    calls: list[str] = field(default_factory=list)
    out_dirs: list[Path] = field(default_factory=list)

    def __call__(self, job: Job, out_dir: Path) -> Output[str]:
        self.calls.append(job.name)
        self.out_dirs.append(out_dir)
        g = torch.Generator().manual_seed(zlib.crc32(job.name.encode()))
        factors = {
            m: LoraFactors(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), 2.0)
            for m in MODULES
        }
        if self.nan:
            factors[MODULES[0]].B[0, 0] = float("nan")
        write_peft_adapter(factors, out_dir, self.base)
        if len(self.calls) == self.fail_on:  # the adapter is half-way: card not yet handed over
            raise KeyboardInterrupt
        return Output({"tasks": list(job.tasks), "source": "train"}, f"made {job.name}")


@pytest.fixture
def library(tmp_path, tiny_model_dir):
    with Library.open(tmp_path / "lib", create=True, base_model=str(tiny_model_dir)) as lib:
        yield lib


def test_rerun_after_an_interruption_finishes_only_the_rest(library, tiny_model_dir):
    flaky = Seeded(str(tiny_model_dir), fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(JOBS, flaky, library, progress=False)
    assert flaky.calls == ["a", "b"] and library.names() == ["a"]
    assert library.verify() == [] and not any(d.exists() for d in flaky.out_dirs)
    assert library.get("a").card["tasks"] == ["jsonl:a.jsonl"]

    again = Seeded(str(tiny_model_dir))
    done = run_jobs(JOBS, again, library, progress=False)
    assert again.calls == ["b", "c"] and done == {"b": "made b", "c": "made c"}
    assert library.names() == ["a", "b", "c"] and library.verify() == []
    assert run_jobs(JOBS, again, library, progress=False) == {} and len(again.calls) == 2


def test_an_output_the_library_refuses_leaves_nothing(library, tiny_model_dir):
    with pytest.raises(LorashelfError, match="finite|nan|NaN"):
        run_jobs(JOBS[:1], Seeded(str(tiny_model_dir), nan=True), library, progress=False)
    assert library.names() == [] and library.verify() == []
    assert not [p for p in (library.path / "experts").iterdir()]


def test_runner_by_name_or_as_a_callable(library, tiny_model_dir):
    work = Seeded(str(tiny_model_dir))
    with pytest.raises(LorashelfError, match="unknown runner 'slurm'.*known: local, ray"):
        run_jobs(JOBS, work, library, runner="slurm")
    assert work.calls == [] and library.names() == []
    run_jobs(JOBS[:1], work, library, progress=False)
    seen = []

    def reverse(jobs, work, shelf, *, desc, progress, gpus):
        seen.append(([j.name for j in jobs], desc, gpus))
        return [f"r-{j.name}" for j in jobs]

    done = run_jobs(JOBS, work, library, runner=reverse, desc="x", gpus=1)
    assert seen == [(["b", "c"], "x", 1)] and list(done.items()) == [("b", "r-b"), ("c", "r-c")]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_ray_runner_writes_the_same_experts(library, tiny_model_dir, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests
    run_jobs(JOBS[:1], Seeded(str(tiny_model_dir)), library, progress=False)
    done = run_jobs(JOBS, Seeded(str(tiny_model_dir)), library, runner="ray", progress=False)
    assert list(done.items()) == [("b", "made b"), ("c", "made c")]
    assert library.names() == ["a", "b", "c"] and library.verify() == []
    with Library.open(tmp_path / "lib2", create=True, base_model=str(tiny_model_dir)) as local:
        run_jobs(JOBS, Seeded(str(tiny_model_dir)), local, progress=False)
        for n in ("a", "b", "c"):  # the same weights and config, whichever runner made them
            same = local.get(n).files["adapter_model.safetensors"]
            assert library.get(n).files["adapter_model.safetensors"] == same
            assert config(local.get(n).path) == config(library.get(n).path)


def config(expert_dir: Path) -> dict:
    """An adapter's config; PEFT stores target_modules as a set, so its order varies."""
    cfg = json.loads((expert_dir / "adapter_config.json").read_text())
    return {**cfg, "target_modules": sorted(cfg["target_modules"])}
