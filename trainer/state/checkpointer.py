"""The run's checkpointer. As torchtitan's, it is given the run's stateful parts (model, optimizer,
scaler, online probe, ``TrainState``) and asks each for its own state; it adds every rank's RNG
state and the config, finds and checks what to resume from (``trainer.state.resume``), and reconciles a
change of world size in one place (``resume``). The file itself is ``trainer.state.checkpoint``'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundation.collectives import barrier, gather_objects
from foundation.logs import get_logger
from foundation.seeds import derive_seed
from trainer.config import Config, config_to_dict
from trainer.runtime.distributed import DistInfo
from trainer.state.checkpoint import (
    Stateful,
    TrainState,
    checkpoint_dir,
    find_resume_checkpoint,
    folder_identity,
    list_checkpoints,
    remove_stale_temp_files,
    save_checkpoint,
)
from trainer.state.resume import ResumeChanges, check_start_over, reconcile
from trainer.state.rng_state import capture_rng, restore_rng, seed_everything

log = get_logger()


class Checkpointer:
    """This run's checkpoints, of the run's stateful parts (``train_state``'s keys are the file's
    top level; the probe is optional: an older checkpoint without one gives a fresh probe).
    ``resume`` finds and checks the state to continue from, loads every part, and restores this
    rank's RNG; ``save`` gathers every rank's RNG state (a collective) and rank 0 writes
    atomically, keeping the newest ``checkpoint.keep_last``."""

    def __init__(self, cfg: Config, info: DistInfo, train_state: TrainState, model: Stateful, optimizer: Stateful,
                 scaler: Stateful, online_probe: Stateful | None = None) -> None:
        self.cfg, self.info, self.train_state = cfg, info, train_state
        self.states = {"model": model, "optimizer": optimizer, "scaler": scaler}  # by their key in the file
        if online_probe is not None:
            self.states["online_probe"] = online_probe
        self.run_dir = Path(cfg.train.run_dir)
        self.directory = checkpoint_dir(self.run_dir)
        self.changes = ResumeChanges(0)  # what a resume changed (set by resume)

    def resume(self) -> bool:
        """Load the newest usable checkpoint (or ``checkpoint.resume``) into the parts; False when
        the run starts fresh."""
        if self.info.is_main:
            remove_stale_temp_files(self.directory)
        if self.cfg.checkpoint.resume == "none":
            self._start_over()
        self.train_state.run_folder = folder_identity(self.run_dir)
        path, state = find_resume_checkpoint(self.run_dir, self.cfg.checkpoint.resume)
        if state is None:
            return False
        self.changes = reconcile(state, self.cfg, path, self.train_state.data)
        classes_changed = (state.get("data") or {}).get("classes", []) != self.train_state.data.get("classes", [])
        for key, part in self.states.items():
            if key == "online_probe" and classes_changed:  # other classes (allow_changes): a fresh probe
                continue
            if state.get(key) is not None:  # an older checkpoint without a part (the probe): it starts fresh
                part.load_state_dict(state[key])
        self.train_state.load_state_dict(state)
        rng = state.get("rng") or []
        if len(rng) == self.info.world_size:
            restore_rng(rng[self.info.rank])
        else:  # another world size: this rank's streams derived from the run's seed and the step
            seed_everything(derive_seed(self.cfg.train.seed, state["step"]), self.info.rank)
        if self.info.is_main:
            log.info(f"resumed from {path} at step {state['step']}")
            if len(rng) != self.info.world_size:
                log.info(f"the checkpoint was written by {len(rng)} ranks, this job has {self.info.world_size}: "
                         "the same global batches follow, each rank's random streams are derived afresh")
        return True
    def _start_over(self) -> None:
        """``checkpoint.resume=none`` in a folder that holds another run's checkpoints would leave
        them to be picked by the next plain resume (with their MLflow run): refused, unless
        ``train.overwrite=true`` says to replace that run's files."""
        found = list_checkpoints(self.directory)
        if not found:
            return
        check_start_over(self.cfg, found)
        if self.info.is_main:
            for path in found:
                path.unlink(missing_ok=True)
            for name in ("metrics.jsonl", "mlflow_run.json", "encoder.pt", "curves.png"):
                (self.run_dir / name).unlink(missing_ok=True)
            log.info(f"train.overwrite=true: the earlier run's checkpoints and files in {self.run_dir} were "
                     "removed")
        barrier()  # no rank looks at the folder while rank 0 clears it

    def _gather_rng(self) -> list[dict[str, Any]]:
        return gather_objects(capture_rng())

    def save(self) -> None:
        """Every rank calls this at the same step (that of ``train_state``)."""
        rng = self._gather_rng()
        if self.info.is_main:
            parts = {key: part.state_dict() for key, part in self.states.items()}
            save_checkpoint({**parts, **self.train_state.state_dict(), "rng": rng, "config": config_to_dict(self.cfg)},
                            self.directory, self.cfg.checkpoint.keep_last)
