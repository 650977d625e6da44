"""Single-node launch: start K ranks with torchrun, each running ``python -m trainer``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: list[str], port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", "-m", "trainer", *args]


def run_torchrun(nproc: int, args: list[str]) -> int:
    """Run the job in the foreground; returns its exit status (non-zero if any rank failed)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(nproc, args), env=env)
