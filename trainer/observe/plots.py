"""Figures written as PNG files (headless): training curves, t-SNE of features, and nearest
neighbours. Other modules draw with ``pyplot()`` and write with ``save_figure``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from foundation.logs import get_logger
from trainer.observe.metrics import current_names

log = get_logger()


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on clusters or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: str | Path, dpi: int = 90) -> Path:
    """Lay out, write and close ``fig`` (closing frees it: long runs draw many)."""
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return Path(out)


def plot_curves(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Loss, contrastive accuracy and lr against step, from the local metrics rows (works offline;
    rows recorded before the metric names were grouped too)."""
    rows = [row for row in map(current_names, rows) if "train/loss" in row]
    if not rows:
        return None
    try:
        pyplot()
    except ImportError:  # a bare GPU image without matplotlib: the metrics file is the record
        log.info("matplotlib is not installed: no curves.png (metrics.jsonl holds the curves)")
        return None
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.5))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("train/loss", "train/contrastive_acc", "train/lr")):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_figure(fig, out)


def tsne_plot(features: torch.Tensor, labels: torch.Tensor, out: Path, title: str, max_points: int = 2000,
              class_names: list[str] | None = None) -> Path:
    """2-D t-SNE of (a seeded sample of) the features, coloured by class."""
    from sklearn.manifold import TSNE

    plt = pyplot()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(features), generator=gen)[:max_points]
    x, y = features[idx].numpy(), labels[idx].numpy()
    emb = TSNE(n_components=2, init="pca", perplexity=min(30.0, max(5.0, len(x) / 10)), random_state=0).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 6))
    points = ax.scatter(emb[:, 0], emb[:, 1], c=y, cmap="tab10" if y.max() < 10 else "tab20", s=8)
    if class_names:
        handles = [plt.Line2D([], [], marker="o", ls="", color=points.cmap(points.norm(c)))
                   for c in range(len(class_names))]
        ax.legend(handles, class_names, fontsize=7, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, out)


def pick_queries(labels: torch.Tensor, count: int = 8, seed: int = 0) -> list[int]:
    """``count`` rows of ``labels`` to show: one of each class first (seeded), then others."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen).tolist()
    picked, seen = [], set()
    for i in order:  # the first (in a seeded order) of each class
        if int(labels[i]) not in seen:
            seen.add(int(labels[i]))
            picked.append(i)
    picked = sorted(picked, key=lambda i: int(labels[i]))[:count]
    picked += [i for i in order if i not in picked][: count - len(picked)]
    return picked


def nearest_neighbours(train_x: torch.Tensor, queries_x: torch.Tensor, k: int = 8) -> torch.Tensor:
    """Rows of ``train_x`` nearest to each query by cosine similarity, nearest first (queries x k)."""
    a = torch.nn.functional.normalize(train_x.float(), dim=1)
    b = torch.nn.functional.normalize(queries_x.float(), dim=1)
    return (b @ a.T).topk(min(k, len(a)), dim=1).indices


def neighbours_plot(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], train_labels: torch.Tensor,
                    val_labels: torch.Tensor, train_image: Any, val_image: Any, class_names: list[str],
                    out: Path, queries: list[int], k: int = 8) -> tuple[Path, dict[str, list[list[int]]]]:
    """For each panel (an encoder: its training and validation features), each query image of the
    validation split beside its ``k`` nearest training images, with their classes; a neighbour of
    another class is framed in red. ``train_image(row)`` / ``val_image(row)`` give HxWx3 uint8
    images. Returns the file and each panel's neighbour rows."""
    plt = pyplot()
    names = list(panels)
    cols = len(names) * (k + 1) + len(names) - 1  # a blank column between panels
    fig, axes = plt.subplots(len(queries), cols, figsize=(0.95 * cols, 1.1 * len(queries) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    found: dict[str, list[list[int]]] = {}

    def show(ax, image, title: str, colour: str, frame: str | None = None) -> None:
        ax.imshow(image)
        ax.set_title(title, fontsize=7, color=colour)
        if frame:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(frame)
                spine.set_linewidth(3)

    def name_of(label: int) -> str:
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        return name if len(name) <= 14 else name[:13] + "~"  # ImageNet's synsets and long names stay legible

    for p, name in enumerate(names):
        train_x, val_x = panels[name]
        nearest = nearest_neighbours(train_x, val_x[queries], k)
        found[name] = nearest.tolist()
        first = p * (k + 2)
        for r, q in enumerate(queries):
            truth = int(val_labels[q])
            show(axes[r, first], val_image(q), (f"[{name}] " if r == 0 else "") + "query\n" + name_of(truth),
                 "black", frame="black")
            for c, t in enumerate(nearest[r].tolist()):
                label = int(train_labels[t])
                wrong = label != truth
                show(axes[r, first + 1 + c], train_image(t), ("x " if wrong else "") + name_of(label),
                     "red" if wrong else "green", frame="red" if wrong else None)
    fig.suptitle(f"{k} nearest training images (cosine) of validation queries; red: another class", fontsize=9)
    return save_figure(fig, out, dpi=110), found
