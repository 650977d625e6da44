"""The loss registry: ``loss.name`` -> a builder taking the run's ``LossConfig``.

A loss takes the projections of every view of this rank's images, ``(views, images, d)`` (view ``v``
of image ``i`` at ``[v, i]``), and returns ``(loss, accuracy)``: the loss to back-propagate and a
contrastive top-1 accuracy (no gradient). Each is one module in ``trainer/losses/`` that registers a
builder; the step, the gradient cache and the benchmarks ask ``build_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from foundation.registry import registrar
from foundation.resume_policy import hyper
from trainer.runtime.dataclass_yaml import ConfigError, build_dataclass

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LossConfig:
    name: str = hyper("nt_xent")  # a loss registered in trainer/losses/ (nt_xent: SimCLR's, for any number of views)
    temperature: float = hyper(0.1)  # every loss here is a softmax over similarities
    gather_negatives: bool = hyper(True)  # negatives from the global batch across ranks
    # the chosen loss's own parameters, as its module declares them (register_loss's params): loss.options.<name>
    options: dict[str, Any] = hyper(factory=dict)

    def params(self) -> Any:
        """The chosen loss's own parameters (its dataclass, from ``options``; None when it declares none)."""
        kind = LOSS_PARAMS.get(self.name)
        if kind is None:
            if self.options:
                raise ConfigError(f"loss.options: {self.name} takes no options of its own (given: "
                                  f"{', '.join(sorted(self.options))}); remove them, or choose the loss they are for")
            return None
        return build_dataclass(kind, self.options, "loss.options.")

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, what is allowed) for each bad field, the loss's own parameters included (their
        ``problems()``, keyed by field name, if their dataclass has one)."""
        if self.name not in LOSSES:
            return [("loss.name", self.name, f"choose one of {', '.join(sorted(LOSSES))}")]
        found: list[tuple[str, Any, str]] = []
        if self.temperature <= 0:
            found.append(("loss.temperature", self.temperature, "must be > 0 (typical 0.1-0.5)"))
        params = self.params()
        found += [(f"loss.options.{key}", value, allowed)
                  for key, value, allowed in getattr(params, "problems", list)()]
        return found


LossBuilder = Callable[[LossConfig], LossFn]
LOSSES: dict[str, LossBuilder] = {}
LOSS_PARAMS: dict[str, type] = {}  # loss name -> the dataclass of its own parameters
_file_loss = registrar(LOSSES)


def register_loss(name: str, params: type | None = None) -> Callable[[LossBuilder], LossBuilder]:
    """``@register_loss("name")``: a builder ``(cfg) -> loss_fn``, chosen as ``loss.name=<name>``.
    ``params``: the dataclass of the loss's own parameters (given as ``loss.options.<field>``, checked
    at load with the config; ``cfg.params()`` in the builder). A new loss is its module alone."""
    if params is not None:
        LOSS_PARAMS[name] = params
    return _file_loss(name)


def build_loss(cfg: LossConfig) -> LossFn:
    """The loss the run's config names."""
    return LOSSES[cfg.name](cfg)
