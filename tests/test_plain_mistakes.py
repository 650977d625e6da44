"""Plain mistakes are one line naming the problem and the fix (exit 2), never a traceback: run
in-process through the CLI's own parser and error handling."""

from __future__ import annotations

import pickle

import pytest

from tests.dataset_layouts import write_cifar
from tests.helpers.runs import tiny_overrides


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from launch.cli import main

    with pytest.raises(SystemExit) as ended:
        main(argv)
    return ended.value.code, capsys.readouterr().err


def one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("simclr: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_binary_file_or_a_folder_as_config(tmp_path, capsys):
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line(*run_cli(["train", "--config", str(binary)], capsys), str(binary), "not a text file")
    one_line(*run_cli(["train", "--config", str(tmp_path)], capsys), str(tmp_path), "is a directory")


def test_a_home_relative_config_is_expanded(tmp_path, capsys, monkeypatch):
    from trainer.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "recipe.yaml").write_text("train:\n  epochs: 3\n")
    assert load_config("~/recipe.yaml").train.epochs == 3


def test_run_dir_that_is_a_file(photo_data, tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    one_line(*run_cli(["train", *tiny_overrides(photo_data / "train", afile)], capsys), "train.run_dir", "is a file")


@pytest.mark.parametrize("content,needle", [([1, 2, 3], "holds a list"),
                                            ({b"data": b"x", b"batch_label": b"b"}, "has no 'labels'")],
                         ids=["top-level-list", "no-labels"])
def test_a_broken_cifar_pickle(tmp_path, capsys, content, needle):
    from data_pipeline import DataError, open_source

    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump(content, f, protocol=2)
    with pytest.raises(DataError, match=needle):
        open_source(root, "train")


def test_make_shards_into_an_existing_file(photo_data, tmp_path, capsys):
    out = tmp_path / "shards.tar"
    out.write_text("x")
    one_line(*run_cli(["make-shards", str(photo_data / "train"), str(out)], capsys), str(out), "is a file")
    assert out.read_text() == "x"


@pytest.mark.parametrize("argv,needle", [(["--batch-size", "0"], "--batch-size 0"),
                                         (["--batch-size", "-4"], "--batch-size -4"),
                                         (["--iters", "0"], "--iters 0"),
                                         (["--scaling", "0", "2"], "--scaling 0")])
def test_absurd_bench_sizes(capsys, argv, needle):
    one_line(*run_cli(["bench", *argv], capsys), needle, "at least")


def test_absurd_feed_benchmark_sizes(capsys):
    one_line(*run_cli(["bench", "feed", "--steps", "0"], capsys), "--steps 0", "at least 1")


def test_every_subcommand_explains_itself_and_each_option():
    """--help was empty for demo, sync and make-demo-data, and for most options of eval and bench."""
    import argparse

    from launch.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        assert command.description, f"simclr {name} --help has no description"
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"simclr {name}: {action.option_strings or action.dest} has no help"
    import benchmarks.feed
    import benchmarks.throughput

    for module in (benchmarks.throughput, benchmarks.feed):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])


def test_home_in_path_keys_is_expanded(tmp_path, monkeypatch):
    """``data.root=~/x`` reaches the program unexpanded (the shell expands only a leading ~)."""
    from trainer.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["train.run_dir=~/runs/a", "data.root=~/data/train", "checkpoint.resume=~/c/step_1.pt"])
    assert cfg.train.run_dir == str(tmp_path / "runs" / "a") and cfg.data.root == str(tmp_path / "data" / "train")
    assert cfg.checkpoint.resume == str(tmp_path / "c" / "step_1.pt")


def test_an_unreadable_data_root_is_named_as_such(photo_data, monkeypatch):
    import os

    from data_pipeline import DataError, layouts, open_source

    root = photo_data / "train"
    real = os.access
    monkeypatch.setattr(layouts.os, "access", lambda p, mode: str(p) != str(root) and real(p, mode))
    with pytest.raises(DataError, match=f"data path {root} cannot be read by this user"):
        open_source(root)


def test_a_run_dir_under_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    import os

    from trainer.config import ConfigError, load_config
    from trainer.run.loop import preflight
    from trainer.runtime import run_files

    real = os.access
    monkeypatch.setattr(run_files.os, "access", lambda p, mode: str(p) != str(tmp_path) and real(p, mode))
    with pytest.raises(ConfigError, match=f"train.run_dir.*{tmp_path} is not writable"):
        preflight(load_config(None, [f"train.run_dir={tmp_path / 'new' / 'run'}"]))


def test_sync_bn_blocks_that_do_not_split_the_ranks(photo_data, tmp_path, capsys):
    """Said by the launcher before any rank starts (each rank used to fail with a traceback)."""
    argv = ["train", "--dry-run", "--nproc", "4", *tiny_overrides(photo_data / "val", tmp_path / "run"),
            "model.sync_bn_group_size=3"]
    one_line(*run_cli(argv, capsys), "model.sync_bn_group_size=3 does not divide the 4 ranks of --nproc 4",
             "one of 1, 2, 4")


@pytest.mark.parametrize("device, said", [("cpu", "(train.device=cpu)"), ("auto", "(no CUDA device is visible")])
def test_nccl_on_the_cpu(photo_data, tmp_path, capsys, device, said):
    """NCCL moves CUDA tensors only: said before any rank starts, not as torch's traceback from each."""
    argv = ["train", "--dry-run", "--nproc", "2", *tiny_overrides(photo_data / "val", tmp_path / "run"),
            "dist.backend=nccl", f"train.device={device}"]
    one_line(*run_cli(argv, capsys), "dist.backend=nccl moves CUDA tensors only", said, "dist.backend=auto")


def test_a_dry_run_that_cannot_run_is_not_ok(photo_data, tmp_path, capsys):
    """``--dry-run`` said "config OK" for a missing or empty data.root and for a run folder the run
    could not resume; now it meets the same refusal the run would, and says what the run would do."""
    from launch.cli import main
    from tests.helpers.runs import tiny_overrides
    from trainer.config import load_config
    from trainer.run.loop import train

    def dry(*over: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(["train", "--dry-run", *over])
        said = capsys.readouterr()
        return stop.value.code, said.out, said.err

    run = tmp_path / "run"
    base = tiny_overrides(photo_data / "train", run, **{"tracking.enabled": "false", "train.stop_after_steps": 2})
    code, _, err = dry(*base, f"data.root={tmp_path / 'nowhere'}")
    assert code == 2 and "data path" in err and "nowhere" in err and "does not exist" in err
    code, _, err = dry(*base, "data.root=")
    assert code == 2 and "data path (empty) does not exist; set data.root" in err
    code, out, _ = dry(*base)
    assert code == 0 and "config OK" in out and "the run starts a new run" in out
    train(load_config(None, base))
    code, out, _ = dry(*base)
    assert code == 0 and "the run resumes from" in out and "(step 2)" in out
    code, _, err = dry(*base, "data.batch_size=16")
    assert code == 2 and "cannot continue with data.batch_size 8 -> 16" in err, err
    code, _, err = dry(*base, "checkpoint.resume=none")
    assert code == 2 and "train.overwrite=true" in err


def test_overrides_after_options_and_the_version(photo_data, tmp_path, capsys):
    """``simclr train --nproc 2 train.epochs=1`` was "unrecognized arguments"; ``simclr --version``
    asked for a command."""
    from importlib.metadata import version

    from launch.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"simclr-scale {version('simclr-scale')}"
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.root={photo_data / 'train'}", "--dry-run", f"train.run_dir={run}", "train.epochs=3",
              "tracking.enabled=false"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and f"run_dir: {run}" in out and "epochs: 3" in out
    with pytest.raises(SystemExit) as stop:
        main(["train", "--dry-run", "--no-such-option", "train.epochs=3"])
    assert stop.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err
