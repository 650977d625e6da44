"""This process's rank as its launcher named it, known before any process group exists (the
``RANK`` variable torchrun, ``simclr train --nproc`` and our SLURM tasks set): who prints the job's
one line at start-up, at a signal or at an error. Inside a run, ``DistInfo`` (trainer/runtime/distributed.py)
carries it; this module is the one place that reads the variable."""

from __future__ import annotations

import os


def launched_rank() -> int:
    """The rank the launcher gave this process; 0 for a process started alone."""
    return int(os.environ.get("RANK", "0") or 0)


def speaks_for_the_job() -> bool:
    """Whether this process says the job's lines (rank 0, or a process started alone)."""
    return launched_rank() == 0
