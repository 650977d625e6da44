"""Views as a specification: which crops of each image a training batch carries.

``data.views`` is a list of view groups, each ``count`` crops of one ``size`` (fixed, or following
a schedule over epochs) with its own augmentation overrides (``crop_scale``, ``blur_prob``,
``solarize_prob``, ...). Two groups of 2 x 224 px and 6 x 96 px are SwAV's multi-crop; two groups of
one view each with different blur and solarisation are BYOL's asymmetric recipe; an empty list is
SimCLR's two views of ``data.image_size``.

A batch is a list of **size groups**: consecutive views of the same size at this epoch, stacked as
one ``(views, images, 3, size, size)`` tensor, so the model runs one forward per size group (as SwAV
does). Views keep their order across groups, so view ``v`` of an image is the same crop recipe in
every step of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_pipeline.config import AugmentConfig, DataConfig, SizeSchedule, ViewGroup


def default_views() -> list[ViewGroup]:
    """SimCLR's two views of ``data.image_size`` with the run's augmentation."""
    return [ViewGroup(count=2)]


@dataclass
class ViewSpec:
    """The run's views resolved against ``data.image_size`` and ``data.augment``."""

    groups: list[ViewGroup] = field(default_factory=default_views)
    image_size: int = 224
    base: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def count(self) -> int:
        return sum(g.count for g in self.groups)

    def views(self, epoch: int) -> list[tuple[int, AugmentConfig]]:
        """(size, augmentation) of each view at ``epoch``, in view order."""
        return [(g.size_at(epoch, self.image_size), g.augment(self.base)) for g in self.groups for _ in range(g.count)]

    def group_sizes(self, epoch: int) -> list[tuple[int, int]]:
        """(size, views) of each size group at ``epoch``: consecutive views of one size run together."""
        sizes = self.sizes(epoch)
        return [(sizes[run[0]], len(run)) for run in size_runs(sizes)]

    def sizes(self, epoch: int) -> list[int]:
        return [size for size, _ in self.views(epoch)]

    def describe(self, epoch: int = 0) -> str:
        """e.g. ``2x224 + 6x96 px``."""
        return " + ".join(f"{n}x{size}" for size, n in self.group_sizes(epoch)) + " px"

    def changes_size(self) -> bool:
        """Whether any group's size follows a schedule."""
        return any(not isinstance(g.size, int) for g in self.groups)


    def notes(self, epochs: int, images: tuple[int, int] | None = None) -> list[str]:
        """What a run of ``epochs`` epochs would not show until too late: a size schedule whose
        changes fall after the run ends, and crops larger than the ``images`` (width, height), each
        one upscaled."""
        said, last = [], max(epochs, 1) - 1
        for i, group in enumerate(self.groups):
            if isinstance(group.size, int):
                continue
            planned = group.size.end if isinstance(group.size, SizeSchedule) else group.size[-1][1]
            at = group.size.to_epoch if isinstance(group.size, SizeSchedule) else group.size[-1][0]
            reached = group.size_at(last, self.image_size)
            if reached == planned:
                continue
            run = {group.size_at(epoch, self.image_size) for epoch in range(last + 1)}
            key, first = f"data.views[{i}].size", group.size_at(0, self.image_size)
            now = (f"every epoch trains at {first} px" if len(run) == 1 else
                   f"it reaches {reached} px in the last epoch, not {planned} px")
            said.append(f"{key} reaches its {planned} px at epoch {at}, but the run has {epochs} epoch(s) "
                        f"(0-{last}): {now}; raise train.epochs or end the schedule by epoch {last}")
        largest = max(size for epoch in range(last + 1) for size in self.sizes(epoch))
        if images is not None and largest > min(images):
            said.append(f"views of up to {largest} px are cut from images of about {images[0]} x {images[1]} "
                        f"px (the median of a few): every crop is upscaled, which costs compute and adds no detail; "
                        f"views of at most {min(images)} px match them (data.image_size, or data.views[i].size)")
        return said


def size_runs(shapes: list) -> list[list[int]]:
    """Indices of consecutive views of one shape: the size groups."""
    runs: list[list[int]] = []
    for i, shape in enumerate(shapes):
        if i and shape == shapes[i - 1]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def stack_size_groups(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-view batches ``(images, 3, s, s)`` into size groups ``(views, images, 3, s, s)``."""
    return [torch.stack([views[i] for i in run]) for run in size_runs([tuple(v.shape) for v in views])]


def collate_views(samples: list[tuple[tuple[torch.Tensor, ...], int, int]]
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """DataLoader's collate for samples of (views, label, corrupt): the views stacked straight into
    size groups (one copy, in the worker, so pinned memory holds the groups themselves)."""
    n = len(samples)
    groups = []
    for run in size_runs([tuple(v.shape) for v in samples[0][0]]):
        group = torch.stack([sample[0][v] for v in run for sample in samples])
        groups.append(group.view(len(run), n, *group.shape[1:]))
    return groups, torch.tensor([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


def view_spec(cfg: DataConfig) -> ViewSpec:
    """The run's views: ``data.views``, or SimCLR's two views of ``data.image_size``."""
    return ViewSpec(cfg.views or default_views(), cfg.image_size, cfg.augment)
