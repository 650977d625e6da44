"""The model and what trains it: encoders, the SimCLR network, SyncBatchNorm, the optimizer, the
schedule, mixed precision."""
