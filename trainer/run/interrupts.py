"""Ctrl-C, SIGTERM and SIGHUP for runs in the foreground (``simclr train``, ``python -m trainer``
under ``simclr train --nproc K`` or torchrun): like the SLURM path, every rank stops at the next
step boundary, a checkpoint is written and the MLflow run is closed as KILLED; the exit status is
128 + the signal. A second Ctrl-C aborts at once. Only rank 0 says so.

Under torchrun one Ctrl-C reaches a rank twice within milliseconds (the terminal signals the whole
process group, and torchrun forwards what it got), so a repeat within ``SAME_INTERRUPT_S`` is the
same interrupt; only a later one aborts.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from foundation.logs import get_logger
from foundation.process_rank import speaks_for_the_job
from trainer.config import Config
from trainer.run.loop import train

log = get_logger()

SAME_INTERRUPT_S = 1.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def on_signals(signals: tuple[int, ...], handler: Callable[[int], None]) -> Iterator[list[int]]:
    """The one way a command takes signals: while inside, each of ``signals`` is recorded (the
    yielded list) and then handed to ``handler``; the previous handlers are back on leaving."""
    received: list[int] = []

    def record(signum: int, _frame) -> None:
        received.append(signum)
        handler(signum)

    previous = {sig: signal.signal(sig, record) for sig in signals}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_interruptible(work: Callable[[], int], stopped: Callable[[str], None]) -> int:
    """For commands with no step boundary to stop at (eval, embed): ``work()``'s status, with SIGTERM
    and SIGHUP ending it as Ctrl-C does (KeyboardInterrupt); then ``stopped(signal name)`` says what
    was kept, in one line, and the status is 128 + the signal."""
    def interrupt(_signum: int) -> None:
        raise KeyboardInterrupt

    with on_signals((signal.SIGTERM, signal.SIGHUP), interrupt) as received:
        try:
            return work()
        except KeyboardInterrupt:
            signum = received[0] if received else signal.SIGINT  # Ctrl-C came as KeyboardInterrupt itself
            stopped(signal.Signals(signum).name)
            return 128 + signum


@contextmanager
def stop_on_interrupt(stop: threading.Event, when: str = "at the next step boundary") -> Iterator[list[int]]:
    """While inside, SIGINT, SIGTERM and SIGHUP set ``stop``; yields the signals received. ``when``
    says, in the warning, where the run will stop."""
    first_at = [0.0]
    received: list[int] = []

    def handler(signum: int) -> None:
        now = time.monotonic()
        if received and signum == signal.SIGINT and now - first_at[0] > SAME_INTERRUPT_S:
            log.warning("second Ctrl-C: aborted without a new checkpoint; the last one on disk is intact")
            raise KeyboardInterrupt
        if not received and speaks_for_the_job():
            if sys.stderr.isatty():
                print(file=sys.stderr)  # off the progress bar's line
            log.warning(f"{signal.Signals(signum).name}: stopping {when} with a checkpoint (Ctrl-C again to abort "
                        "at once)")
        if not received:
            first_at[0] = now
        received.append(signum)
        stop.set()

    def abort_while_exiting(signum: int, _frame) -> None:
        if time.monotonic() - first_at[0] <= SAME_INTERRUPT_S:
            return  # the first Ctrl-C delivered again (torchrun)
        log.warning("second Ctrl-C: aborted while exiting; the checkpoint written at the stop is intact")
        sys.stdout.flush()
        os._exit(128 + signum)  # the interpreter's shutdown (MLflow's exit hooks, threads) is skipped

    try:
        with on_signals(STOP_SIGNALS, handler):
            yield received
    finally:
        if received:  # stopped by a signal, and now exiting: a second Ctrl-C still aborts at once, as promised
            signal.signal(signal.SIGINT, abort_while_exiting)


def train_in_foreground(cfg: Config, launched: bool = False) -> int:
    """Train with Ctrl-C/SIGTERM handled; the exit status is 128 + the signal when one stopped the run.
    ``launched``: a rank of our local launcher (``--report-to``), which says how the job ended."""
    stop = threading.Event()
    from trainer.runtime.distributed import makes_a_group

    # the ranks of a group agree to stop every train.stop_check_every steps (loop.stop_requested): say so
    when = (f"within train.stop_check_every={cfg.train.stop_check_every} steps, where the ranks agree to stop"
            if makes_a_group(launched) else "at the next step boundary")
    with stop_on_interrupt(stop, when) as received:
        code = train(cfg, stop=stop, launched=launched).exit_code
    return 128 + received[0] if received and code == 0 else code
