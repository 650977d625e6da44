"""Judging a frozen encoder: linear probe, weighted kNN, label-fraction fine-tuning, the kNN monitor."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline import build_eval_batches
from data_pipeline.config import DataConfig
from data_pipeline.sources import DataError, Source, labelled_indices
from foundation import collectives


@torch.no_grad()
def extract_features(encoder: nn.Module, source: Source, data_cfg: DataConfig, device: torch.device,
                     needed_by: str, batch_size: int = 256, max_images: int = 0,
                     shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features (no projection head) of the labelled images of ``source`` (all, or a seeded
    random ``max_images`` of them); a DataError naming ``needed_by`` when it has no labels.
    ``shard=(rank, world)``: only this rank's share of them (every world-th image)."""
    encoder.eval().to(device)
    feats, labels = [], []
    keep = labelled_indices(source, needed_by)
    indices = None if len(keep) == len(source) else keep.tolist()
    if max_images and len(keep) > max_images:
        pick = torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))[:max_images]
        keep = keep[pick.numpy()]
        indices = keep.tolist()
    rank, world = shard
    if world > 1:
        indices = keep[rank::world].tolist()
    for images, y in build_eval_batches(data_cfg, source, device, batch_size, indices):
        feats.append(encoder(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 epochs: int = 100, batch_size: int = 256, lr: float = 0.1, weight_decay: float = 1e-4,
                 seed: int = 0, device: torch.device | None = None) -> dict[str, float]:
    """Linear classifier on frozen, standardised features: SGD + Nesterov momentum, cosine lr
    (SimCLR's protocol, on cached features). Returns top-1 / top-5 on the held-out split."""
    device = device or torch.device("cpu")
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    gen = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    clf = nn.Linear(tx.shape[1], n_classes)
    with torch.no_grad():
        clf.weight.normal_(0, 0.01, generator=gen)
        clf.bias.zero_()
    clf = clf.to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tx) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(tx), generator=gen).to(device)
        for i in range(0, len(tx), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(clf(tx[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = clf(vx)
    return topk_accuracy(logits, val_y)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {"top1": (top[:, 0] == labels).float().mean().item(),
            "top5": (top == labels[:, None]).any(1).float().mean().item()}


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 k: int = 200, temperature: float = 0.1) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018): each of the k neighbours votes for its
    class with weight exp(sim / T)."""
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for i in range(0, len(val_x), 1024):
        sim, idx = (val_x[i : i + 1024] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == val_y[i : i + 1024]).sum().item()
    return correct / len(val_x)


@dataclass
class EncoderEval:
    linear_top1: float
    linear_top5: float
    knn_top1: float
    val_features: torch.Tensor = field(repr=False)  # kept for plots (t-SNE, neighbours)
    val_labels: torch.Tensor = field(repr=False)
    train_features: torch.Tensor = field(repr=False)
    train_labels: torch.Tensor = field(repr=False)


def evaluate_encoder(encoder: nn.Module, train: Source, val: Source, data_cfg: DataConfig,
                     device: torch.device, probe_epochs: int = 100, shard: tuple[int, int] = (0, 1)) -> EncoderEval:
    """Features extracted once (labelled images only), then the linear probe and weighted kNN on them.
    ``shard=(rank, world)``: each rank extracts its share, the shares are gathered back into the
    images' order on every rank, and every rank computes the same probe and kNN (a collective)."""
    check_same_classes(train, val)
    tr_x, tr_y = gather_in_order(*extract_features(encoder, train, data_cfg, device,
                                                   "the linear probe (training split)", shard=shard), shard)
    va_x, va_y = gather_in_order(*extract_features(encoder, val, data_cfg, device,
                                                   "the linear probe (held-out split)", shard=shard), shard)
    lin = linear_probe(tr_x, tr_y, va_x, va_y, epochs=probe_epochs, device=device)
    knn = knn_accuracy(tr_x.to(device), tr_y.to(device), va_x.to(device), va_y.to(device))
    return EncoderEval(lin["top1"], lin["top5"], knn, va_x, va_y, tr_x, tr_y)


@dataclass
class Report:
    """An evaluation of one or more encoders on the same two splits: a row of scores per encoder
    (``linear_top1``, ``linear_top5``, ``knn_top1``, ``finetune_<f>_top1``; ``tsne``: a plot's path),
    and what was evaluated (``meta``)."""

    rows: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    neighbours: Path | None = None  # the nearest-neighbours picture, when drawn

    def scores(self) -> list[str]:
        return [k for k in next(iter(self.rows.values()), {}) if k != "tsne"]

    def to_markdown(self) -> str:
        keys = self.scores()
        lines = ["| encoder | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |" for name, row in self.rows.items()]
        lines += [f"\nNote: {note}" for note in self.meta.get("notes", [])]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {**self.meta, "rows": self.rows}


def compare(encoders: dict[str, nn.Module], train: Source, val: Source, data_cfg: DataConfig, device: torch.device,
            probe_epochs: int = 100, shard: tuple[int, int] = (0, 1), finetune_fractions: tuple[float, ...] = (),
            finetune_epochs: int = 30, tsne_dir: Path | None = None,
            neighbours_out: Path | None = None) -> Report | None:
    """Every encoder through the same protocol: linear probe and kNN on frozen features (each rank
    extracting its share: a collective), then on rank 0 fine-tuning on each fraction of the labels,
    a t-SNE plot into ``tsne_dir``, and the nearest-neighbours picture of every encoder side by
    side into ``neighbours_out``. The report on rank 0 (None on the others)."""
    from trainer.observe.plots import tsne_plot

    rows: dict[str, dict[str, Any]] = {}
    panels: dict[str, EncoderEval] = {}
    for name, encoder in encoders.items():
        scores = evaluate_encoder(encoder, train, val, data_cfg, device, probe_epochs, shard=shard)
        if shard[0] != 0:
            continue
        panels[name] = scores
        row: dict[str, Any] = {"linear_top1": scores.linear_top1, "linear_top5": scores.linear_top5,
                               "knn_top1": scores.knn_top1}
        for fraction in finetune_fractions:  # on rank 0: a fine-tuning run of its own
            row[f"finetune_{fraction:g}_top1"] = finetune(encoder, train, val, data_cfg, device, fraction,
                                                          finetune_epochs)["top1"]
        if tsne_dir is not None:
            tsne_dir.mkdir(parents=True, exist_ok=True)
            slug = name.replace(" ", "_").lower()
            row["tsne"] = str(tsne_plot(scores.val_features, scores.val_labels, tsne_dir / f"tsne_{slug}.png",
                                        f"t-SNE of {name} features", class_names=val.classes))
        rows[name] = row
    if shard[0] != 0:
        return None
    report = Report(rows)
    if neighbours_out is not None and panels:
        report.neighbours = neighbours_picture(panels, train, val, neighbours_out)
    return report


def neighbours_picture(panels: dict[str, EncoderEval], train: Source, val: Source, out: Path) -> Path:
    """8 validation queries (one per class first), each beside its 8 nearest training images, for
    every encoder side by side (``trainer.observe.plots.neighbours_plot``)."""
    from data_pipeline.torchvision_loader import decode_sample
    from trainer.observe.plots import neighbours_plot, pick_queries

    first = next(iter(panels.values()))
    train_rows = labelled_indices(train, "the neighbours picture")  # feature row -> sample
    val_rows = labelled_indices(val, "the neighbours picture")

    def image(source: Source, rows: np.ndarray):
        def read(row: int) -> np.ndarray:
            from PIL import Image

            picture = Image.fromarray(decode_sample(source, int(rows[row])).permute(1, 2, 0).numpy())
            picture.thumbnail((96, 96))
            return np.asarray(picture)
        return read

    out.parent.mkdir(parents=True, exist_ok=True)
    path, _ = neighbours_plot({name: (e.train_features, e.val_features) for name, e in panels.items()},
                              first.train_labels, first.val_labels, image(train, train_rows), image(val, val_rows),
                              val.classes or train.classes, out, pick_queries(first.val_labels))
    return path


def shared_by_ranks(world: int) -> bool:
    """Whether a share of ``world`` is this process group's (then its results are gathered, a 1-rank
    group included); a rank doing everything alone (``shard=(0, 1)`` in a bigger group) keeps its own."""
    return collectives.active() and world == collectives.world_size()


def gather_in_order(features: torch.Tensor, labels: torch.Tensor,
                    shard: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's share (rank r holds items r, r + world, ...) back in the items' own order, on
    every rank (all-gathers; shares differ in length by at most one), on the CPU."""
    rank, world = shard
    if not shared_by_ranks(world):
        return features, labels
    all_x, all_y = collectives.gather_varying(features.cpu()), collectives.gather_varying(labels.cpu())
    out_x = torch.empty((sum(len(y) for y in all_y), *features.shape[1:]), dtype=features.dtype)
    out_y = torch.empty(len(out_x), dtype=labels.dtype)
    for r in range(world):
        out_x[r::world], out_y[r::world] = all_x[r], all_y[r]
    return out_x, out_y


def check_same_classes(train: Source, val: Source) -> None:
    """A probe trained on one class list and scored on another reports a meaningless number, and
    would exit 0: the two sets must name the same classes."""
    # an .npz names its classes by their numbers: against numbers only the count can be compared
    # (labels are class indices in both); real names must agree
    numbered = all(c.isdigit() for c in train.classes) or all(c.isdigit() for c in val.classes)
    differ = len(train.classes) != len(val.classes) if numbered else list(train.classes) != list(val.classes)
    if train.classes and val.classes and differ:
        def show(classes: list[str]) -> str:
            return ", ".join(classes[:6]) + (f", ... ({len(classes)} in all)" if len(classes) > 6 else "")

        missing = [c for c in train.classes if c not in val.classes]
        extra = [c for c in val.classes if c not in train.classes]
        named = "; ".join(f"{what} {', '.join(map(repr, names[:6]))}{' ...' if len(names) > 6 else ''}"
                          for what, names in (("the held-out set lacks", missing), ("the training set lacks", extra))
                          if names and not numbered)
        raise DataError(f"the training set {train.location} has classes [{show(train.classes)}] but the held-out set "
                        f"{val.location} has [{show(val.classes)}]{f' ({named})' if named else ''}: a probe needs the "
                        "same classes in both; give two splits of one dataset")


def finetune(encoder: nn.Module, source: Source, val: Source, data_cfg: DataConfig, device: torch.device,
             label_fraction: float = 0.1, epochs: int = 30, lr: float = 0.05, batch_size: int = 64,
             seed: int = 0) -> dict[str, float]:
    """Semi-supervised protocol: fine-tune encoder + linear head on a class-balanced ``label_fraction``
    of the labelled split (random crop + flip), then top-1/top-5 on the held-out split."""
    import copy

    import numpy as np

    from data_pipeline.torchvision_loader import finetune_loader

    labels = np.asarray(source.labels)
    labelled_indices(source, "fine-tuning")
    labelled_indices(val, "fine-tuning (held-out split)")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[labels >= 0]):  # at least one image per class
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.choice(idx, max(1, round(label_fraction * len(idx))), replace=False).tolist())
    loader = finetune_loader(source, data_cfg, keep, batch_size, seed)
    size = data_cfg.image_size
    model = copy.deepcopy(encoder).to(device)
    with torch.no_grad():
        feat_dim = model(torch.zeros(2, 3, size, size, device=device)).shape[1]
    head = nn.Linear(feat_dim, int(labels.max()) + 1).to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    for _ in range(epochs):
        model.train()
        for images, y in loader:
            loss = F.cross_entropy(head(model(images.to(device))), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    logits, ys = [], []
    with torch.no_grad():
        for images, y in build_eval_batches(data_cfg, val, device, 256, labelled_indices(val, "fine-tuning").tolist()):
            logits.append(head(model(images.to(device))).cpu())
            ys.append(y)
    return {**topk_accuracy(torch.cat(logits), torch.cat(ys)), "labelled_images": len(keep)}


@torch.no_grad()
def probe_val_top1(encoder: nn.Module, probe, source: Source, data_cfg: DataConfig, device: torch.device,
                   rank: int, world: int) -> float:
    """The online probe's top-1 on ``source``, each rank scoring its share (a collective). Leaves the
    encoder in train mode."""
    try:
        x, y = extract_features(encoder, source, data_cfg, device, "the online probe's validation (data.val_root)",
                                shard=(rank, world))
        hits, count = probe.evaluate(x.to(device), y.to(device))
        counts = torch.stack([hits, count])
        hits, count = (collectives.all_reduce_(counts) if shared_by_ranks(world) else counts).tolist()
        return hits / max(count, 1.0)
    finally:
        encoder.train()


def knn_monitor(encoder: nn.Module, train: Source, val: Source, data_cfg: DataConfig, device: torch.device,
                shard: tuple[int, int] = (0, 1), max_train: int = 10_000) -> float:
    """Quick kNN top-1 of the current encoder on ``val`` against (up to ``max_train`` labelled
    images of) ``train``, for logging during pretraining; both opened once per run by the caller.
    ``shard=(rank, world)``: every rank extracts its share and gets the same result (a collective),
    so no rank waits idle. Leaves the encoder in train mode."""
    was_training = encoder.training
    try:
        tr_x, tr_y = gather_in_order(*extract_features(
            encoder, train, data_cfg, device, "the kNN monitor (train.knn_every_epochs; data.root)",
            max_images=max_train, shard=shard), shard)
        va_x, va_y = gather_in_order(*extract_features(
            encoder, val, data_cfg, device, "the kNN monitor (train.knn_every_epochs; data.val_root)", shard=shard),
            shard)
    finally:
        encoder.train(was_training)
    return knn_accuracy(tr_x.to(device), tr_y.to(device), va_x.to(device), va_y.to(device))
