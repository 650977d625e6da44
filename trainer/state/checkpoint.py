"""One checkpoint format and one atomic writer, used by the train loop (regular, final and
pre-emption checkpoints) and by ``simclr eval``. Files are ``<run_dir>/checkpoints/step_<N>.pt``;
loading is ``weights_only``.

The file format, discovery, checks and the train state live here; the run's ``Checkpointer``
(which parts go in, RNG, resume) in ``trainer.state.checkpointer``, what a resume may change in
``trainer.state.resume``. Nothing outside these modules and the parts' own ``state_dict`` methods names a
key of the file."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from foundation.atomic_files import atomic_path
from foundation.errors import UserError
from foundation.logs import get_logger

log = get_logger()

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")
REQUIRED_KEYS = ("format_version", "model", "optimizer", "step", "epoch", "step_in_epoch", "config")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The loop's own state: where it is, which world sizes ran it, and its tracking (the tracker's
    state, opaque here: which MLflow run it continues). Its keys are the top level of the checkpoint
    file (format 1)."""

    steps_per_epoch: int
    world_size: int  # this job's
    step: int = 0
    world_size_history: list[list[int]] = field(default_factory=list)  # [step, world size] at each (re)start
    tracking: dict[str, Any] = field(default_factory=dict)  # Tracker.state_dict()
    world_size_changed: bool = False  # set by a resume on another world size than the checkpoint's
    run_folder: dict[str, Any] = field(default_factory=dict)  # this run folder's path and inode
    data: dict[str, Any] = field(default_factory=dict)  # the dataset's fingerprint (data_fingerprint)
    # set by a resume from another folder's checkpoint: the tracking it came from, and that folder
    parent_tracking: dict[str, Any] = field(default_factory=dict)
    parent_folder: str | None = None

    def __post_init__(self) -> None:
        self.world_size_history = self.world_size_history or [[0, self.world_size]]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                "step_in_epoch": self.step % self.steps_per_epoch, "world_size": self.world_size,
                "world_size_history": self.world_size_history, "tracking": self.tracking,
                "run_folder": self.run_folder, "data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tracking = state["step"], tracking_state(state)
        self.world_size_history = state.get("world_size_history") or [[0, state.get("world_size", self.world_size)]]
        if self.world_size_history[-1][1] != self.world_size:  # a resume on another world size
            self.world_size_history.append([self.step, self.world_size])
            self.world_size_changed = True
        saved = state.get("run_folder") or {}
        if saved and not same_folder(saved, self.run_folder):
            # a copied folder, or another run's checkpoint: this folder gets its own MLflow run, never
            # appending to the one it came from (two folders would write one run's steps twice)
            self.parent_tracking, self.parent_folder, self.tracking = self.tracking, saved.get("path"), {}


def tracking_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's tracking state; one written before the tracker kept its own state named only
    its MLflow run (``mlflow_run_id``)."""
    if "tracking" in state:
        return dict(state["tracking"] or {})
    return {"mlflow": {"run_id": state["mlflow_run_id"]}} if state.get("mlflow_run_id") else {}


def folder_identity(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's identity: its resolved path and its inode. A moved folder keeps its inode, the
    same folder seen on another node keeps its path; a copy has neither."""
    path = Path(run_dir).resolve()
    return {"path": str(path), "inode": path.stat().st_ino if path.exists() else None}


def same_folder(saved: dict[str, Any], here: dict[str, Any]) -> bool:
    return saved.get("path") == here.get("path") or (saved.get("inode") is not None
                                                      and saved.get("inode") == here.get("inode"))


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint file of a run folder (by step; not opened), or None."""
    found = list_checkpoints(checkpoint_dir(run_dir))
    return found[0] if found else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in ``directory``, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict[str, Any], directory: str | Path, keep_last: int) -> Path:
    """Write ``state`` atomically (temp file, fsync, rename, fsync dir), then drop all but the
    newest ``keep_last``. A crash at any moment leaves the previous checkpoints intact. The folder
    above ``directory`` (the run folder) must exist: made again here, a run folder moved meanwhile
    would be split in two, so its absence raises FileNotFoundError for the loop to explain."""
    directory = Path(directory)
    directory.mkdir(exist_ok=True)
    final = directory / f"step_{state['step']:09d}.pt"
    written, free = 0, None  # how far a failed write got, and the room left then: a full disk or another failure
    try:
        # an open file, closed before the temporary is removed: torch's writer given a path keeps its
        # descriptor alive in the traceback, and the space of a file still open is not freed
        with atomic_path(final) as tmp, open(tmp, "wb") as f:
            try:
                torch.save({"format_version": FORMAT_VERSION, **state}, f)
            except BaseException:  # measured while the partial file still holds its space
                written, free = os.fstat(f.fileno()).st_size, shutil.disk_usage(directory).free
                raise
    except FileNotFoundError:  # the run folder was moved or removed meanwhile: the loop says where it went
        raise
    except (OSError, RuntimeError) as exc:  # disk full (torch's zip writer raises RuntimeError), quota, I/O
        full = getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < max(written, 2**20))
        previous = list_checkpoints(directory)
        kept = f"the previous checkpoint {previous[0]} is intact and stays the newest" if previous else \
            "no earlier checkpoint exists"
        why = "no space left on device" if full else str(exc).strip().splitlines()[0]
        fewer = " (or lower checkpoint.keep_last)" if len(previous) > 1 else ""  # only older ones could go
        raise CheckpointError(f"could not write checkpoint {final}: {why}; {kept}. Free space in {directory}"
                              f"{fewer}, then run again to resume") from None
    for old in list_checkpoints(directory)[keep_last:]:
        old.unlink(missing_ok=True)
    return final


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the partial ``.step_*.pt.tmp-*`` files a killed writer left behind (they are never
    read, and on a full disk each retry would add another)."""
    directory = Path(directory)
    stale = sorted(directory.glob(".step_*.pt.tmp-*")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_integrity(path: Path, what: str = "checkpoint") -> None:
    """Every part of a torch file against the CRC its zip stored (``torch.load`` does not check
    them: flipped bytes inside a tensor would load silently and train on)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{what} {path} is unreadable ({exc}): truncated, or not a torch file") from None
    if damaged is not None:
        raise CheckpointError(f"{what} {path} is unreadable: its part {damaged} fails its CRC check (bytes changed "
                              "on disk or in a copy); use an earlier checkpoint or a good copy")


def read_torch_file(path: Path, what: str, expected: str) -> Any:
    """The content of a torch file we wrote (tensors to CPU, ``weights_only``: never code), after its
    integrity check; a folder, a missing file, or a file holding code is one line saying what to pass
    (``expected``)."""
    if path.is_dir():  # a run folder, or its checkpoints/ folder
        newest = latest_checkpoint(path) or next(iter(list_checkpoints(path)), None)
        hint = f" (its newest checkpoint: {newest})" if newest else ""
        if what == "weights file" and (path / "encoder.pt").is_file():  # a finished run: its export is the answer
            hint = f" (its exported encoder: {path / 'encoder.pt'}; newest checkpoint: {newest})"
        raise CheckpointError(f"{what} {path} is a folder{hint}; pass {expected}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; pass {expected}")
    check_integrity(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():  # torch's advice to unpickle anyway is not repeated
            raise CheckpointError(f"{what} {path} holds Python objects other than tensors and plain values (a "
                                  "pickle can run code when loaded), so it is not loaded; simclr-scale writes none: "
                                  f"pass {expected} written by simclr-scale") from None
        raise CheckpointError(f"{what} {path} is unreadable (not a torch file); pass {expected}") from None
    except Exception as exc:  # truncated zip, foreign file: all mean 'unusable'
        raise CheckpointError(f"{what} {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]});"
                              f" it may be truncated or not ours; pass {expected}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check one checkpoint's integrity, then load it (tensors to CPU, ``weights_only=True``)."""
    path = Path(path)
    state = read_torch_file(path, "checkpoint", "a checkpoint file step_N.pt, or use checkpoint.resume=auto "
                            "with train.run_dir set to the run's folder")
    return _checked(state, path)


def _checked(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
        raise CheckpointError(f"checkpoint {path} lacks {missing}; not a simclr-scale training checkpoint")
    if not isinstance(state["format_version"], int) or isinstance(state["format_version"], bool):
        raise CheckpointError(f"checkpoint {path} has format_version {state['format_version']!r}, not a number: "
                              "not written by simclr-scale (or edited); use a checkpoint the run wrote")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format_version']}, newer than this "
                              f"simclr-scale ({FORMAT_VERSION}); upgrade the package")
    return state


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> tuple[Path | None, dict[str, Any] | None]:
    """``none``: start fresh. A path: that file (an error if unusable). ``auto``: the newest valid
    checkpoint of this run; a corrupt newest one is reported and the previous one used."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    found = list_checkpoints(checkpoint_dir(run_dir))
    for path in found:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning(f"skipping an unusable checkpoint: {exc}")
    if found:  # never start over on our own: that would abandon the run (and its MLflow run) silently
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} is usable ({len(found)} found, the newest "
                              f"{found[0].name} unreadable: truncated or not a checkpoint), so the run cannot resume; "
                              "nothing was started. Resume from a copy (checkpoint.resume=/path/to/step_N.pt), or "
                              "start this run over with checkpoint.resume=none train.overwrite=true")
    return None, None


@dataclass
class SavedWeights:
    """What evaluation reads from a file: a training checkpoint (the SimCLR model, encoder and head,
    and the run's config) or an exported encoder (its weights alone; the config is beside it)."""

    path: Path
    model: dict[str, torch.Tensor]  # a checkpoint: the SimCLR model; an export: the encoder
    config: dict[str, Any] | None  # the run's config when the file is a checkpoint, else None

    @property
    def is_checkpoint(self) -> bool:
        return self.config is not None

    def encoder(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, whichever file this is."""
        if not self.is_checkpoint:
            return self.model
        return {k[len("encoder."):]: v for k, v in self.model.items() if k.startswith("encoder.")}


def load_weights(path: str | Path) -> SavedWeights:
    """A checkpoint ``step_N.pt`` or an exported ``encoder.pt``, read once (``weights_only``)."""
    path = Path(path)
    content = read_torch_file(path, "weights file", "a checkpoint step_N.pt or an exported encoder.pt")
    if isinstance(content, dict) and "format_version" in content:
        state = _checked(content, path)  # the checkpoint's own checks
        return SavedWeights(path, state["model"], state["config"])
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return SavedWeights(path, content, None)
    raise CheckpointError(f"{path} is neither a simclr-scale checkpoint nor an exported encoder state dict")
