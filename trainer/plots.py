"""Figures written as PNG files (headless): training curves and t-SNE of features. Other modules
draw with ``pyplot()`` and write with ``save_figure``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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
    """Loss, contrastive accuracy and lr against step, from the local metrics rows (works offline)."""
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    try:
        pyplot()
    except ImportError:  # a bare GPU image without matplotlib: the metrics file is the record
        print("[simclr] matplotlib is not installed: no curves.png (metrics.jsonl holds the curves)", flush=True)
        return None
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.5))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("loss", "contrastive_acc", "lr")):
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
