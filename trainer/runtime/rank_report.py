"""How a rank tells the local launcher that started it (``simclr train|eval|embed --nproc K``) what
ended it: the one channel between them, files in a folder the launcher names.

The launcher passes ``--report-to DIR`` to every rank, as an argument like any other. A rank given it

- writes a user error's one line to ``DIR/rank<N>`` instead of printing it (the launcher prints the
  first rank's line once, not K times);
- writes any other error's traceback to ``DIR/rank<N>.traceback`` (the launcher decides whether it is
  the cause of a failure or only the consequence of another rank's death, ``lost_peer``);
- leaves saying how the job ended, and naming a rank that did not come, to the launcher, which sees
  them all.

A rank started any other way (torchrun, SLURM, by hand) prints its own errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from foundation.process_rank import launched_rank

OPTION = "--report-to"
HELP = "set by the local launcher (--nproc K): the folder where this rank reports what ended it"


@dataclass(frozen=True)
class RankReport:
    folder: Path
    rank: int

    @classmethod
    def given(cls, folder: str | None) -> RankReport | None:
        """The report of this rank (RANK from the launcher's environment) when ``--report-to`` was given."""
        return None if folder is None else cls(Path(folder), launched_rank())

    def user_error(self, line: str) -> None:
        (self.folder / f"rank{self.rank}").write_text(line + "\n")

    def traceback(self, text: str) -> None:
        (self.folder / f"rank{self.rank}.traceback").write_text(text)


def user_errors(folder: Path) -> list[str]:
    """The ranks' user-error lines, by rank."""
    files = sorted(folder.glob("rank*[0-9]"), key=lambda f: int(f.name[4:]))
    return [f.read_text().rstrip("\n") for f in files]


def tracebacks(folder: Path) -> dict[int, str]:
    """Each failed rank's traceback, by rank."""
    return {int(f.name[4:].split(".")[0]): f.read_text() for f in folder.glob("rank*.traceback")}
