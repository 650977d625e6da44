"""``python -m trainer --config FILE [key=value ...]``: one rank of a training job, the program that
torchrun starts (``torchrun --nproc_per_node=K -m trainer --config ...``, and ``simclr train --nproc K``
through it). Needs nothing from ``launch``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    # imported here: a Ctrl-C while torch loads is one line (below), not an import traceback
    from foundation.logs import configure
    from trainer.config import load_config
    from trainer.run.interrupts import train_in_foreground
    from trainer.runtime.errors import exit_code_of
    from trainer.runtime.rank_report import HELP, OPTION, RankReport

    parser = argparse.ArgumentParser(prog="python -m trainer", description="one rank of a SimCLR pretraining job")
    parser.add_argument("--config", help="YAML recipe (see configs/); defaults apply when omitted")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.5")
    parser.add_argument(OPTION, default=None, metavar="DIR", help=HELP)
    args = parser.parse_args(argv)
    configure()
    report = RankReport.given(args.report_to)
    return exit_code_of(lambda: train_in_foreground(load_config(args.config, args.overrides),
                                                    launched=report is not None), report=report)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        from foundation.process_rank import speaks_for_the_job

        if speaks_for_the_job():
            from trainer import STOPPED_AT_START

            print(STOPPED_AT_START, file=sys.stderr, flush=True)
        sys.exit(130)
