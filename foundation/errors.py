"""The one base of every user error: a mistake the user fixes (a config, a dataset, a checkpoint, a
store, a run folder). Each command reports one as a line naming the problem and the fix, with exit
status 2 and no traceback (``trainer.runtime.errors.exit_code_of``); a new kind of mistake subclasses it and
is reported the same way, with nothing to register."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user fixes; its message names the problem and the fix."""
