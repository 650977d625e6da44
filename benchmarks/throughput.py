"""``simclr bench``: where a SimCLR training step spends its time, in one table.

Runs, for one model / image size / per-rank batch / precision on synthetic images, the step
benchmark (``benchmarks.step``: SSL step, phase breakdown, supervised step), the loss at large
global batches (``benchmarks.loss``), the LARS step (``benchmarks.lars``), and on request the
scaling over ranks (``benchmarks.scaling``) and the two data loaders (``benchmarks.pipeline``).
Warm-up steps are excluded; medians and the 25-75% spread are reported. Prints a table, writes
JSON (device, versions, git commit) and a PNG under benchmarks/results/, optionally logs to MLflow.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks.common import RESULTS, device_name, encoder_arch, keep_traces, print_table, result_header, write_json
from benchmarks.lars import bench_lars
from benchmarks.loss import bench_loss
from benchmarks.pipeline import compare_loaders, fallback_data
from benchmarks.scaling import bench_scaling
from benchmarks.step import bench_ssl_step
from benchmarks.sync_batchnorm import bench_sync_batchnorm, print_rows
from trainer.config import DEVICES, TrackingConfig
from trainer.model.precision import AUTOCAST_DTYPES
from trainer.observe.plots import pyplot, save_figure
from trainer.runtime.device import choose_device
from trainer.tracking import MlflowRun


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simclr bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="the others: simclr bench feed (does the data pipeline keep the step busy), "
                                       "views (step time of view specifications), startup (start-up on large trees), "
                                       "overhead (our loop vs a bare DDP loop), store (shards from object storage), "
                                       "kernels (SyncBatchNorm vs BatchNorm2d, LARS vs timm's, with their targets); "
                                       "each takes --help")
    p.add_argument("--arch", default="resnet18", type=encoder_arch, help="encoder: a torchvision ResNet or timm/<name>")
    p.add_argument("--image-size", type=int, default=32, help="side of the synthetic images (px)")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch (images)")
    p.add_argument("--precision", default="fp32", choices=list(AUTOCAST_DTYPES), help="autocast dtype")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when visible")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--iters", type=int, default=5, help="timed steps (medians are reported)")
    p.add_argument("--loss-batches", type=int, nargs="+", default=[1024, 4096],
                   help="global batches for the NT-Xent cost (ours vs the naive full matrix)")
    p.add_argument("--loss-worlds", type=int, nargs="+", default=[8, 64], help="simulated world sizes for the loss")
    p.add_argument("--loss-iters", type=int, default=3, help="timed loss steps per point")
    p.add_argument("--scaling", type=int, nargs="*", default=[], metavar="W",
                   help="also time the same global batch with these world sizes, e.g. 1 2 (torchrun, gloo on CPU)")
    p.add_argument("--loaders", action="store_true", help="also compare the DALI and torchvision loaders")
    p.add_argument("--data", default=None, help="images for --loaders (default: shipped photos)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput_<device>_<cfg>.json)")
    p.add_argument("--mlflow", action="store_true", help="also log the figures to MLflow (default store)")
    p.add_argument("--profile", type=int, nargs=2, default=None, metavar=("START", "END"),
                   help="after the timing, profile steps START+1..END of the SSL step (as train.profile.steps): "
                        "a Chrome/Perfetto trace beside the JSON, in <out>_profile/")
    args = p.parse_args(argv)
    from trainer.config import ConfigError

    for flag, values, least in (("--batch-size", [args.batch_size], 2), ("--image-size", [args.image_size], 8),
                                ("--iters", [args.iters], 1), ("--warmup", [args.warmup], 0),
                                ("--loss-batches", args.loss_batches, 2), ("--loss-worlds", args.loss_worlds, 1),
                                ("--loss-iters", [args.loss_iters], 1), ("--scaling", args.scaling, 1)):
        bad = [v for v in values if v < least]
        if bad:
            raise ConfigError(f"simclr bench {flag} {bad[0]}: must be at least {least}")
    if args.profile and not 0 <= args.profile[0] < args.profile[1]:
        raise ConfigError(f"simclr bench --profile {args.profile[0]} {args.profile[1]}: give START END with "
                          "0 <= START < END, e.g. --profile 2 4 (steps 3 and 4)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = choose_device(args.device)
    loader_data = (Path(args.data) if args.data else fallback_data(max(args.image_size, 64))) if args.loaders else None
    result = {
        **result_header("throughput", device_name(device)),
        "config": {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
                   "precision": args.precision, "warmup": args.warmup, "iters": args.iters},
        "ssl": bench_ssl_step(args.arch, args.image_size, args.batch_size, args.precision, args.warmup, args.iters,
                              device, profile=args.profile),
        "loss": bench_loss(args.loss_batches, args.loss_worlds, args.loss_iters, device),
        "lars": bench_lars(args.arch, args.iters, device),
        # our SyncBatchNorm against BatchNorm2d at ResNet-50's stage shapes (8 images a rank)
        "sync_batchnorm": bench_sync_batchnorm(device, 8, args.iters),
        "scaling": bench_scaling(args.scaling, args.arch, args.image_size, args.batch_size * max(args.scaling),
                                 args.iters) if args.scaling else [],
        "loaders": compare_loaders(loader_data, args.image_size, args.batch_size, os.cpu_count() or 1, 10, device)
        if loader_data else {},
    }
    print_result(result)
    out = Path(args.out) if args.out else RESULTS / (f"throughput_{device.type}_{args.arch}_{args.image_size}px_"
                                                     f"b{args.batch_size}_{args.precision}.json")
    result["ssl"]["profile"] = keep_traces(result["ssl"]["profile"], out)  # the result names the kept copies
    write_json(result, out)
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    if result["ssl"]["profile"]:
        print(f"profile (--profile {args.profile[0]} {args.profile[1]}): {Path(result['ssl']['profile'][0]).parent}")
    if args.mlflow:
        log_to_mlflow(result, out)
    return result


def log_to_mlflow(result: dict, out: Path) -> None:
    """One run in experiment 'simclr-bench' with the configuration, headline figures, JSON and plot."""
    run = MlflowRun(TrackingConfig(experiment="simclr-bench", run_name=out.stem, system_metrics=False),
                    source="simclr bench")
    run.start({**result["config"], "device": result["device"], "git_commit": result["git_commit"]}, {})
    run.log_metrics({"images_per_s": result["ssl"]["images_per_s"], "views_per_s": result["ssl"]["views_per_s"],
                         "ssl_over_supervised_time": result["ssl"]["ssl_over_supervised_time"],
                         "lars_speedup_vs_timm": result["lars"].get("speedup", 0.0),
                         "loss_speedup_vs_naive_max": max(r["speedup"] for r in result["loss"])},
            step=0, time_ms=int(time.time() * 1000))
    run.log_artifact(out)
    run.log_artifact(out.with_suffix(".png"))
    run.finish()
    print(f"logged to {run.describe()}")


def plot(result: dict, out: Path) -> None:
    fig, (phase_ax, loss_ax) = pyplot().subplots(1, 2, figsize=(11, 3.8))
    phases = result["ssl"]["phases"]
    phase_ax.barh(list(phases), [1e3 * v["median_s"] for v in phases.values()])
    phase_ax.set_xlabel("ms per step (median)")
    config = result["config"]
    phase_ax.set_title(f"{config['arch']} {config['image_size']}px b={config['batch_size']} {config['precision']}")
    for world in sorted({r["world"] for r in result["loss"]}):
        rows = [r for r in result["loss"] if r["world"] == world]
        loss_ax.plot([r["global_batch"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"W={world}")
    loss_ax.set_xlabel("global batch")
    loss_ax.set_ylabel("naive / ours (loss fwd+bwd)")
    loss_ax.legend()
    save_figure(fig, out)


def print_result(result: dict) -> None:
    ssl = result["ssl"]
    rows = [("SSL step (2 views)", ssl["ssl_step"]), *[(f"  {k}", v) for k, v in ssl["phases"].items()],
            ("supervised step (1 view)", ssl["supervised_step"])]
    print_table(f"SimCLR step: {result['config']} on {result['device']}",
                [("what", "<28"), ("median ms", ">12.2f"), ("p25", ">10.2f"), ("p75", ">10.2f")],
                [[name, 1e3 * v["median_s"], 1e3 * v["p25_s"], 1e3 * v["p75_s"]] for name, v in rows])
    print(f"images/s {ssl['images_per_s']:.1f}   views/s {ssl['views_per_s']:.1f}   supervised images/s "
          f"{ssl['supervised_images_per_s']:.1f}   SSL/supervised time {ssl['ssl_over_supervised_time']:.2f}x   "
          f"peak memory {ssl['peak_memory_mb']:.0f} MB")
    print_table("the loss and its gather: ours vs a naive all-gather",
                [("global batch", ">12"), ("world", ">7"), ("ours ms", ">10.2f"), ("naive ms", ">10.2f"),
                 ("naive/ours", ">12.2f")],
                [[r["global_batch"], r["world"], r["ours_ms"], r["naive_ms"], r["speedup"]] for r in result["loss"]])
    lars = result["lars"]
    if "ours_ms" in lars:
        print(f"\nLARS step over {lars['n_tensors']} tensors: foreach {lars['foreach_ms']:.2f} ms, per-tensor "
              f"{lars['per_tensor_ms']:.2f} ms, timm {lars['timm_ms']:.2f} ms; chosen here: {lars['chosen']} "
              f"({lars['speedup']:.2f}x timm)")
    print_rows(result["sync_batchnorm"], result["device"])
    if result["scaling"]:
        print_table("scaling over ranks (same global batch)",
                    [("ranks", ">6"), ("step ms", ">10.1f"), ("speedup", ">9.2f"), ("efficiency", ">12.2f")],
                    [[r["world"], 1e3 * r["median_step_s"], r["speedup"], r["efficiency"]] for r in result["scaling"]])
    loaders = result["loaders"]
    if loaders:
        ratio = f"{loaders['dali_over_torchvision']:.2f}x" if "dali_over_torchvision" in loaders else "n/a"
        cells = [f"{name} {loaders[key]:.0f} img/s" if loaders[key] else f"{name} failed: {loaders[key + '_error']}"
                 for name, key in (("DALI", "dali"), ("torchvision", "torchvision"))]
        print(f"\nloaders at {loaders['image_size']} px: {', '.join(cells)}, DALI/torchvision {ratio}")


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
