"""simclr eval's refusals and warnings: a corrupt image in an evaluation set, an architecture that
does not fit the weights, class sets that differ, numbers that would mislead, a fine-tuning
fraction out of range; an exported encoder is recognised under any name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.runs import assert_one_line_error, corrupt_copy, simclr, tiny_overrides
from trainer.config import load_config
from trainer.run.loop import train
from trainer.state import checkpoint as ckpt


def test_a_corrupt_image_in_an_evaluation_set_is_one_line(tiny_config, photo_data, tmp_path):
    """Evaluation's DataLoader workers re-raised the decode error with their traceback as the message."""
    train(tiny_config(**{"train.stop_after_steps": 2, "tracking.enabled": "false"}))
    root, bad = corrupt_copy(photo_data, tmp_path, "coffee", 1, b"\xff\xd8\xff\xe0" + b"\0" * 300 + b"\xff\xd9")
    proc = simclr("eval", "--checkpoint", str(ckpt.latest_checkpoint(tmp_path / "run")), "--train-data", str(root),
                  "--val-data", str(photo_data / "val"), "--device", "cpu", "--workers", "2", "--probe-epochs", "1")
    assert_one_line_error(proc, f"cannot decode image {bad}")


@pytest.fixture(scope="module")
def exported_encoder(photo_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    result = train(load_config(None, tiny_overrides(photo_data / "train", run, **{"train.epochs": 1,
                                                                                   "tracking.enabled": "false"})))
    return result.encoder_path


def test_eval_names_an_architecture_mismatch(exported_encoder, photo_data, tmp_path):
    import shutil

    folder = tmp_path / "mismatch"
    folder.mkdir()
    shutil.copy(exported_encoder, folder / "encoder.pt")
    config = yaml.safe_load((exported_encoder.parent / "config.yaml").read_text())
    config["model"].update(arch="resnet34", cifar_stem=False)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    proc = simclr("eval", "--checkpoint", str(folder / "encoder.pt"), "--train-data", str(photo_data / "train"),
                  "--val-data", str(photo_data / "val"), "--device", "cpu", "--workers", "0", "--probe-epochs", "1")
    assert_one_line_error(proc, "resnet34", "do not fit", "tensors missing")


def test_eval_recognises_an_exported_encoder_under_any_name(exported_encoder, photo_data, tmp_path):
    import shutil

    renamed = exported_encoder.parent / "rn18_photos_epoch1.pt"
    shutil.copy(exported_encoder, renamed)
    proc = simclr("eval", "--checkpoint", str(renamed), "--train-data", str(photo_data / "train"), "--val-data",
                  str(photo_data / "val"), "--device", "cpu", "--workers", "0", "--probe-epochs", "1",
                  "--no-baseline", "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "eval" / "report.json").exists()


def test_eval_refuses_different_class_sets(exported_encoder, photo_data, tmp_path):
    import shutil

    two = tmp_path / "two"
    for name in sorted(p.name for p in (photo_data / "val").iterdir())[:2]:
        shutil.copytree(photo_data / "val" / name, two / name)
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(two), "--val-data",
                  str(photo_data / "val"))
    assert_one_line_error(proc, "classes", str(two), "same classes")
    lacking = tmp_path / "lacking"  # the held-out set lacks one class: named, not only both lists shown
    shutil.copytree(photo_data / "val", lacking)
    gone = sorted(p.name for p in lacking.iterdir())[3]
    shutil.rmtree(lacking / gone)
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(photo_data / "train"),
                  "--val-data", str(lacking))
    assert_one_line_error(proc, f"the held-out set lacks {gone!r}")


def test_eval_says_when_its_numbers_mislead(exported_encoder, photo_data, tmp_path):
    """--val-data equal to --train-data, --finetune 1e-9 (1 image per class), --probe-epochs 0 and
    --finetune-epochs 0 all reported numbers with no note; now each is a note, in the report too."""
    out = tmp_path / "eval"
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(photo_data / "train"),
                  "--val-data", str(photo_data / "train"), "--probe-epochs", "0", "--finetune", "1e-9",
                  "--finetune-epochs", "0", "--no-baseline", "--device", "cpu", "--workers", "0", "--out", str(out),
                  "--no-mlflow")
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("[simclr] warning:")]
    for needle in ("the held-out set is the training set", "--probe-epochs 0", "--finetune-epochs 0",
                   "--finetune 1e-09: 1e-09 of the labels rounds to no image in 10 of 10 classes"):
        assert any(needle in note for note in notes), (needle, notes)
    assert len(notes) == 4 and (out / "report.md").read_text().count("Note: ") == 4


def test_eval_finetune_fraction_out_of_range_is_refused_before_any_work(exported_encoder, photo_data):
    proc = simclr("eval", "--checkpoint", str(exported_encoder), "--train-data", str(photo_data / "train"),
                  "--val-data", str(photo_data / "val"), "--finetune", "2.0")
    assert_one_line_error(proc, "--finetune 2", "(0, 1]")
    assert "linear_top1" not in proc.stdout
