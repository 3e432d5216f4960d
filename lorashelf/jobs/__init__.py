"""Resumable runs that write experts (or what is derived from them) into a library.

``train``, cluster ``build`` and PHATGOOSE gate training all have the same shape: a
list of named jobs, a work function that makes one job's output in a directory, and a
library that already holds some of them. :func:`run_jobs` skips what the library has,
runs the rest with a registered runner (``local`` or ``ray``) and hands each finished
directory over in one atomic add. This package sits to the right of ``library/`` in
the data flow, so ``train/`` stays free of library imports.
"""

from lorashelf.jobs.plan import Job, Output, Shelf, hand_over, pending
from lorashelf.jobs.run import run_jobs
from lorashelf.jobs.runners import RUNNERS, Runner

__all__ = ["RUNNERS", "Job", "Output", "Runner", "Shelf", "hand_over", "pending", "run_jobs"]
