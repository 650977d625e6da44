"""The online linear probe (as solo-learn's): a linear classifier trained alongside pretraining on
the detached encoder features of each batch's first view, with its own optimizer, so that linear
accuracy can be watched climbing in MLflow without stopping the run.

No gradient reaches the encoder (the features are detached), and nothing is read on the host per
step: the probe's gradients are averaged over ranks with one small all-reduce, and its hits and
counts are device tensors read when the epoch's accuracy is logged. Its weights, optimizer and
counts are part of the checkpoint, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foundation import collectives
from trainer.model.optim import guarded_step

PROBE_LR = 0.1  # SGD with momentum on standardised-scale features: solo-learn's default for its classifier


class OnlineProbe(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, device: torch.device) -> None:
        super().__init__()
        self.classifier = nn.Linear(feature_dim, num_classes).to(device)
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=PROBE_LR, momentum=0.9, fused=True)
        self.register_buffer("hits", torch.zeros((), device=device))  # this epoch, this rank
        self.register_buffer("seen", torch.zeros((), device=device))

    def update(self, features: torch.Tensor, labels: torch.Tensor, skip: torch.Tensor) -> None:
        """One probe step on ``features`` (detached here) and their ``labels`` (-1: unlabeled, left
        out); a no-op on the device when ``skip`` (the training step's verdict) is 1."""
        features = features.detach().float()
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, labels, ignore_index=-1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if collectives.active():  # the same probe on every rank
            grads = [p.grad for p in self.classifier.parameters()]
            flat = collectives.all_reduce_(torch.cat([g.reshape(-1) for g in grads]), "avg")
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))
        guarded_step(self.optimizer, skip)
        with torch.no_grad():
            known = (labels >= 0) & (skip == 0)
            self.hits += ((logits.argmax(1) == labels) & known).sum()
            self.seen += known.sum()

    def epoch_top1(self) -> float:
        """Top-1 over this epoch's training batches on every rank (a collective and a host read,
        once per epoch); the counts start again."""
        counts = collectives.all_reduce_(torch.stack([self.hits, self.seen]))
        hits, seen = counts.tolist()
        self.hits.zero_()
        self.seen.zero_()
        return hits / max(seen, 1.0)

    def evaluate(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hits, count) of the probe on ``features`` (e.g. this rank's share of the validation set)."""
        with torch.no_grad():
            predicted = self.classifier(features.float()).argmax(1)
            return (predicted == labels).sum().float(), torch.tensor(float(len(labels)), device=predicted.device)

    def checkpoint_part(self) -> ProbeCheckpoint:
        """The probe as one stateful part of the run's checkpoint: its weights and its optimizer."""
        return ProbeCheckpoint(self)


class ProbeCheckpoint:
    def __init__(self, probe: OnlineProbe) -> None:
        self.probe = probe

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.probe.state_dict(), "optimizer": self.probe.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe.load_state_dict(state["model"])
        self.probe.optimizer.load_state_dict(state["optimizer"])
