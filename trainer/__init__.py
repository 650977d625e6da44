"""simclr-scale trainer: config, model, loss, optimizer, schedule, loop, checkpoints, tracking."""

__version__ = "0.1.0"
