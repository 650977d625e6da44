"""The trained encoder as users take it away: ``encoder.pt`` (the encoder's state dict, loadable
into a stock torchvision ResNet, or ``timm.create_model(name, num_classes=0)``) and an MLflow
PyTorch model that is the plain torchvision or timm module
(SyncBatchNorm turned back into BatchNorm, on the CPU, in fp32), logged by the training run or,
when MLflow was unreachable then, by ``simclr sync`` later."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foundation.atomic_files import atomic_path
from foundation.logs import get_logger
from trainer.model.simclr import encoder_state_dict
from trainer.model.sync_batchnorm import revert_sync_batchnorm
from trainer.tracking import MlflowRun

log = get_logger()
TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"  # which mlflow.set_tracking_uri also writes


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def save_encoder(model: nn.Module, path: Path) -> Path:
    """The SimCLR model's encoder (no projection head) as a state dict at ``path``, written whole
    (a run whose ``encoder.pt`` exists is a finished run: a kill mid-write must leave none)."""
    with atomic_path(path) as tmp:
        torch.save(encoder_state_dict(model), tmp)
    return path


def _model_description(plain: nn.Module, image_size: int) -> tuple[Any, Any, list[str]]:
    """An input example, the signature and the pinned pip requirements of the logged encoder."""
    import numpy as np
    import torchvision
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = min(image_size, 64)  # the example is stored as JSON: keep it small
    example = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        output = plain(torch.from_numpy(example)).numpy()
    # any batch and any image size (the encoder pools globally): only channels and dtype are fixed
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, output.shape[1]))]))
    # the public release of a local build (2.14.1+cu128 -> 2.14.1): what pip can install elsewhere
    requirements = [f"torch=={torch.__version__.split('+')[0]}",
                    f"torchvision=={torchvision.__version__.split('+')[0]}"]
    if type(plain).__module__.startswith("timm."):  # the pickled module's class lives in timm
        import timm

        requirements.append(f"timm=={timm.__version__}")
    return example, signature, requirements


def log_encoder_model(run: MlflowRun | None, encoder: nn.Module, image_size: int, register_as: str = "") -> str | None:
    """Log ``encoder`` (no projection head) into ``run`` as an MLflow model taking normalised NCHW
    float32 images of any size and returning features, with its signature, an input example and
    pinned pip requirements; registered as ``register_as`` when given. Returns the model URI
    (``runs:/<run_id>/encoder``), or None when there is no run or MLflow is unreachable."""
    if run is None or not run.flush(force=True):
        return None
    import mlflow
    import mlflow.pytorch

    plain = revert_sync_batchnorm(encoder).cpu().float().eval()
    example, signature, requirements = _model_description(plain, image_size)
    # MLflow's fluent API logs models; it takes the store as a process-wide setting, which must not
    # outlive this call (a later run in this process resolving its default store would get ours)
    # (public calls only: whether one is set, and which; the variable set_tracking_uri also writes)
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    previous_env = os.environ.get(TRACKING_URI_VARIABLE)
    # MLflow warns in five lines that a pickled model runs code when loaded: our choice (see below), said
    # once in our own line and in docs/tracking.md
    pickle_warning = logging.getLogger("mlflow.pytorch")
    quiet = _DropMessage("Saving pytorch model by Pickle")
    pickle_warning.addFilter(quiet)
    try:
        mlflow.set_tracking_uri(run.client_uri)
        # the logged model belongs to the run's experiment (else runs:/<id>/encoder cannot find it)
        mlflow.set_experiment(experiment_id=run.client.get_run(run.run_id).info.experiment_id)
        mlflow.pytorch.log_model(plain, name="encoder", run_id=run.run_id, signature=signature,
                                 input_example=example, pip_requirements=requirements,
                                 registered_model_name=register_as or None,
                                 # a real torchvision module: .train(), parameters, fine-tuning; a pt2
                                 # program (MLflow's default) is frozen in eval mode
                                 serialization_format="pickle")
    except Exception as exc:
        run.warn("logging the encoder as an MLflow model", exc)
        return None
    finally:
        mlflow.set_tracking_uri(previous)  # None: unset, as it was
        if previous_env is None:
            os.environ.pop(TRACKING_URI_VARIABLE, None)
        else:
            os.environ[TRACKING_URI_VARIABLE] = previous_env
        pickle_warning.removeFilter(quiet)
    uri = f"runs:/{run.run_id}/encoder"
    registered = f", registered as {register_as}" if register_as else ""
    log.info(f"encoder logged as an MLflow model: mlflow.pytorch.load_model('{uri}'){registered} (a pickled "
             "module: load it from stores you trust; encoder.pt holds the weights alone)")
    return uri
