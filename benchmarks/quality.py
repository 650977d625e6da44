"""Quality benchmark: pretrain on a real dataset with a given budget, then linear evaluation and kNN
of the frozen encoder beside a random-init encoder. Writes JSON and appends a markdown row to
benchmarks/results/quality.md (dataset, model, epochs, batch, wall time, device, accuracies).

    python -m benchmarks.quality --dataset cifar10 --epochs 30          # GPU: the CIFAR-10 RN18 recipe
    python -m benchmarks.quality --dataset photos --epochs 8            # this CPU: shipped photos
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, device_name, result_header, write_json
from data_pipeline import open_train_source, open_val_source
from trainer.config import load_config
from trainer.evaluation.encoder_loading import load_encoder, random_init_like
from trainer.evaluation.evaluate import compare
from trainer.run.loop import train
from trainer.runtime.device import choose_device

REPO = Path(__file__).resolve().parent.parent
DATASETS = {  # name: (recipe, train split, held-out split)
    "cifar10": ("configs/cifar10_resnet18.yaml", "cifar10-jpeg/train", "cifar10-jpeg/test"),
    "imagenette": ("configs/imagenet_resnet50.yaml", "imagenette2-224-subset/train", "imagenette2-224-subset/val"),
    "photos": ("configs/demo_cpu.yaml", None, None),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="photos", choices=list(DATASETS))
    p.add_argument("--data-dir", default=None, help="the folder holding cifar10-jpeg/ or imagenette2-224-subset/ "
                   "(needed for those datasets)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--run-dir", default="runs/quality")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the JSON and quality.md go")
    p.add_argument("--no-markdown", action="store_true", help="the JSON alone (no row appended to quality.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)

    recipe, train_split, val_split = DATASETS[args.dataset]
    if args.dataset == "photos":
        from data_pipeline.sample_data import make_demo_dataset

        root = Path(args.run_dir) / "photos"
        make_demo_dataset(root)
        train_root, val_root = root / "train", root / "val"
    elif args.data_dir is None or not (Path(args.data_dir) / train_split).is_dir():
        p.error(f"--dataset {args.dataset} reads {train_split} and {val_split} under --data-dir; pass the folder that "
                "holds them (or --dataset photos, which needs none)")
    else:
        train_root, val_root = Path(args.data_dir) / train_split, Path(args.data_dir) / val_split
    run_dir = Path(args.run_dir) / args.dataset
    cfg = load_config(REPO / recipe, [f"data.root={train_root}", f"data.val_root={val_root}",
                                      f"train.epochs={args.epochs}", f"train.run_dir={run_dir}",
                                      "checkpoint.resume=none", "train.overwrite=true", *args.overrides])
    device = choose_device(cfg.train.device)
    start = time.time()
    result = train(cfg)
    pretrain_s = time.time() - start
    encoder, _ = load_encoder(result.encoder_path)
    train_set, val_set = open_train_source(cfg.data), open_val_source(cfg.data)
    torch.manual_seed(cfg.train.seed)
    report = compare({"SimCLR": encoder, "random init": random_init_like(cfg)}, train_set, val_set, cfg.data, device,
                     args.probe_epochs)
    ssl, rand = report.rows["SimCLR"], report.rows["random init"]
    row = {
        **result_header("quality", device_name(device)), "dataset": args.dataset, "model": cfg.model.arch,
        "epochs": args.epochs,
        "batch": cfg.data.batch_size, "precision": cfg.precision.dtype, "backend": cfg.data.backend,
        "lr": cfg.optim.lr, "temperature": cfg.loss.temperature, "probe_epochs": args.probe_epochs,
        "data": str(train_root),
        "pretrain_wall_s": pretrain_s, "total_wall_s": time.time() - start,
        "linear_top1": ssl["linear_top1"], "linear_top5": ssl["linear_top5"], "knn_top1": ssl["knn_top1"],
        "random_linear_top1": rand["linear_top1"], "random_knn_top1": rand["knn_top1"], "final_loss": result.loss,
    }
    tag = "cuda" if device.type == "cuda" else "cpu"
    results = Path(args.results_dir)
    write_json(row, results / f"quality_{args.dataset}_{tag}.json")
    if not args.no_markdown:
        append_markdown_row(results / "quality.md", row, ssl, rand)
    print(json.dumps({k: v for k, v in row.items() if k != "versions"}, indent=2))
    return row


def append_markdown_row(md: Path, row: dict, ssl: dict, rand: dict) -> None:
    if not md.exists():
        md.write_text("| dataset | model | epochs | batch | precision | pretrain wall | device | linear top-1 "
                      "| kNN top-1 | random-init linear | random-init kNN |\n" + "|---" * 11 + "|\n")
    with open(md, "a") as f:
        f.write(f"| {row['dataset']} | {row['model']} | {row['epochs']} | {row['batch']} | {row['precision']} | "
                f"{row['pretrain_wall_s'] / 60:.1f} min | {row['device']} | {ssl['linear_top1']:.3f} | "
                f"{ssl['knn_top1']:.3f} | {rand['linear_top1']:.3f} | {rand['knn_top1']:.3f} |\n")


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
