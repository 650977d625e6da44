import os

import pytest
import torch

from trainer.state import checkpoint as ckpt
from trainer.state.rng_state import capture_rng, restore_rng


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "step": step, "epoch": 0,
            "step_in_epoch": step, "config": {"model": {}}, "rng": [capture_rng()]}


def test_atomic_save_keeps_last_k(tmp_path):
    for s in range(1, 6):
        ckpt.save_checkpoint(state(s), tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000000005.pt", "step_000000004.pt"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_auto_resume_skips_corrupt_newest(tmp_path, capsys):
    run = tmp_path
    d = ckpt.checkpoint_dir(run)
    ckpt.save_checkpoint(state(3), d, keep_last=5)
    newest = ckpt.save_checkpoint(state(6), d, keep_last=5)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a crash mid-copy would leave it
    path, loaded = ckpt.find_resume_checkpoint(run, "auto")
    said = capsys.readouterr().err
    assert "warning: skipping an unusable checkpoint" in said and "step_000000006.pt is unreadable" in said
    assert "Warning" not in said  # one line of ours, not Python's two-line warning
    assert path.name == "step_000000003.pt" and loaded["step"] == 3
    assert newest.exists()  # reported, not deleted


def test_explicit_bad_path_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="x.pt is unreadable"):
        ckpt.find_resume_checkpoint(tmp_path, str(bad))
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match="lacks"):
        ckpt.load_checkpoint(tmp_path / "foreign.pt")


def test_none_and_empty(tmp_path):
    assert ckpt.find_resume_checkpoint(tmp_path, "none") == (None, None)
    assert ckpt.find_resume_checkpoint(tmp_path, "auto") == (None, None)


def test_rng_roundtrip_through_weights_only_file(tmp_path):
    import random

    import numpy as np

    ckpt.save_checkpoint(state(1), tmp_path, keep_last=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[0])  # weights_only=True inside
    restore_rng(loaded["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_checkpoint_that_is_a_folder_code_or_a_string_version_is_one_clear_line(tmp_path):
    """A run folder passed as a checkpoint was said 'not to exist'; a pickle carrying code got
    torch's advice to load it unsafely; a string format_version gave a TypeError."""
    run = tmp_path / "run"
    run.mkdir()
    newest = ckpt.save_checkpoint(state(3), ckpt.checkpoint_dir(run), keep_last=2)
    for load in (lambda p: ckpt.find_resume_checkpoint(tmp_path, str(p)), ckpt.load_weights):
        for folder in (run, run / "checkpoints"):
            said = f"{folder} is a folder \\(its newest checkpoint: {newest}\\)"
            with pytest.raises(ckpt.CheckpointError, match=said):
                load(folder)

    (run / "encoder.pt").write_bytes(b"")  # a finished run: eval and embed are pointed at its export
    with pytest.raises(ckpt.CheckpointError, match=f"its exported encoder: {run / 'encoder.pt'}"):
        ckpt.load_weights(run)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "PWNED"),))

    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "step": 1, "model": Payload()}, evil)
    for load in (ckpt.load_checkpoint, ckpt.load_weights):
        with pytest.raises(ckpt.CheckpointError, match="holds Python objects other than tensors") as err:
            load(evil)
        assert "weights_only" not in str(err.value) and "will likely succeed" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()

    odd = tmp_path / "vstr.pt"
    torch.save({**state(2), "format_version": "1"}, odd)
    with pytest.raises(ckpt.CheckpointError, match="format_version '1', not a number"):
        ckpt.load_checkpoint(odd)
