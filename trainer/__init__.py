"""simclr-scale trainer: config, model, loss, optimizer, schedule, step, loop, checkpoints, tracking."""

# said by every way a Ctrl-C can end a run before its first step (here: importable before torch loads)
STOPPED_AT_START = "[simclr] SIGINT: stopped during start-up, before the first step; nothing was trained"
