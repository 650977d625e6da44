"""Where a run comes from: the code (git commit), the libraries, the dataset, the flattened
config as params, and the tags every run of ours carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer import package_version
from trainer.runtime.dataclass_yaml import flatten


def standard_tags(source: str) -> dict[str, str]:
    """MLflow's own system tags for a run we start, so that its UI shows who ran what from which
    commit ("Created by", "Source"): the user, the command, the kind of source, the commit (where
    known; the packaged version is always in ``simclr.version``)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = str(os.getuid())
    tags = {"mlflow.user": user, "mlflow.source.name": source,
            "mlflow.source.type": "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL",
            "simclr.version": package_version()}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str:
    """HEAD of this checkout; where the tree is a copy without ``.git`` (a container image, an
    exported tree), the commit it came from, passed as SIMCLR_GIT_COMMIT."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        found = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found or os.environ.get("SIMCLR_GIT_COMMIT", "") or "unknown"


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name, dist_name in (("torch", "torch"), ("torchvision", "torchvision"), ("mlflow", "mlflow"),
                            ("dali", "nvidia-dali-cuda130"), ("dali", "nvidia-dali-cuda120")):
        if name in versions:
            continue
        try:
            versions[name] = metadata.version(dist_name)
            if name == "dali":
                versions["dali_build"] = dist_name
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dataset_input(location: str, fingerprint: dict[str, Any], context: str) -> Any:
    """An MLflow dataset input for a dataset we fingerprinted (``data_fingerprint``): its digest is
    the fingerprint's (cut to MLflow's 32-character column), its source the data root or shard
    folder, its profile the count and classes; ``context`` is ``training`` or ``validation``. What
    fills the run page's Datasets column and the search and comparison by dataset."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = Path(location).name or location
    if name in ("train", "val", "test", "validation"):  # a split: name it after its dataset too
        name = f"{Path(location).parent.name}/{name}"
    profile = {"num_samples": fingerprint["samples"], "num_classes": len(fingerprint.get("classes", [])),
               "classes": fingerprint.get("classes", [])[:50]}
    dataset = Dataset(name=name, digest=fingerprint["listing_sha1"][:32], source_type="local",
                      source=json.dumps({"uri": str(location)}), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def run_params(config: dict[str, Any], world_size: int, backend: str, steps_per_epoch: int) -> dict[str, Any]:
    """A training run's MLflow params: the flattened config (its plain dict), the job's shape, the code
    and libraries."""
    return {**flatten(config), "world_size": world_size, "data.backend_resolved": backend,
            "steps_per_epoch": steps_per_epoch, "git_commit": git_commit(),
            **{f"version.{k}": v for k, v in library_versions().items()}}
