"""The GPU proof's time plan: each stage's planned seconds and cap, from planning figures where
nothing has measured the speed yet, and from what an earlier stage measured where something has
(the start of a feed stage; the quality stage's epochs from the end-to-end speed)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000

# Planning figures for the stages whose speed nothing has measured yet (H100/H200-class, eager,
# bf16): used only to print and check a stage's plan. The quality stage is planned from what
# stage 2 measured.
PLAN_GPU_VIEWS_PER_S = {"feed_cifar10_resnet18": 25_000.0, "feed_imagenette_resnet50": 4_000.0,
                        # 8 views an image at 1.55x the FLOPs of two 224 px views
                        "feed_imagenette_resnet50_multicrop": 4_000.0 * 8 / 2 / 1.55}
STAGE_START_S = 20.0  # imports, CUDA context, DALI pipeline build, cuDNN autotuning
EVAL_SPEEDUP = 1.5  # eval images/s over training views/s: a forward only, but decode-bound
PROBE_STEP_S = 0.0005  # one linear-probe step on cached features (GPU); CPU dry runs are slower
# an evaluation pipeline built (DALI's decoder and its buffers): one per epoch for the online probe's
# validation pass, and one per split and encoder at the end
EVAL_PIPELINE_S = 1.5


@dataclass
class Stage:
    name: str
    cap_s: int
    command: list[str]
    outputs: list[Path] = field(default_factory=list)
    planned_s: float = 0.0
    what: str = ""
    expected_skips: tuple[str, ...] = ()  # skip reasons this stage accepts (a test stage); any other fails it


def feed_stage(name: str, cap_s: int, out: Path, recipe: str, overrides: list[str], steps: int, warmup: int,
               batch: int, views_per_s: float, what: str, views: int = 2) -> Stage:
    """A feed benchmark stage: three modes (e2e, model, loader), each warm-up + steps."""
    path = out / f"{name}.json"
    planned = STAGE_START_S + 3 * (warmup + steps) * views * batch / views_per_s
    return Stage(name, cap_s, [sys.executable, "-m", "benchmarks.feed", "--config", recipe, *overrides,
                               "--steps", str(steps), "--warmup", str(warmup), "--out", str(path)], [path],
                 planned, what)


@dataclass(frozen=True)
class QualityPlan:
    """The quality stage's parts, in seconds, from the measured end-to-end training speed."""

    epochs: int
    epoch_s: float  # one epoch of training (the online probe included: it is in the measured step)
    val_pass_s: float  # the online probe's validation pass at each epoch's end
    eval_s: float  # features of train + test for two encoders, their linear probes and kNN
    fixed_s: float  # start-up and the file check

    @property
    def total_s(self) -> float:
        return self.fixed_s + self.epochs * (self.epoch_s + self.val_pass_s) + self.eval_s


def plan_quality(views_per_s: float, train_images: int, test_images: int, probe_epochs: int, budget_s: float,
                 probe_step_s: float = PROBE_STEP_S, max_epochs: int = 1000) -> QualityPlan:
    """As many pretraining epochs as fit ``budget_s`` with everything else the stage runs."""
    epoch_s = 2 * train_images / views_per_s
    eval_rate = EVAL_SPEEDUP * views_per_s
    val_pass_s = test_images / eval_rate + EVAL_PIPELINE_S
    probe_steps = probe_epochs * -(-train_images // 256)
    eval_s = 2 * ((train_images + test_images) / eval_rate + 2 * EVAL_PIPELINE_S + probe_steps * probe_step_s)
    fixed_s = STAGE_START_S + train_images / 20_000  # the file check reads ~20k small files/s
    room = budget_s - fixed_s - eval_s
    epochs = max(1, min(max_epochs, int(room / (epoch_s + val_pass_s))))
    return QualityPlan(epochs, epoch_s, val_pass_s, eval_s, fixed_s)


def measured_start_s(feed_json: Path) -> float | None:
    """The start a feed stage measured: its modes' warm-up (CUDA context, the pipeline, cuDNN's
    autotuning) summed, from its JSON."""
    try:
        return sum(float(r["warmup_s"]) for r in json.loads(feed_json.read_text())["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resize_from_start(stage: Stage, start_s: float) -> None:
    """A feed stage's plan with the start a finished feed stage measured in place of the guess; its
    cap raised to 1.25x that plan when the guess had left it short."""
    stage.planned_s += start_s - STAGE_START_S
    stage.cap_s = max(stage.cap_s, int(1.25 * stage.planned_s) + 1)


def e2e_views_per_s(feed_json: Path) -> float | None:
    try:
        rows = json.loads(feed_json.read_text())["rows"]
        return float(next(r["views_per_s"] for r in rows if r["mode"] == "e2e"))
    except (OSError, ValueError, KeyError, StopIteration):
        return None
