"""What a resume may change: this job's config and data compared with the checkpoint's run, by the
policies declared on the config's fields (``foundation/resume_policy.py``); refused with one line
naming the keys and the fix, or recorded as ``ResumeChanges``. ``check_resume`` says what a start
would do, before any rank starts (``simclr train --check``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.sources import data_changes
from foundation.resume_policy import resume_policies
from trainer.config import Config, config_to_dict
from trainer.runtime.dataclass_yaml import flatten
from trainer.state.checkpoint import CheckpointError, checkpoint_dir, find_resume_checkpoint, list_checkpoints

# What a resume may do with each key: declared on the config's fields (foundation/resume_policy.py)
RESUME_POLICY = resume_policies(Config)


@dataclass
class ResumeChanges:
    """What differs between a checkpoint's run and this job: run settings (allowed), changed
    hyper-parameters and a changed dataset (allowed by ``checkpoint.allow_changes=true``), each
    recorded in MLflow as a change at ``step``."""

    step: int
    settings: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (old, new)
    hyper: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.settings or self.hyper or self.data)


def describe_changes(diff: dict[str, tuple[Any, Any]]) -> list[str]:
    """``key old -> new`` for each change; a list of sections (``data.views``) item by item and key by
    key (``data.views[1].count 4 -> 6``; ``data.views[2] added: {count: 2, size: 16}``), its unset keys
    left out."""
    said = []
    for key, (old, new) in diff.items():
        if not (isinstance(old, list) and isinstance(new, list) and all(isinstance(x, dict) for x in old + new)):
            said.append(f"{key} {old!r} -> {new!r}")
            continue
        for i, (a, b) in enumerate(zip(old, new)):
            names = [*a, *(k for k in b if k not in a)]
            said += [f"{key}[{i}].{name} {a.get(name)!r} -> {b.get(name)!r}" for name in names
                     if a.get(name) != b.get(name)]
        for i, item in list(enumerate(old))[len(new):]:
            said.append(f"{key}[{i}] removed: {_compact(item)}")
        for i, item in list(enumerate(new))[len(old):]:
            said.append(f"{key}[{i}] added: {_compact(item)}")
    return said


def _compact(item: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in item.items() if v is not None) + "}"


def _said(diff: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(describe_changes(diff))


def reconcile(state: dict[str, Any], cfg: Config, path: Path, data_now: dict[str, Any]) -> ResumeChanges:
    """What this job changes against the checkpoint's run; refuses (one line naming the keys and the
    fix) what cannot continue, and changed hyper-parameters or data unless
    ``checkpoint.allow_changes=true``."""
    # a mapping field (loss.options) compares whole: an option added on resume is a change too
    saved, wanted = (flatten(tree, leaves=RESUME_POLICY) for tree in (state["config"], config_to_dict(cfg)))
    diff = {k: (saved[k], v) for k, v in wanted.items() if k in saved and saved[k] != v}
    changes = ResumeChanges(int(state["step"]))
    policy = {k: RESUME_POLICY.get(k, "hyper") for k in diff}  # a key of an older release: a hyper-parameter
    fixed = {k: d for k, d in diff.items() if policy[k] == "fixed"}
    if fixed:
        raise CheckpointError(f"checkpoint {path} cannot continue with {_said(fixed)} (the weights would not load, or "
                              "the data position would not match); resume with the run's own values, or start a new "
                              "run: checkpoint.resume=none with a new train.run_dir")
    changes.settings = {k: d for k, d in diff.items() if policy[k] == "setting"}
    changes.hyper = {k: d for k, d in diff.items() if policy[k] == "hyper"}
    if state.get("data") and data_now:
        changes.data = data_changes(state["data"], data_now)
    if (changes.hyper or changes.data) and not cfg.checkpoint.allow_changes:
        what = "; ".join(([f"these settings changed: {_said(changes.hyper)}"] if changes.hyper else []) +
                         ([f"data.root changed: {', '.join(changes.data)}"] if changes.data else []))
        raise CheckpointError(f"the run in {cfg.train.run_dir} resumes from {path.name} (step {changes.step}), but "
                              f"{what}. Resume with what the run started with (its config.yaml; the same dataset), "
                              "or add checkpoint.allow_changes=true to go on with this (recorded in MLflow as a change "
                              "at that step), or start a new train.run_dir")
    return changes


def check_start_over(cfg: Config, found: list[Path]) -> None:
    """``checkpoint.resume=none`` over an earlier run's checkpoints needs ``train.overwrite=true``."""
    if found and not cfg.train.overwrite:
        raise CheckpointError(f"checkpoint.resume=none, but {cfg.train.run_dir} holds the checkpoints of an earlier "
                              f"run (newest {found[0].name}), which a later resume would pick up instead of this "
                              "run's; use a new train.run_dir, or add train.overwrite=true to replace that run")


def check_resume(cfg: Config) -> str:
    """What a start of ``cfg`` would do with its run folder, in words, or the refusal the run would
    meet (the checks of ``Checkpointer.resume``, less the dataset's, which needs its listing)."""
    if cfg.checkpoint.resume == "none":
        check_start_over(cfg, list_checkpoints(checkpoint_dir(cfg.train.run_dir)))
        return "starts a new run"
    path, state = find_resume_checkpoint(cfg.train.run_dir, cfg.checkpoint.resume)
    if state is None:
        return "starts a new run"
    changes = reconcile(state, cfg, path, {})
    changed = f", with changes: {', '.join([*changes.settings, *changes.hyper])}" if changes.settings or changes.hyper \
        else ""
    return f"resumes from {path} (step {changes.step}){changed}; the dataset is compared with the checkpoint's at start"
