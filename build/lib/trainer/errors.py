"""User errors: mistakes the user fixes (a config, a dataset, a checkpoint). Every command line
reports them as one line naming the problem and the fix, and exits with status 2 (no traceback)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from data_pipeline.sources import DataError
from trainer.checkpoint import CheckpointError
from trainer.dataclass_yaml import ConfigError
from trainer.run_files import DiskFullError
from trainer.tracking import TrackingError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, TrackingError, DiskFullError)


def exit_code_of(command: Callable[[], int], prog: str = "simclr") -> int:
    """Run ``command``; a user error becomes a one-line message on stderr and status 2, Ctrl-C 130.
    A rank started by ``simclr train --nproc K`` writes its line to SIMCLR_ERROR_FILE instead: the
    launcher prints the first rank's line once, not one per rank."""
    try:
        return command()
    except USER_ERRORS as exc:
        line = f"{prog}: error: {exc}"
        if os.environ.get("SIMCLR_ERROR_FILE"):
            Path(os.environ["SIMCLR_ERROR_FILE"]).write_text(line + "\n")
        else:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
