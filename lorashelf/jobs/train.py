"""Train many experts into a library: one per task, or one on a union of tasks.

``train_many`` plans one job per task (the private experts of Ostapenko et al. 2024)
or a single joint job (their "shared" multi-task baseline), refuses a configuration
the library would reject, and hands the jobs to :func:`~lorashelf.jobs.run.run_jobs`:
experts already in the library are skipped, so an interrupted run resumes where it
stopped, and each expert is trained in a staging directory inside the library and
enters it in one atomic add; a run whose update blew up says "training diverged"
(:func:`check_converged`) rather than failing the library's import check. ``local`` trains them in turn on one loaded base model; ``ray``
runs one job per Ray task, each loading its own tasks and base from the model cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorashelf.data.task import Task
from lorashelf.errors import LorashelfError
from lorashelf.jobs.plan import Job, Output, pending
from lorashelf.jobs.run import run_jobs
from lorashelf.jobs.runners import RUNNERS
from lorashelf.library import Library, safe_name
from lorashelf.models import BaseModel
from lorashelf.train.config import TrainConfig

__all__ = ["Job", "JobResult", "JobSpec", "RUNNERS", "plan_jobs", "train_many"]


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs besides the job, as plain picklable values."""

    base_name: str
    library_dir: str
    config: TrainConfig
    home: str
    device: str = "cpu"
    max_examples: int | None = None
    progress: bool = True


@dataclass
class JobResult:
    name: str
    tasks: tuple[str, ...]
    status: str  # "trained" or "skipped"
    steps: int = 0
    train_loss: float | None = None
    valid_loss: float | None = None
    seconds: float = 0.0
    tokens_per_second: float = 0.0


# A custom runner replaces the whole run: (pending jobs, spec) -> results (tests, schedulers).
CustomRunner = Callable[[Sequence[Job], JobSpec], list[JobResult]]


def open_library(spec: JobSpec) -> Library:
    return Library.open(spec.library_dir, create=True, base_model=spec.base_name)


def plan_jobs(
    task_ids: Sequence[str], *, joint: str | None = None, name: str | None = None
) -> list[Job]:
    """One job per task (named ``safe_name(task)``, or ``name`` for a single task), or one
    joint job named ``joint`` on all of them."""
    ids = list(dict.fromkeys(task_ids))  # drop repeats, keep order
    if not ids:
        raise LorashelfError("no tasks given; pass task ids, e.g. bigbench:sports_understanding")
    if joint:
        if name:
            raise LorashelfError("--name and --joint both name the expert; pass only --joint")
        return [Job(joint, tuple(ids))]
    if name and len(ids) > 1:
        raise LorashelfError(
            f"--name names one expert but {len(ids)} tasks make {len(ids)}; "
            "drop --name, or pass --joint NAME to train one expert on all of them"
        )
    return [Job(name or safe_name(t), (t,)) for t in ids]


def check_fits(library: Library, config: TrainConfig) -> None:
    """Refuse before training what the library would refuse after it."""
    if library.allow_mixed:
        return
    have = library.target_modules
    want = sorted(config.target_modules)
    if have and want != ["all-linear"] and want != sorted(have):
        raise LorashelfError(
            f"library {library.path} holds experts on {','.join(have)} but this run targets "
            f"{','.join(want)}; pass --target-modules {','.join(have)} or use another library"
        )
    if library.rank is not None and library.rank != config.rank:
        raise LorashelfError(
            f"library {library.path} holds rank-{library.rank} experts, not rank {config.rank}; "
            f"pass --rank {library.rank} or use another library"
        )


def load_tasks(ids: Sequence[str], spec: JobSpec) -> list[Task]:
    from lorashelf.data import load_task

    return [load_task(t, home=Path(spec.home), max_examples=spec.max_examples) for t in ids]


def load_model(spec: JobSpec) -> BaseModel:
    import torch

    from lorashelf.models import load_base
    from lorashelf.runtime import resolve_dtype

    device = torch.device(spec.device)
    cfg_dtype = None if spec.config.dtype == "auto" else spec.config.dtype
    dtype = resolve_dtype(cfg_dtype, device)
    return load_base(spec.base_name, home=Path(spec.home), dtype=dtype, device=device)


@dataclass
class TrainWork:
    """The work function of a train job: loads its tasks and the base model on first use
    and keeps them for the next job (``train_expert`` restores the model after each)."""

    spec: JobSpec
    tasks: dict[str, Task] = field(default_factory=dict)
    base: BaseModel | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # a Ray worker gets the spec alone, loads its own tasks and model, draws no bars
        return (TrainWork, (replace(self.spec, progress=False),))

    def __call__(self, job: Job, out_dir: Path) -> Output[JobResult]:
        from lorashelf.train import trainer  # looked up per call, so tests can patch it

        missing = [t for t in job.tasks if t not in self.tasks]
        self.tasks.update((t.id, t) for t in load_tasks(missing, self.spec))
        if self.base is None:
            self.base = load_model(self.spec)
        tasks = [self.tasks[t] for t in job.tasks]
        res = trainer.train_expert(
            self.base, tasks, self.spec.config, out_dir=out_dir, progress=self.spec.progress
        )
        check_converged(out_dir, self.spec.config, res.steps)
        result = JobResult(
            name=job.name,
            tasks=job.tasks,
            status="trained",
            steps=res.steps,
            train_loss=res.train_loss,
            valid_loss=res.valid_loss,
            seconds=res.seconds,
            tokens_per_second=res.tokens_per_second,
        )
        return Output(res.card(), result)


def check_converged(out_dir: Path, config: TrainConfig, steps: int) -> None:
    """Raise "training diverged" when the trained update is past what the library accepts.

    A learning rate far too high need not give a NaN loss (the gradients are clipped):
    the weights can grow to an update norm of 1e14 while the loss stays finite, and the
    library would then refuse the adapter with advice about ``lora_alpha``.
    """
    import math

    from lorashelf.library import read_lora_factors
    from lorashelf.library.adapter import MAX_UPDATE_NORM, update_norm

    for module, f in read_lora_factors(out_dir).items():
        norm = update_norm(f.A, f.B, f.scale)
        if not math.isfinite(norm) or norm > MAX_UPDATE_NORM:
            raise LorashelfError(
                f"training diverged: after {steps} steps the update of {module} has norm "
                f"{norm:.3g} (a library accepts up to {MAX_UPDATE_NORM:g}); lower the "
                f"learning rate (now --lr {config.lr:g})"
            )


def train_many(
    base_name: str,
    task_ids: Sequence[str],
    library_dir: str | Path,
    config: TrainConfig,
    runner: str | CustomRunner = "local",
    *,
    home: Path,
    device: str = "cpu",
    joint: str | None = None,
    name: str | None = None,
    max_examples: int | None = None,
    progress: bool = True,
) -> list[JobResult]:
    """Train the experts of ``task_ids`` (or one ``joint`` expert) into ``library_dir``.

    Experts already in the library are skipped (status "skipped"), so rerunning after
    an interruption trains only what is missing. ``runner`` is a registered runner
    ("local", "ray") or a callable ``(pending jobs, spec) -> results``. Results come
    back in job order.
    """
    spec = JobSpec(
        base_name=base_name,
        library_dir=str(library_dir),
        config=config,
        home=str(home),
        device=str(device),
        max_examples=max_examples,
        progress=progress,
    )
    if isinstance(runner, str):
        RUNNERS.get(runner)  # an unknown name fails before the library is made
    jobs = plan_jobs(task_ids, joint=joint, name=name)
    done: Mapping[str, JobResult] = {}
    with open_library(spec) as library:
        check_fits(library, config)
        todo = pending(jobs, library)
        if todo and not isinstance(runner, str):
            done = {r.name: r for r in runner(todo, spec)}
        elif todo:
            ids = sorted({t for j in todo for t in j.tasks})
            tasks = load_tasks(ids, spec)  # a bad task id fails before any training
            work = TrainWork(spec, tasks={t.id: t for t in tasks})
            gpus = 1 if spec.device.startswith("cuda") else 0
            done = run_jobs(
                todo, work, library, runner=runner, desc="experts", progress=progress, gpus=gpus
            )
    return [done.get(j.name) or JobResult(j.name, j.tasks, "skipped") for j in jobs]
