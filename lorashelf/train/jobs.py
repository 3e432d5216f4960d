"""Train many experts into a library: one per task, or one on a union of tasks.

``train_many`` plans one job per task (the private experts of Ostapenko et al. 2024)
or a single joint job (their "shared" multi-task baseline), drops jobs whose expert
is already in the library (so an interrupted run resumes where it stopped) and hands
the rest to a runner: ``local`` trains them in turn on one loaded base model; ``ray``
runs one job per Ray task (``pip install lorashelf[ray]``), each loading the base
from the model cache and adding its expert to the library, which is safe across
processes. Every expert is trained in a temporary directory and enters the library
in one atomic add, so a crash or Ctrl-C loses at most the expert in progress.

The library sits to the right of training in the data flow; this module is where
training hands its output over, so it imports :mod:`lorashelf.library` (lazily, in
one place, :func:`open_library`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorashelf.data.task import Task
from lorashelf.errors import LorashelfError
from lorashelf.models import BaseModel
from lorashelf.registry import Registry
from lorashelf.train.config import TrainConfig


@dataclass(frozen=True)
class Job:
    """One expert to train: its name in the library and the task ids it learns."""

    name: str
    tasks: tuple[str, ...]


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


Runner = Callable[[Sequence[Job], JobSpec], list[JobResult]]
RUNNERS: Registry[Runner] = Registry("runner")


def open_library(spec: JobSpec, base_id: str | None = None) -> Any:
    from lorashelf.library import Library

    return Library.open(spec.library_dir, create=True, base_model=base_id or spec.base_name)


def expert_name(task_id: str) -> str:
    from lorashelf.library import safe_name

    return safe_name(task_id)


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
    return [Job(name or expert_name(t), (t,)) for t in ids]


def check_fits(library: Any, config: TrainConfig) -> None:
    """Refuse before training what the library would refuse after it."""
    if getattr(library, "allow_mixed", False):
        return
    have = getattr(library, "target_modules", None)
    want = sorted(config.target_modules)
    if have and want != ["all-linear"] and want != sorted(have):
        raise LorashelfError(
            f"library {library.path} holds experts on {','.join(have)} but this run targets "
            f"{','.join(want)}; pass --target-modules {','.join(have)} or use another library"
        )
    rank = getattr(library, "rank", None)
    if rank is not None and rank != config.rank:
        raise LorashelfError(
            f"library {library.path} holds rank-{rank} experts, not rank {config.rank}; "
            f"pass --rank {rank} or use another library"
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


def run_job(
    job: Job,
    spec: JobSpec,
    *,
    base: BaseModel | None = None,
    library: Any = None,
    tasks: Sequence[Task] | None = None,
) -> JobResult:
    """Train ``job`` in a temporary dir and add it to the library; loads what isn't given."""
    from lorashelf.train.trainer import train_expert

    tasks = list(tasks) if tasks is not None else load_tasks(job.tasks, spec)
    base = base or load_model(spec)
    own = library is None
    library = library or open_library(spec, base.base_id)
    try:
        # in the library's .tmp, locked: a killed training's dir goes at the next write
        with library.staging_dir("train--") as tmp:
            out = tmp / job.name
            res = train_expert(base, tasks, spec.config, out_dir=out, progress=spec.progress)
            library.add(out, name=job.name, card=res.card())
    finally:
        if own:
            library.close()
    return JobResult(
        name=job.name,
        tasks=job.tasks,
        status="trained",
        steps=res.steps,
        train_loss=res.train_loss,
        valid_loss=res.valid_loss,
        seconds=res.seconds,
        tokens_per_second=res.tokens_per_second,
    )


@RUNNERS.register("local")
def run_local(jobs: Sequence[Job], spec: JobSpec) -> list[JobResult]:
    """Jobs one after another in this process, on one loaded base model."""
    if not jobs:
        return []
    tasks = {t.id: t for t in load_tasks(sorted({t for j in jobs for t in j.tasks}), spec)}
    base = load_model(spec)
    results = []
    with open_library(spec, base.base_id) as library:
        for job in tqdm(jobs, desc="experts", disable=not spec.progress or len(jobs) == 1):
            job_tasks = [tasks[t] for t in job.tasks]
            results.append(run_job(job, spec, base=base, library=library, tasks=job_tasks))
    return results


def _ray_job(job: Job, spec: JobSpec) -> JobResult:
    return run_job(job, replace(spec, progress=False))


@RUNNERS.register("ray")
def run_ray(jobs: Sequence[Job], spec: JobSpec, *, cpus_per_job: int = 1) -> list[JobResult]:
    """One Ray task per job (a GPU each when training on CUDA); starts Ray if needed."""
    try:
        import ray
    except ImportError:
        raise LorashelfError(
            "the ray runner needs Ray: pip install 'lorashelf[ray]' (or use --runner local)"
        ) from None
    if not jobs:
        return []
    load_tasks(sorted({t for j in jobs for t in j.tasks}), spec)  # fail fast on bad ids
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        gpus = 1 if spec.device.startswith("cuda") else 0
        remote = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus, max_retries=0)(_ray_job)
        pending = {remote.remote(job, spec): job for job in jobs}
        results = []
        bar = tqdm(total=len(jobs), desc="experts (ray)", disable=not spec.progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(done[0])
            results.append(ray.get(done[0]))
            bar.update()
        bar.close()
    finally:
        if started:
            ray.shutdown()
    order = {j.name: i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r.name])


def train_many(
    base_name: str,
    task_ids: Sequence[str],
    library_dir: str | Path,
    config: TrainConfig,
    runner: str | Runner = "local",
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
    an interruption trains only what is missing. ``runner`` is "local", "ray" or any
    callable ``(jobs, spec) -> results``. Results come back in job order.
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
    run = RUNNERS.get(runner) if isinstance(runner, str) else runner
    jobs = plan_jobs(task_ids, joint=joint, name=name)
    with open_library(spec) as library:
        check_fits(library, config)
        have = set(library.names())
    todo = [j for j in jobs if j.name not in have]
    done = {r.name: r for r in run(todo, spec)} if todo else {}
    return [done.get(j.name) or JobResult(j.name, j.tasks, "skipped") for j in jobs]
