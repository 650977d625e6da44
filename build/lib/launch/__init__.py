"""Launchers: the ``simclr`` command line, local torchrun, and SLURM through submitit."""
