"""Compute jobs: training, fine-tuning and merging in child processes (DESIGN §1, §8).

Importing this package does not import torch: it exports the worker's parent side (run a job in
a child process, its errors). ``architectures`` (torch modules from specs) and ``finetune``
(deterministic transfer learning) are torch modules, imported by the child.
"""

from node.compute.worker import (
    JOB_KINDS,
    ComputeError,
    InvalidJob,
    InvalidTrainingData,
    JobCrashed,
    JobFailed,
    JobTimeout,
    check_job,
    error_from_report,
    run_job,
    run_job_async,
)

__all__ = [
    "JOB_KINDS",
    "ComputeError",
    "InvalidJob",
    "InvalidTrainingData",
    "JobCrashed",
    "JobFailed",
    "JobTimeout",
    "check_job",
    "error_from_report",
    "run_job",
    "run_job_async",
]
