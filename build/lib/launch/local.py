"""Single-node launch (``simclr train --nproc K``): K ranks of ``python -m trainer`` on this node,
with the environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).

Started by us rather than through torchrun, so that what users see stays plain:

- **Signals.** The ranks run in their own session: Ctrl-C, ``kill -TERM -- -PGID`` (scancel,
  docker stop, systemd) or a dropped ssh session (SIGHUP) reach this process, which passes the
  signal to every rank once. Each rank stops at a step boundary, checkpoints and closes its MLflow
  run as KILLED; this process exits 128 + the signal, with no traceback. A second Ctrl-C aborts.
- **User errors.** A rank that finds a user error (exit 2) writes its one line to a file instead
  of printing it; this process prints the first rank's line once, stops the other ranks (they may
  wait in a collective for the one that left) and exits 2.

``torchrun --nproc_per_node=K -m trainer ...`` still works for those who prefer it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.distributed import free_port

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 5.0  # after one rank fails, how long the others get to leave on their own


def rank_env(rank: int, nproc: int, port: int, error_dir: Path) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
            "SIMCLR_ERROR_FILE": str(error_dir / f"rank{rank}"), "SIMCLR_LAUNCHED": "1"}


def run_local_ranks(nproc: int, args: list[str], module: str = "trainer") -> int:
    """Run ``python -m <module> <args>`` as ``nproc`` ranks in the foreground (the training job, or
    ``launch eval``); returns 0, 128 + the signal that stopped it, 2 for a user error (its line
    printed once), or the first failing rank's status."""
    error_dir = Path(tempfile.mkdtemp(prefix="simclr_ranks_"))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=rank_env(r, nproc, port, error_dir),
                              start_new_session=True) for r in range(nproc)]
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs) and not received:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                for p in procs:  # blocked in a collective with the rank that left: nothing to save
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    errors = sorted(error_dir.glob("rank*"), key=lambda f: int(f.name[4:]))
    if errors and not received:
        print(errors[0].read_text().rstrip("\n"), file=sys.stderr, flush=True)
        return 2
    if received:
        return 130 if 130 in codes else 128 + received[0]
    code = next((c for c in codes if c != 0), 0)
    return 128 - code if code < 0 else code  # a rank killed by signal N: 128 + N, as a shell reports it
