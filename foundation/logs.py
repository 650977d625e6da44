"""The one way our code says something: the ``simclr`` logger (``simclr.tracking``, ``simclr.data``
... below it), shown on the console as ``[simclr] ...`` (``[tracking] ...`` for the tracking's).

- INFO goes to stdout, WARNING and above to stderr, as the plain prints did;
- ranks other than 0 show only warnings and errors (what a rank has of its own to say);
- ``simclr --verbose`` (every rank: ``SIMCLR_VERBOSITY=verbose``) shows DEBUG lines and the
  libraries' INFO (MLflow's), ``simclr --quiet`` only warnings and errors;
- a training run's log also goes to ``RUN_DIR/simclr.log`` (rank 0), with times and levels.

Importing sets nothing up: the entry points install the console handler (``configure``): the
``simclr`` command, a rank (``python -m trainer``, a SLURM task), a benchmark run as a script, the
test suite. A library user calls ``foundation.logs.configure()`` for the same lines; without it,
Python's own last-resort handler shows warnings and errors only, as with any library.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from foundation.process_rank import launched_rank

ROOT = "simclr"
VERBOSITY = "SIMCLR_VERBOSITY"  # verbose | quiet | '' (the ranks inherit what simclr was given)


def get_logger(name: str = "") -> logging.Logger:
    """``simclr`` or ``simclr.<name>``."""
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


class _Prefix(logging.Formatter):
    """``[simclr] message``, ``[simclr] warning: message`` (the level said by the record, never
    written into the text); the tracking's lines say ``[tracking]``."""

    def format(self, record: logging.LogRecord) -> str:
        tag = "tracking" if record.name.startswith(f"{ROOT}.tracking") else ROOT
        level = ("error: " if record.levelno >= logging.ERROR else
                 "warning: " if record.levelno >= logging.WARNING else "")
        return f"[{tag}] {level}{record.getMessage()}"


class _ConsoleHandler(logging.Handler):
    """INFO to stdout, WARNING+ to stderr: the streams of the moment (a test's capture, a redirect)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def verbosity() -> str:
    return os.environ.get(VERBOSITY, "")


def configure(verbosity_now: str | None = None) -> None:
    """Install (once) or adjust the console handler for this process's rank and verbosity."""
    logger = get_logger()
    logger.propagate = False
    handler = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        handler.setFormatter(_Prefix())
        logger.addHandler(handler)
    level = verbosity() if verbosity_now is None else verbosity_now
    rank = launched_rank()
    logger.setLevel(logging.DEBUG if level == "verbose" else logging.INFO)
    handler.setLevel(logging.WARNING if level == "quiet" or rank != 0 else logging.DEBUG)


def set_verbosity(level: str) -> None:
    """``simclr --verbose`` / ``--quiet``: this process and every rank it starts."""
    os.environ[VERBOSITY] = level
    configure(level)


@contextmanager
def run_log_file(run_dir: str | Path) -> Iterator[Path | None]:
    """While inside, the ``simclr`` logger also writes to ``RUN_DIR/simclr.log`` (appended across the
    jobs of a run, with times and levels). A folder that cannot take it costs only the file."""
    path = Path(run_dir) / "simclr.log"
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        yield None
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logger = get_logger()
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()

