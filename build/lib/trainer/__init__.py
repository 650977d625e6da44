"""simclr-scale trainer: config, model, loss, optimizer, schedule, step, loop, checkpoints, tracking."""
