"""The commands around training: ``simclr bench`` (a benchmark by name), the data tools
(``make-demo-data``, ``make-shards``) and ``simclr sync`` (a run folder replayed into MLflow)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from trainer.runtime.credentials import redact_uri

# simclr bench NAME ...: the named benchmark's module (its main takes the rest); plain simclr bench: throughput
BENCHMARKS = {"feed": "benchmarks.feed",  # does the data pipeline keep the step busy
              "views": "benchmarks.views",  # step time of view specifications
              "startup": "benchmarks.startup",  # start-up on large trees
              "overhead": "benchmarks.overhead",  # our loop vs a bare DDP loop
              "store": "benchmarks.object_store",  # shards from object storage vs local disk
              "kernels": "benchmarks.kernels"}  # SyncBatchNorm vs BatchNorm2d, LARS vs timm's Lars


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    name = bench_args[0] if bench_args[:1] and bench_args[0] in BENCHMARKS else None
    module = importlib.import_module(BENCHMARKS[name] if name else "benchmarks.throughput")
    module.main(bench_args[1:] if name else bench_args)
    return 0


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from data_pipeline.sample_data import make_demo_dataset
    from trainer.runtime.dataclass_yaml import ConfigError

    for flag, value, least in (("--size", args.size, 8), ("--train-per-class", args.train_per_class, 1),
                               ("--val-per-class", args.val_per_class, 1)):
        if value < least:
            raise ConfigError(f"make-demo-data {flag} {value}: must be at least {least}")

    paths = make_demo_dataset(args.out, size=args.size, train_per_class=args.train_per_class,
                              val_per_class=args.val_per_class, seed=args.seed)
    print(f"wrote {paths['train']} and {paths['val']} (ImageFolder JPEG) and .npz twins")
    return 0


def cmd_make_shards(args: argparse.Namespace) -> int:
    from data_pipeline import DataError, open_source
    from data_pipeline.shards import make_shards

    if bool(args.out) == bool(args.out_option):
        raise DataError("make-shards needs one output: a folder or s3://bucket/prefix, as OUT or --out OUT")
    out = args.out or args.out_option
    source = open_source(args.src, args.split, args.labels)
    start, last = time.time(), [0.0]

    def progress(done: int, total: int) -> None:
        if time.time() - last[0] > 5 or done == total:
            last[0] = time.time()
            print(f"  {done}/{total} samples ({done / max(1e-9, time.time() - start):.0f}/s)", flush=True)

    manifest = make_shards(source, out, args.shard_size, seed=args.seed, quality=args.quality,
                           skip_corrupt=args.skip_corrupt, progress=progress)
    kind = f"{len(manifest['classes'])} classes" if manifest["classes"] else "unlabeled"
    print(f"wrote {manifest['samples']} samples ({kind}) as {len(manifest['shards'])} shards into {out}; "
          f"train on them with data.root={out}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from trainer.config import TrackingConfig
    from trainer.tracking import sync_offline

    encoder_file = Path(args.run_dir) / "encoder.pt"

    def log_pending_model(run, pending: dict) -> bool:
        """The encoder's MLflow model, skipped while offline: logged (and registered) now."""
        if not encoder_file.exists():
            return False
        from trainer.evaluation.encoder_loading import load_encoder
        from trainer.evaluation.export import log_encoder_model

        encoder, run_cfg = load_encoder(encoder_file)
        return log_encoder_model(run, encoder, run_cfg.data.image_size, pending.get("register_as", "")) is not None

    run_id, record = sync_offline(args.run_dir, TrackingConfig(uri=args.uri, experiment=args.experiment),
                                  args.run_id, log_pending_model)
    print(f"replayed {args.run_dir} (params, tags, metrics, artifacts) into MLflow run {run_id} at "
          f"{redact_uri(args.uri) or record.get('uri')}")
    return 0
