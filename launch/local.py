"""Single-node launch (``simclr train --nproc K``): K ranks of ``python -m trainer`` on this node,
with the environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).

Started by us rather than through torchrun, so that what users see stays plain:

- **Signals.** The ranks run in their own session: Ctrl-C, ``kill -TERM -- -PGID`` (scancel,
  docker stop, systemd) or a dropped ssh session (SIGHUP) reach this process, which passes the
  signal to every rank once. Each rank stops at a step boundary, checkpoints and closes its MLflow
  run as KILLED; this process exits 128 + the signal, with no traceback. A second Ctrl-C aborts.
- **The ranks die with this process.** Each rank is told by the kernel (``PR_SET_PDEATHSIG``) when
  this process is gone, however it went (``kill -KILL`` included), and stops as on SIGTERM: no
  orphaned rank trains on alone.
- **User errors.** A rank that finds a user error (exit 2) writes its one line to a file instead
  of printing it; this process prints the first rank's line once, stops the other ranks (they may
  wait in a collective for the one that left) and exits 2.
- **Deaths.** A rank killed by a signal, or one that stopped answering (the others time out), is
  named in one line: which rank, how, the newest checkpoint and the command that resumes. The
  other ranks' errors (a consequence) are kept in the run folder's ``failure.log``, not printed;
  the MLflow run is closed FAILED with tags naming the rank. A rank's own exception (a bug) is
  the cause, and its traceback is printed whole.

``torchrun --nproc_per_node=K -m trainer ...`` still works for those who prefer it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from foundation.logs import get_logger
from trainer.run.interrupts import on_signals
from trainer.runtime.distributed import flight_recorder_dumps, free_port, lost_peer, threads_per_rank
from trainer.runtime.rank_report import OPTION as REPORT_OPTION
from trainer.runtime.rank_report import tracebacks, user_errors

log = get_logger()
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 5.0  # after one rank fails, how long the others get to leave on their own
TEMP_PREFIX = "simclr_ranks_"
PR_SET_PDEATHSIG = 1


@dataclass
class JobContext:
    """What the launcher tells a user when a rank dies: the job's name, its run folder (where the
    newest checkpoint, the run's MLflow record and ``failure.log`` live; None for an evaluation) and
    the command that continues it."""

    what: str  # "training", "evaluation", "embedding"
    again: str  # the command to run again (a resume for training)
    run_dir: Path | None = None
    timeout_knob: str = "dist.timeout_s"  # what sets how long a rank waits for the others


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": threads_per_rank(nproc)}


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process ends (Linux's
    ``PR_SET_PDEATHSIG``); None where that call does not exist."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call: nobody would tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def remove_stale_temp_folders() -> None:
    """The error folders of launchers that were killed before they could remove their own."""
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = folder.name[len(TEMP_PREFIX):].split("_", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's live launcher
            pass


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (R, S, D, T stopped, Z...), '' when unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def run_local_ranks(nproc: int, args: list[str], module: str = "trainer", job: JobContext | None = None) -> int:
    """Run ``python -m <module> <args>`` as ``nproc`` ranks in the foreground (the training job, or
    ``launch eval``); returns 0, 128 + the signal that stopped it, 2 for a user error (its line
    printed once), or the first failing rank's status (a death said in one line, see the module)."""
    remove_stale_temp_folders()
    error_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}_"))
    try:
        return _run(nproc, args, module, job, error_dir)
    finally:
        shutil.rmtree(error_dir, ignore_errors=True)


def _run(nproc: int, args: list[str], module: str, job: JobContext | None, error_dir: Path) -> int:
    port = free_port()
    preexec = die_with_parent()
    # each rank reports what ended it into error_dir (trainer/runtime/rank_report.py); after a launch
    # subcommand's name (eval, embed), or first for python -m trainer
    at = 1 if module == "launch" else 0
    args = [*args[:at], REPORT_OPTION, str(error_dir), *args[at:]]
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=rank_env(r, nproc, port),
                              start_new_session=True, preexec_fn=preexec) for r in range(nproc)]
    ended_at: dict[int, float] = {}  # rank -> when it ended (the first failure is the cause)

    def forward(signum: int) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    hung: dict[int, str] = {}  # ranks still there after the grace period: how they looked
    with on_signals(FORWARDED, forward) as received:
        failed_at = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            for r, p in enumerate(procs):
                if p.returncode is not None:
                    ended_at.setdefault(r, now)
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs) and not received:
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_S:
                for r, p in enumerate(procs):  # blocked in a collective with the rank that left: nothing to save
                    if p.poll() is None and r not in hung:
                        # its state before our SIGKILL: once killed it reads R or Z until reaped
                        hung[r] = process_state(p.pid)
                        p.kill()
            time.sleep(0.1)
    now = time.monotonic()
    for r in range(nproc):
        ended_at.setdefault(r, now)
    codes = [p.returncode for p in procs]
    errors = user_errors(error_dir)
    if errors and not received:
        print(errors[0], file=sys.stderr, flush=True)
        return 2
    if received:
        return 130 if 130 in codes else 128 + received[0]
    if all(c == 0 for c in codes):
        return 0
    cause = report_death(codes, ended_at, hung, error_dir, job)
    if cause in hung:  # killed by us after it hung: the job's status is that of a rank that gave up on it
        cause = next((r for r in range(nproc) if codes[r] != 0 and r not in hung), cause)
    code = codes[cause]
    return 128 - code if code < 0 else code  # a rank killed by signal N: 128 + N, as a shell reports it


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def report_death(codes: list[int | None], ended_at: dict[int, float], hung: dict[int, str], error_dir: Path,
                 job: JobContext | None) -> int:
    """One line naming the rank that ended the job and how, the newest checkpoint and the command
    that continues; the other ranks' tracebacks into the run folder's ``failure.log``; the MLflow
    run closed FAILED with tags. A rank's own exception (no signal, no hang) is printed whole.
    Returns the rank that caused the end."""
    failures = tracebacks(error_dir)
    by_time = sorted(range(len(codes)), key=lambda r: ended_at[r])
    # NCCL's watchdog ends a rank whose collective timed out with SIGABRT: beside a hung rank, a consequence
    aborted = {r for r in by_time if hung and codes[r] == -signal.SIGABRT}
    killed = [r for r in by_time if codes[r] is not None and codes[r] < 0 and r not in hung and r not in aborted]
    failed = [r for r in by_time if codes[r] not in (0, None) and r not in hung and r not in aborted]
    # a rank's own error before one that only lost its peers (ranks ending within one poll tie on time)
    failed.sort(key=lambda r: lost_peer(failures.get(r, "")))
    first_failed = failed[0] if failed else None
    peers_lost = first_failed is not None and lost_peer(failures.get(first_failed, ""))
    if killed:
        cause, how = killed[0], f"was killed by {signal_name(-codes[killed[0]])}"
    elif hung and (peers_lost or first_failed is None):
        cause = min(hung)
        state = {"T": "stopped (SIGSTOP or a debugger)", "D": "stuck in the kernel (I/O)",
                 "Z": "a zombie"}.get(hung[cause], "hung")
        how = (f"stopped answering ({state}); the other ranks gave up after "
               f"{job.timeout_knob if job is not None else 'their timeout'}")
    else:
        cause = first_failed if first_failed is not None else by_time[0]
        how = f"failed (exit status {codes[cause]})"
        if cause in failures:  # a bug: the cause's traceback is what the user needs
            print(failures[cause].rstrip("\n"), file=sys.stderr, flush=True)
    what = job.what if job is not None else "job"
    parts = [f"rank {cause} {how}; the {what} stopped"]
    if job is not None and job.run_dir is not None:
        parts += _record_failure(job.run_dir, cause, how, failures)
        dumps = flight_recorder_dumps(job.run_dir) if hung or peers_lost else None
        if dumps:  # NCCL's record of the collective each rank was in when the others gave up
            parts.append(dumps)
    if job is not None:
        parts.append(f"{'Resume' if job.run_dir is not None else 'Run it again'} with: {job.again}")
    log.error(". ".join(parts))
    return cause


def _record_failure(run_dir: Path, rank: int, how: str, failures: dict[int, str]) -> list[str]:
    """The run folder's side of a death: the ranks' tracebacks kept, the MLflow run closed FAILED
    with tags naming the rank, and the newest checkpoint named. Returns the sentences to say."""
    from trainer.state.checkpoint import latest_checkpoint

    said = []
    newest = latest_checkpoint(run_dir)
    said.append(f"Newest checkpoint: {newest}" if newest else "No checkpoint was written yet (it restarts at step 0)")
    if failures:
        log = run_dir / "failure.log"
        try:
            log.write_text("".join(f"--- rank {r} ---\n{text}\n" for r, text in sorted(failures.items())))
            said.append(f"The other ranks' errors (a consequence) are in {log}")
        except OSError:
            pass
    closed = close_run_failed(run_dir, rank, how)
    if closed:
        said.append(closed)
    return said


def close_run_failed(run_dir: Path, rank: int, how: str) -> str | None:
    """Close the run's MLflow run as FAILED (rank 0 may have died before it could) with tags
    ``simclr.failed_rank`` and ``simclr.failure``; the run record says FAILED too. Returns what to
    say, or None when the run has no MLflow run yet."""
    from trainer.tracking import TrackingError, close_recorded_run

    try:
        return close_recorded_run(run_dir, "FAILED", {"simclr.failed_rank": str(rank), "simclr.failure": how})
    except TrackingError as exc:
        return str(exc)
