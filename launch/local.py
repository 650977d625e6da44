"""Single-node launch: start K ranks with torchrun, each running ``python -m trainer``."""

from __future__ import annotations

import os
import signal
import subprocess

from trainer.distributed import torchrun_command


def run_torchrun(nproc: int, args: list[str]) -> int:
    """Run the job in the foreground; returns its exit status (non-zero if any rank failed).

    Ctrl-C reaches torchrun and the ranks from the terminal; this process only waits for them to
    checkpoint and exit (it must not kill torchrun, which would orphan the ranks). A SIGTERM sent
    to this process alone is passed on to torchrun, which passes it to the ranks."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, ["-m", "trainer", *args]), env=env)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
