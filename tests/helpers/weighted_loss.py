"""A loss with a parameter of its own, as a user's module would add one: its parameters are a
dataclass beside it (given as ``loss.options.weight``, checked at load), and one registration."""

from dataclasses import dataclass

from trainer.losses import LossConfig, LossFn, register_loss
from trainer.losses.nt_xent import nt_xent


@dataclass
class WeightedParams:
    weight: float = 1.0  # NT-Xent times this

    def problems(self) -> list[tuple[str, object, str]]:
        return [("weight", self.weight, "must be > 0")] if self.weight <= 0 else []


@register_loss("nt_xent_weighted", params=WeightedParams)
def build(cfg: LossConfig) -> LossFn:
    weight, temperature, gather = cfg.params().weight, cfg.temperature, cfg.gather_negatives

    def weighted(views):
        loss, accuracy = nt_xent(views, temperature, gather)
        return weight * loss, accuracy

    return weighted
