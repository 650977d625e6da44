"""``simclr demo``: README's first command. Data made from photos shipped with scikit-image and
scikit-learn, a 2-rank CPU pretraining, its evaluation, and the figures as a result file."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from trainer.runtime.credentials import redact_uri


def run_demo(args: argparse.Namespace, command: Callable[[list[str]], int]) -> int:
    """The README's first command: data from shipped photos, 2-rank CPU pretraining, linear probe.
    ``command(argv)`` runs a ``simclr`` command (through the parser, so that every option of the two
    commands has its default)."""
    from data_pipeline.sample_data import make_demo_dataset

    data = Path(args.workdir) / "demo_data"
    if not (data / "train").exists():
        make_demo_dataset(data)
    config = "demo_cpu"  # the shipped recipe, from a clone or an installed wheel
    run_dir = Path(args.workdir) / "runs" / "demo"
    overrides = [f"data.root={data / 'train'}", f"data.val_root={data / 'val'}", f"train.run_dir={run_dir}",
                 "checkpoint.resume=none", "train.overwrite=true", *args.overrides]
    started = time.monotonic()
    rc = command(["train", "--nproc", "2", "--config", config, *overrides])
    if rc != 0:
        return rc
    pretrain_s = time.monotonic() - started
    command(["eval", "--checkpoint", str(run_dir / "encoder.pt"), "--train-data", str(data / "train"), "--val-data",
             str(data / "val"), "--device", "cpu", "--workers", "2", "--probe-epochs", "100", "--tsne", "--mlflow"])
    results = write_demo_results(Path(args.workdir) / "demo_results.json", run_dir, pretrain_s, overrides)
    from trainer.tracking import resolve_tracking_uri, where_to_open

    uri = redact_uri(resolve_tracking_uri(""))
    print(f"\nMLflow run logged to {uri} (experiment 'simclr-demo').\n"
          f"To see it: {where_to_open(uri).replace('mlflow ui', '.venv/bin/mlflow ui')}\n"
          f"Run files (config, checkpoints, metrics.jsonl, curves.png, encoder.pt): {run_dir}\n"
          f"What the encoder learnt, as a picture (queries and their nearest neighbours): "
          f"{run_dir / 'eval' / 'neighbours.png'}\n"
          f"The figures, with the machine, versions and commit they came from: {results}")
    return 0


def write_demo_results(out: Path, run_dir: Path, pretrain_s: float, overrides: list[str]) -> Path:
    """The demo's figures as a result file like every benchmark's (device, versions, commit): README's
    demo table quotes benchmarks/results/demo_cpu.json, a copy of one such file."""
    import torch

    from benchmarks.common import device_name, result_header, write_json
    from trainer.tracking import read_metrics_file

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    rows = read_metrics_file(run_dir / "metrics.jsonl", lenient=True)
    steps = max(row["step"] for row in rows)
    probe = {key: [row[f"probe/{key}"] for row in rows if f"probe/{key}" in row] for key in ("val_top1", "train_top1")}
    result = {**result_header("demo", device_name(torch.device("cpu"))), "recipe": "demo_cpu", "ranks": 2,
              "overrides": [o for o in overrides if not o.startswith(("data.", "train.run_dir"))], "steps": steps,
              "pretrain_wall_s": round(pretrain_s, 1), "rows": report["rows"],
              "online_probe_by_epoch": probe}
    return write_json(result, out)
