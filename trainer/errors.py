"""User errors: mistakes the user fixes (a config, a dataset, a checkpoint). Every command line
reports them as one line naming the problem and the fix, and exits with status 2 (no traceback)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from data_pipeline.sources import DataError
from trainer import STOPPED_AT_START
from trainer.checkpoint import CheckpointError
from trainer.dataclass_yaml import ConfigError
from trainer.run_files import DiskFullError, RunFileError, RunFolderGoneError, RunFolderInUseError
from trainer.tracking import TrackingError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, TrackingError, DiskFullError,
                                            RunFolderInUseError, RunFolderGoneError, RunFileError)


def exit_code_of(command: Callable[[], int], prog: str = "simclr") -> int:
    """Run ``command``; a user error becomes a one-line message on stderr and status 2, Ctrl-C 130
    (one line, no traceback). A rank started by ``simclr train --nproc K`` writes its line to
    SIMCLR_ERROR_FILE instead, and any other error's traceback beside it: the launcher prints the
    first rank's line once, and decides whether a traceback is the cause of a failure or only a
    consequence of another rank's death."""
    error_file = os.environ.get("SIMCLR_ERROR_FILE")
    try:
        return command()
    except USER_ERRORS as exc:
        line = f"{prog}: error: {exc}"
        if error_file:
            Path(error_file).write_text(line + "\n")
        else:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(STOPPED_AT_START, file=sys.stderr, flush=True)
        return 130
    except Exception:
        if not error_file:
            raise
        import traceback

        Path(f"{error_file}.traceback").write_text(traceback.format_exc())
        return 1
