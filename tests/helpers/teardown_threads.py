"""Under torchrun (2 gloo ranks): make the group with init_distributed, gather, import torchvision
(as the loaders do, lazily, after the group exists), tear down; each rank writes argv[1].rank<R>:
the names of the threads it still runs."""

import json
import os
import sys

from foundation import collectives
from trainer.config import DistConfig
from trainer.runtime.distributed import init_distributed, teardown

assert "torchvision" not in sys.modules, "the helper must import torchvision after the group exists"
info = init_distributed(DistConfig(), "cpu")
collectives.gather_objects(info.rank)
import torchvision  # noqa: E402, F401

teardown()
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
with open(f"{sys.argv[1]}.rank{info.rank}", "w") as f:
    json.dump(names, f)
