"""User errors at the command line are one line naming the problem and the fix (exit 2): a bad
--nproc, CUDA without a GPU, bad sync and make-demo-data arguments, a key given twice, more local
ranks than GPUs, a batch of one; and rank 0 says at start where the run writes and what it reads."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.runs import assert_one_line_error, simclr, tiny_overrides
from trainer.config import load_config
from trainer.run.loop import train


@pytest.mark.slow
@pytest.mark.parametrize("over,needle", [({"train.micro_batch": 3}, "train.micro_batch=3"),
                                         ({"train.device": "cuda"}, "train.device=cuda")],
                         ids=["micro-batch", "cuda-without-gpu"])
def test_a_user_error_inside_the_ranks_is_one_line(photo_data, tmp_path, over, needle):
    """Found by every rank after the launch: printed once, exit 2, no torchrun traceback."""
    if "train.device" in over and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = simclr("train", "--nproc", "2", *tiny_overrides(photo_data / "train", tmp_path / "run", **over))
    assert_one_line_error(proc, needle)


def test_nproc_is_validated_before_any_rank_starts(photo_data, tmp_path):
    over = tiny_overrides(photo_data / "train", tmp_path / "run")
    assert_one_line_error(simclr("train", "--nproc", "3", *over), "--nproc 3", "data.batch_size=8")
    assert_one_line_error(simclr("train", "--nproc", "0", *over), "--nproc 0", "at least 1")


def test_cuda_without_a_gpu_is_a_user_error(photo_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = simclr("train", *tiny_overrides(photo_data / "train", tmp_path / "run", **{"train.device": "cuda"}))
    assert_one_line_error(proc, "train.device=cuda", "train.device=cpu")


def test_sync_and_make_demo_data_user_errors(tmp_path):
    assert_one_line_error(simclr("sync", str(tmp_path / "nope")), "nope", "metrics.jsonl")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "time_ms": 1, "loss": 1.0}\n')
    from trainer.runtime.distributed import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(simclr("sync", str(run_dir), "--uri", dead), "unreachable", "nothing was lost")
    assert_one_line_error(simclr("make-demo-data", "--out", str(tmp_path / "d"), "--size", "0"), "--size")
    assert_one_line_error(simclr("make-demo-data", "--out", str(tmp_path / "d"), "--train-per-class", "0"),
                          "--train-per-class")


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    from trainer.config import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.5\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="'lr' is given twice.*lines 2 and 3"):
        load_config(recipe)


@pytest.mark.parametrize("visible,local_rank,expected", [(8, 3, 3), (1, 3, 0), (1, 0, 0)])
def test_device_choice_fits_both_cluster_gpu_layouts(monkeypatch, visible, local_rank, expected):
    """All GPUs of a node visible to every task (index = LOCAL_RANK), or only the task's own one
    (CUDA_VISIBLE_DEVICES holds one device: index 0 whatever LOCAL_RANK is)."""
    from trainer.runtime.device import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert choose_device("auto", local_rank) == torch.device("cuda", expected)


def test_more_local_ranks_than_visible_gpus_is_a_user_error(monkeypatch):
    from trainer.config import ConfigError
    from trainer.runtime.device import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK=3.*2 GPUs.*CUDA_VISIBLE_DEVICES"):
        choose_device("cuda", 3)


def test_nproc_on_a_resume_names_the_rank_counts_not_a_new_batch(tiny_config, photo_data, tmp_path):
    """A resumed run cannot change its batch: the advice is the world sizes that divide it."""
    train(tiny_config(**{"train.stop_after_steps": 2, "tracking.enabled": "false"}))
    proc = simclr("train", "--nproc", "3", *tiny_overrides(photo_data / "train", tmp_path / "run",
                                                             **{"tracking.enabled": "false"}))
    assert_one_line_error(proc, "--nproc 3", "resumes with", "--nproc among 1, 2, 4, 8")
    assert "multiple of" not in proc.stderr


def test_a_batch_of_one_is_refused_and_fp16_on_the_cpu_is_warned(tiny_config, capsys):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="data.batch_size.*at least 2.*no negatives"):
        tiny_config(**{"data.batch_size": 1})
    train(tiny_config(**{"precision.dtype": "fp16", "train.stop_after_steps": 1, "tracking.enabled": "false",
                         "model.arch": "timm/test_resnet", "model.cifar_stem": "false"}))
    assert capsys.readouterr().err.count("warning: precision.dtype=fp16 on the CPU runs about 20x slower") == 1


def test_rank_zero_says_at_start_where_the_run_writes_what_it_reads_and_where_to_watch(tiny_config, capsys,
                                                                                        monkeypatch):
    result = train(tiny_config(**{"train.stop_after_steps": 2}))
    out = capsys.readouterr().out
    assert f"[simclr] run folder {result.run_dir} (new run; 20 steps in all)" in out
    assert "80 images, 10 classes, labelled; 10 steps per epoch of 8 (1 rank(s) x 8), torchvision backend" in out
    assert f"MLflow run {result.run_id} at sqlite:///" in out and "mlflow ui --backend-store-uri" in out
    import trainer.losses.nt_xent as loss_module

    monkeypatch.setattr(loss_module, "nt_xent", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        train(tiny_config())
    err = capsys.readouterr().err
    assert f"MLflow run {result.run_id}" in err and "ended FAILED" in err  # a crash names its run


def test_two_configs_or_verbose_with_quiet_are_refused():
    """Round 7, F56: a second --config silently replaced the first; F47: --verbose --quiet together."""
    proc = simclr("train", "--dry-run", "--config", "demo_cpu", "--config", "cifar10_resnet18")
    assert proc.returncode == 2 and "--config given twice (demo_cpu, cifar10_resnet18)" in proc.stderr, proc.stderr
    proc = simclr("--verbose", "--quiet", "train", "--dry-run")
    assert proc.returncode == 2 and "--verbose and --quiet together" in proc.stderr, proc.stderr
