"""The bottom layer: what every package may import and which imports none of them.

Today: ``collectives`` (every collective of the product and the rules for where its tensors live).
The data pipeline, the trainer, the benchmarks and the launchers all reach it; it reaches only torch.
"""
