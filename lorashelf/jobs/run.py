"""``run_jobs``: make every job's output that the library lacks, with a chosen runner.

The one entry point behind ``lorashelf train``, cluster ``build`` and PHATGOOSE gate
training: it applies the resume rule (:func:`~lorashelf.jobs.plan.pending`), gives
the rest to a runner by name or as a callable, and returns what each job's work
function produced, keyed by job name; skipped jobs are absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from lorashelf.jobs.plan import Named, Shelf, Work, pending
from lorashelf.jobs.runners import RUNNERS, Runner

J = TypeVar("J", bound=Named)
R = TypeVar("R")


def run_jobs(
    jobs: Sequence[J],
    work: Work[J, R],
    library: Shelf,
    *,
    runner: str | Runner = "local",
    desc: str = "jobs",
    progress: bool = True,
    gpus: int = 0,
) -> dict[str, R]:
    """Run ``work`` for each job ``library`` does not hold yet; ``{name: result}`` in job order.

    ``gpus`` is what each job asks a Ray runner for (1 when training on CUDA).
    """
    run = RUNNERS.get(runner) if isinstance(runner, str) else runner
    todo = pending(jobs, library)
    if not todo:
        return {}
    results = run(todo, work, library, desc=desc, progress=progress, gpus=gpus)
    return {job.name: result for job, result in zip(todo, results)}
