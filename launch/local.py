"""Single-node launch: start K ranks with torchrun, each running ``python -m trainer``."""

from __future__ import annotations

import os
import subprocess

from trainer.distributed import torchrun_command


def run_torchrun(nproc: int, args: list[str]) -> int:
    """Run the job in the foreground; returns its exit status (non-zero if any rank failed)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(nproc, ["-m", "trainer", *args]), env=env)
