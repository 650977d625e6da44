import pytest
import torch

from trainer import checkpoint as ckpt


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "step": step, "epoch": 0,
            "step_in_epoch": step, "config": {"model": {}}, "rng": [ckpt.capture_rng()]}


def test_atomic_save_keeps_last_k(tmp_path):
    for s in range(1, 6):
        ckpt.save_checkpoint(state(s), tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000000005.pt", "step_000000004.pt"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_auto_resume_skips_corrupt_newest(tmp_path):
    run = tmp_path
    d = ckpt.checkpoint_dir(run)
    ckpt.save_checkpoint(state(3), d, keep_last=5)
    newest = ckpt.save_checkpoint(state(6), d, keep_last=5)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a crash mid-copy would leave it
    with pytest.warns(UserWarning, match="step_000000006.pt is unreadable"):
        path, loaded = ckpt.find_resume_checkpoint(run, "auto")
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
    ckpt.restore_rng(loaded["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
