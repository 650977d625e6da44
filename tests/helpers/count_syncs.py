"""Count the host-synchronising calls of a steady-state window of training steps.

What counts is ``tests.helpers.sync_counter.SyncCounter``'s list; the CPU run counts the same calls
as a GPU run would make, so a sync added to the step fails CI without a GPU.

``count_window_syncs(cfg)`` trains ``cfg`` and counts everything the loop does from the start of
step ``log_every + 1`` to the start of step ``2 * log_every``: whole steps and loop bodies between
two log windows, except the time spent inside the loader (the data pipeline's own host work).
As a script under torchrun: ``count_syncs.py OUT key=value ...`` writes each rank's counts.
"""

from __future__ import annotations

import json
import sys

from tests.helpers.sync_counter import SyncCounter


class PausingLoader:
    """The run's loader, with counting paused while it produces a batch."""

    def __init__(self, loader, counter: SyncCounter) -> None:
        self.loader, self.counter = loader, counter

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            with self.counter.paused():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


def count_window_syncs(cfg) -> dict[str, int]:
    """Train ``cfg`` (at least ``2 * train.log_every`` steps) and return the syncs counted over the
    window of steps ``log_every + 1 .. 2 * log_every - 1`` with their loop bodies."""
    import trainer.run.loop as loop

    counter, window = SyncCounter(), cfg.train.log_every
    real_build, real_step, calls = loop.build_parts, loop.train_step, [0]

    def build_parts(cfg, info):
        parts = real_build(cfg, info)
        parts.loader = PausingLoader(parts.loader, counter)
        return parts

    def train_step(*args, **kwargs):
        calls[0] += 1
        counter.active = window + 1 <= calls[0] < 2 * window
        return real_step(*args, **kwargs)

    loop.build_parts, loop.train_step = build_parts, train_step
    try:
        with counter.installed():
            loop.train(cfg)
    finally:
        loop.build_parts, loop.train_step = real_build, real_step
    assert calls[0] >= 2 * window, f"only {calls[0]} steps ran; the window needs {2 * window}"
    return dict(counter.counts)


if __name__ == "__main__":
    from trainer.config import load_config

    counts = count_window_syncs(load_config(None, sys.argv[2:]))
    rank = int(__import__("os").environ.get("RANK", "0"))
    with open(f"{sys.argv[1]}.rank{rank}", "w") as f:
        json.dump(counts, f)
