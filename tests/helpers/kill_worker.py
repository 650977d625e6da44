"""One rank of a 2-rank training job started WITHOUT torchrun's supervision (env set by the test),
so the surviving rank has only our collective timeout to notice the dead peer."""

import sys

from launch.cli import main

main(["train", "--in-process", *sys.argv[1:]])
