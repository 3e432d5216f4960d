"""Runners: how a list of pending jobs is worked through, in this process or on Ray.

A runner takes the pending jobs, the work function and the library, hands every job
over (:func:`~lorashelf.jobs.plan.hand_over`) and returns the results in job order.
``local`` runs them one after another in this process, so a work function can keep
one loaded base model for all of them. ``ray`` runs one Ray task per job (``pip
install lorashelf[ray]``), a GPU each when ``gpus=1``; each task pickles the work
function, reopens the library by its path and adds its own expert, which the
library makes safe across processes. The registry lists both, by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tqdm.auto import tqdm

from lorashelf.errors import LorashelfError
from lorashelf.jobs.plan import Shelf, Work, hand_over
from lorashelf.registry import Registry


class Runner(Protocol):
    def __call__(
        self,
        jobs: Sequence[Any],
        work: Work[Any, Any],
        shelf: Shelf,
        *,
        desc: str = "jobs",
        progress: bool = True,
        gpus: int = 0,
    ) -> list[Any]: ...


def run_local(
    jobs: Sequence[Any],
    work: Work[Any, Any],
    shelf: Shelf,
    *,
    desc: str = "jobs",
    progress: bool = True,
    gpus: int = 0,
) -> list[Any]:
    """Jobs one after another in this process (``gpus`` is Ray's business, unused here)."""
    bar = tqdm(jobs, desc=desc, unit="job", disable=not progress or len(jobs) == 1)
    return [hand_over(work, job, shelf) for job in bar]


def _ray_job(work: Work[Any, Any], job: Any, library_dir: str) -> Any:
    from lorashelf.library import Library

    with Library.open(library_dir) as library:
        return hand_over(work, job, library)


def run_ray(
    jobs: Sequence[Any],
    work: Work[Any, Any],
    shelf: Shelf,
    *,
    desc: str = "jobs",
    progress: bool = True,
    gpus: int = 0,
    cpus_per_job: int = 1,
) -> list[Any]:
    """One Ray task per job; starts Ray if needed. ``shelf`` must be a Library on a
    filesystem the workers share (they reopen it by ``shelf.path``)."""
    try:
        import ray
    except ImportError:
        raise LorashelfError(
            "the ray runner needs Ray: pip install 'lorashelf[ray]' (or use --runner local)"
        ) from None
    library_dir = str(shelf.path)  # type: ignore[attr-defined]
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus, max_retries=0)(_ray_job)
        waiting = {remote.remote(work, job, library_dir): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        with tqdm(total=len(jobs), desc=f"{desc} (ray)", disable=not progress) as bar:
            while waiting:
                (ref,), _ = ray.wait(list(waiting), num_returns=1)
                results[waiting.pop(ref)] = ray.get(ref)
                bar.update()
    finally:
        if started:
            ray.shutdown()
    return results


RUNNERS: Registry[Runner] = Registry("runner", {"local": run_local, "ray": run_ray})
