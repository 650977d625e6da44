"""User errors: mistakes the user fixes (a config, a dataset, a checkpoint). Every command line
reports them as one line naming the problem and the fix, and exits with status 2 (no traceback)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from foundation.errors import UserError
from foundation.process_rank import speaks_for_the_job
from trainer import STOPPED_AT_START
from trainer.runtime.rank_report import RankReport


def exit_code_of(command: Callable[[], int], prog: str = "simclr", report: RankReport | None = None) -> int:
    """Run ``command``; a user error becomes a one-line message on stderr and status 2, Ctrl-C 130
    (one line, no traceback). A rank started by our launcher reports to it instead (``report``,
    trainer/runtime/rank_report.py)."""
    try:
        return command()
    except UserError as exc:
        line = f"{prog}: error: {exc}"
        if report is not None:
            report.user_error(line)
        else:
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speaks_for_the_job():
            print(STOPPED_AT_START, file=sys.stderr, flush=True)
        return 130
    except Exception:
        if report is None:
            raise
        import traceback

        report.traceback(traceback.format_exc())
        return 1
