"""User errors: mistakes the user fixes (a config, a dataset, a checkpoint). Every command line
reports them as one line naming the problem and the fix, and exits with status 2 (no traceback)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from data_pipeline.sources import DataError
from trainer.checkpoint import CheckpointError
from trainer.dataclass_yaml import ConfigError
from trainer.run_files import DiskFullError
from trainer.tracking import TrackingError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError, TrackingError, DiskFullError)


def exit_code_of(command: Callable[[], int], prog: str = "simclr") -> int:
    """Run ``command``; a user error becomes a one-line message on stderr and status 2, Ctrl-C 130."""
    try:
        return command()
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
