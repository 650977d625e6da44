"""Every use of submitit's private API, in one place. submitit offers no public call to requeue the
running job or to show the sbatch file it would submit; we rely on two private ones, and
``tests/test_slurm.py::test_the_private_submitit_calls_we_rely_on_still_exist`` fails loudly, naming
the call, when a submitit release changes them."""

from __future__ import annotations

from typing import Any

# what submitit itself runs in the job ('%j': SLURM's job id)
SUBMIT_COMMAND = "python -u -m submitit.core._submit '%j'"


def requeue_running_job(times_left: int) -> None:
    """Requeue this SLURM job (as submitit's own pre-emption handler does), allowing ``times_left``
    more requeues; call on rank 0 only."""
    from submitit import JobEnvironment

    JobEnvironment()._requeue(times_left)


def submission_script(executor: Any, array_size: int = 1) -> str:
    """The sbatch file ``executor`` (a submitit.AutoExecutor for SLURM) would submit: one job, or an
    array of ``array_size`` tasks."""
    inner = executor._executor
    saved = dict(inner.parameters)
    if array_size > 1:
        inner.parameters["map_count"] = array_size  # what submitit sets for an array submission
    try:
        return inner._make_submission_file_text(SUBMIT_COMMAND, "dry-run")
    finally:
        inner.parameters = saved
