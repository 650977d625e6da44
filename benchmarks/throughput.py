"""Training-throughput benchmark (``simclr bench``): where a SimCLR step spends its time.

Measures, for one model / image size / per-rank batch / precision on synthetic images:
  * the full SSL step (two views, gathered NT-Xent, optimizer) un-instrumented -> images/s, views/s;
  * a phase breakdown (forward, loss + gather, backward + all-reduce, optimizer), each phase timed
    with a device synchronise around it (so phases add up to a little more than the real step);
  * the plain supervised step of the same encoder (one view, cross-entropy) for the SSL overhead;
  * our NT-Xent (local rows x global columns) vs the naive full 2N x 2N matrix at large global
    batches, simulating the per-rank cost of a world of W ranks;
  * our foreach LARS step vs timm's per-parameter Lars on the same model.
Warm-up steps are excluded; medians and the 25-75% spread are reported. Prints a table, writes
JSON (with device, versions, git commit) and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.config import ModelConfig, OptimConfig
from trainer.loss import nt_xent, nt_xent_full_matrix
from trainer.model import build_model
from trainer.optim import build_optimizer
from trainer.tracking import git_commit, library_versions

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "p25_s": q[0], "p75_s": q[2], "n": len(samples)}


def bench_ssl_step(args, device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=args.arch, cifar_stem=args.image_size <= 64)
    model = build_model(cfg, device)
    opt = build_optimizer(model, OptimConfig(name="lars"), lr=0.1)
    amp = DTYPES[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    b, s = args.batch_size, args.image_size
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    images = torch.randn(2 * b, 3, s, s, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (b,), device=device)

    def forward():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model(images).chunk(2)

    def step():
        z1, z2 = forward()
        loss, _ = nt_xent(z1, z2, 0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    full = timed(step, device, args.warmup, args.iters)

    phases: dict[str, list[float]] = {k: [] for k in ("forward", "loss_gather", "backward_allreduce", "optimizer")}
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        z1, z2 = forward()
        _sync(device)
        t1 = time.perf_counter()
        loss, _ = nt_xent(z1, z2, 0.1)
        _sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        _sync(device)
        t3 = time.perf_counter()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        t4 = time.perf_counter()
        if i >= args.warmup:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(dt)

    # the supervised step: same encoder, one view, a linear classifier, cross-entropy
    encoder = model.encoder
    head = torch.nn.Linear(model.feature_dim, 1000).to(device)
    sup_opt = build_optimizer(torch.nn.ModuleList([encoder, head]), OptimConfig(name="lars"), lr=0.1)
    one_view = images[:b].contiguous(memory_format=fmt)

    def sup_step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(head(encoder(one_view)).float(), labels)
        sup_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(sup_opt)
        scaler.update()

    sup = timed(sup_step, device, args.warmup, args.iters)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
    ssl_med, sup_med = statistics.median(full), statistics.median(sup)
    return {
        "ssl_step": summary(full), "images_per_s": b / ssl_med, "views_per_s": 2 * b / ssl_med,
        "phases": {k: summary(v) for k, v in phases.items()},
        "supervised_step": summary(sup), "supervised_images_per_s": b / sup_med,
        "ssl_over_supervised_time": ssl_med / sup_med, "peak_memory_mb": peak,
    }


def _ours_loss_fn(local, cols, n, global_batch, device):
    """This rank's 2n rows against the 2N global columns (what ``nt_xent`` computes after the gather)."""

    def run():
        z = F.normalize(local.float(), dim=1)
        logits = z @ F.normalize(cols, dim=1).T / 0.1
        idx = torch.arange(n, device=device)
        rows = torch.arange(2 * n, device=device)
        minus_inf = torch.tensor(float("-inf"), device=device)
        logits = logits.index_put((rows, torch.cat([idx, idx + global_batch])), minus_inf)
        F.cross_entropy(logits, torch.cat([idx + global_batch, idx])).backward()

    return run


def _naive_loss_fn(full_in, global_batch):
    def run():
        nt_xent_full_matrix(full_in[:global_batch], full_in[global_batch:], 0.1).backward()

    return run


def bench_loss(args, device) -> list[dict]:
    """Per-rank cost of the loss (fwd+bwd) at global batch N for a world of W ranks: ours computes
    2n x 2N logits (n = N/W); the naive version builds the full 2N x 2N matrix on every rank."""
    rows = []
    for global_batch in args.loss_batches:
        for world in args.loss_worlds:
            n = global_batch // world
            g = torch.Generator(device=device).manual_seed(0)
            z_all = torch.randn(2 * global_batch, 128, device=device, generator=g)
            local = z_all[: 2 * n].clone().requires_grad_()
            cols = torch.cat([z_all[:global_batch], z_all[global_batch:]])

            ours = _ours_loss_fn(local, cols, n, global_batch, device)
            full_in = z_all.clone().requires_grad_()
            naive = _naive_loss_fn(full_in, global_batch)

            t_ours = statistics.median(timed(ours, device, 2, args.loss_iters))
            t_naive = statistics.median(timed(naive, device, 2, args.loss_iters))
            rows.append({"global_batch": global_batch, "world": world, "ours_ms": 1e3 * t_ours,
                         "naive_ms": 1e3 * t_naive, "speedup": t_naive / t_ours})
    return rows


def bench_lars(args, device) -> dict:
    try:
        from timm.optim import Lars
        from timm.optim._param_groups import param_groups_weight_decay
    except ImportError:
        return {"skipped": "timm not installed"}
    model = build_model(ModelConfig(arch=args.arch), device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ours = build_optimizer(model, OptimConfig(name="lars", weight_decay=1e-6), lr=0.1)
    theirs = Lars(param_groups_weight_decay(model, 1e-6), lr=0.1, momentum=0.9)
    t_ours = statistics.median(timed(ours.step, device, 3, args.iters))
    t_timm = statistics.median(timed(theirs.step, device, 3, args.iters))
    return {"ours_ms": 1e3 * t_ours, "timm_ms": 1e3 * t_timm, "speedup": t_timm / t_ours,
            "n_tensors": sum(1 for _ in model.parameters())}


def bench_scaling(args) -> list[dict]:
    """The same global batch with 1..W ranks (gloo on CPU, one process per rank via torchrun)."""
    import os
    import subprocess
    import sys
    import tempfile

    from launch.local import free_port

    rows = []
    for world in args.scaling:
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "benchmarks.scaling", str(out),
               args.arch, str(args.image_size), str(args.batch_size * max(args.scaling)), str(args.iters)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"scaling run with {world} ranks failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(out.read_text()))
        out.unlink()
    base = rows[0]["median_step_s"] * rows[0]["world"]
    for r in rows:
        r["speedup"] = base / r["median_step_s"]
        r["efficiency"] = r["speedup"] / r["world"]
    return rows


def bench_loaders(args, device) -> dict:
    """DALI vs torchvision DataLoader on the same images at this benchmark's image size."""
    from benchmarks.pipeline import fallback_data, images_per_s

    root = Path(args.data) if args.data else fallback_data(max(args.image_size, 64))
    workers = os.cpu_count() or 1
    row = {"data": str(root), "image_size": args.image_size}
    for backend in ("dali", "torchvision"):
        try:
            row[backend] = images_per_s(root, backend, args.image_size, args.batch_size, workers, 10, device)
        except Exception as exc:  # DALI missing on this machine
            row[backend] = None
            row[f"{backend}_error"] = str(exc).splitlines()[0]
    if row["dali"] and row["torchvision"]:
        row["dali_over_torchvision"] = row["dali"] / row["torchvision"]
    return row


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ph = result["ssl"]["phases"]
    axes[0].barh(list(ph), [1e3 * v["median_s"] for v in ph.values()])
    axes[0].set_xlabel("ms per step (median)")
    c = result["config"]
    axes[0].set_title(f"{c['arch']} {c['image_size']}px b={c['batch_size']} {c['precision']}")
    for world in sorted({r["world"] for r in result["loss"]}):
        rows = [r for r in result["loss"] if r["world"] == world]
        axes[1].plot([r["global_batch"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"W={world}")
    axes[1].set_xlabel("global batch")
    axes[1].set_ylabel("naive / ours (loss fwd+bwd)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def print_table(result: dict) -> None:
    s = result["ssl"]
    print(f"\n== SimCLR step: {result['config']} on {result['device']}")
    print(f"{'what':<28}{'median ms':>12}{'p25':>10}{'p75':>10}")
    rows = [("SSL step (2 views)", s["ssl_step"]), *[(f"  {k}", v) for k, v in s["phases"].items()],
            ("supervised step (1 view)", s["supervised_step"])]
    for name, v in rows:
        print(f"{name:<28}{1e3 * v['median_s']:>12.2f}{1e3 * v['p25_s']:>10.2f}{1e3 * v['p75_s']:>10.2f}")
    print(f"images/s {s['images_per_s']:.1f}   views/s {s['views_per_s']:.1f}   supervised images/s "
          f"{s['supervised_images_per_s']:.1f}   SSL/supervised time {s['ssl_over_supervised_time']:.2f}x   "
          f"peak memory {s['peak_memory_mb']:.0f} MB")
    print(f"\n{'global batch':>12}{'world':>7}{'ours ms':>10}{'naive ms':>10}{'naive/ours':>12}")
    for r in result["loss"]:
        print(f"{r['global_batch']:>12}{r['world']:>7}{r['ours_ms']:>10.2f}{r['naive_ms']:>10.2f}{r['speedup']:>12.2f}")
    lars = result["lars"]
    if "ours_ms" in lars:
        print(f"\nLARS step over {lars['n_tensors']} tensors: ours {lars['ours_ms']:.2f} ms, "
              f"timm {lars['timm_ms']:.2f} ms ({lars['speedup']:.2f}x)")
    if result["scaling"]:
        print(f"\n{'ranks':>6}{'step ms':>10}{'speedup':>9}{'efficiency':>12}   (same global batch)")
        for r in result["scaling"]:
            print(f"{r['world']:>6}{1e3 * r['median_step_s']:>10.1f}{r['speedup']:>9.2f}{r['efficiency']:>12.2f}")
    ld = result["loaders"]
    if ld:
        ratio = f"{ld['dali_over_torchvision']:.2f}x" if "dali_over_torchvision" in ld else "n/a"
        print(f"\nloaders at {ld['image_size']} px: DALI {ld['dali'] or 0:.0f} img/s, torchvision "
              f"{ld['torchvision'] or 0:.0f} img/s, DALI/torchvision {ratio}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simclr bench", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch (images)")
    p.add_argument("--precision", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--loss-batches", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--loss-worlds", type=int, nargs="+", default=[8, 64])
    p.add_argument("--loss-iters", type=int, default=3)
    p.add_argument("--scaling", type=int, nargs="*", default=[], metavar="W",
                   help="also time the same global batch with these world sizes, e.g. 1 2 (torchrun, gloo on CPU)")
    p.add_argument("--loaders", action="store_true", help="also compare the DALI and torchvision loaders")
    p.add_argument("--data", default=None, help="images for --loaders (default: shipped photos)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput_<device>_<cfg>.json)")
    p.add_argument("--mlflow", action="store_true", help="also log the figures to MLflow (default store)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    result = {
        "benchmark": "throughput", "device": device_name(device), "versions": library_versions(),
        "git_commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
                   "precision": args.precision, "warmup": args.warmup, "iters": args.iters},
        "ssl": bench_ssl_step(args, device), "loss": bench_loss(args, device), "lars": bench_lars(args, device),
        "scaling": bench_scaling(args) if args.scaling else [],
        "loaders": bench_loaders(args, device) if args.loaders else {},
    }
    print_table(result)
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS / (f"throughput_{tag}_{args.arch}_{args.image_size}px_"
                                                     f"b{args.batch_size}_{args.precision}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    if args.mlflow:
        import mlflow

        mlflow.set_experiment("simclr-bench")
        with mlflow.start_run(run_name=out.stem):
            mlflow.log_params({**result["config"], "device": result["device"]})
            mlflow.log_metrics({"images_per_s": result["ssl"]["images_per_s"],
                                "lars_speedup_vs_timm": result["lars"].get("speedup", 0.0),
                                "loss_speedup_vs_naive_max": max(r["speedup"] for r in result["loss"]),
                                "views_per_s": result["ssl"]["views_per_s"],
                                "ssl_over_supervised_time": result["ssl"]["ssl_over_supervised_time"]})
            mlflow.log_artifact(str(out))
            mlflow.log_artifact(str(out.with_suffix(".png")))
    return result


if __name__ == "__main__":
    main()
