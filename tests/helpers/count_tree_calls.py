"""Under torchrun (2 gloo ranks): build the training loader on argv[1] with the run folder argv[2]
(listing, then the file check), counting on each rank the folder listings and stats under the tree
and the files it checked; each rank writes argv[3].rank<R>."""

import json
import os
import sys

import torch

import data_pipeline.file_checks as file_checks
from data_pipeline import build_loader
from data_pipeline.config import DataConfig
from trainer.config import DistConfig
from trainer.runtime.distributed import init_distributed, teardown

root, run_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
info = init_distributed(DistConfig(), "cpu")
calls = {"scandir": 0, "listdir": 0, "stat": [], "checked": 0}


def under(path) -> bool:
    return os.fsdecode(os.fspath(path)).startswith(root)


def counting(name, real):
    def wrapper(path=".", *args, **kwargs):
        if under(path):
            if name == "stat":
                calls["stat"].append(os.fsdecode(os.fspath(path)))
            else:
                calls[name] += 1
        return real(path, *args, **kwargs)
    return wrapper


real_check = file_checks.check_image_file


def checking(path):
    calls["checked"] += 1
    return real_check(path)


os.scandir, os.listdir = counting("scandir", os.scandir), counting("listdir", os.listdir)
os.stat, os.lstat = counting("stat", os.stat), counting("stat", os.lstat)
file_checks.check_image_file = checking
cfg = DataConfig(root=root, backend="torchvision", batch_size=8, num_workers=0)
loader = build_loader(cfg, 0, info.rank, info.world_size, torch.device("cpu"), index_folder=run_dir)
loader.check_files()
with open(f"{out}.rank{info.rank}", "w") as f:
    json.dump({**calls, "samples": len(loader.source), "classes": loader.source.classes}, f)
teardown()
