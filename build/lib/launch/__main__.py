"""``python -m launch ...`` is the same as the ``simclr`` command."""

from launch.cli import main

main()
