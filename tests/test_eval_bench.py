"""`simclr eval`, the kNN monitor and `simclr bench` on tiny inputs (the numbers are not asserted,
only that the protocol works and reports what it should)."""

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers.runs import PY, REPO, tiny_overrides
from trainer.config import load_config
from trainer.evaluation.evaluate import knn_accuracy, linear_probe
from trainer.run.loop import train


def test_probe_and_knn_separate_learnable_from_random_labels():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=gen) * 4
    y = torch.randint(0, 5, (400,), generator=gen)
    x = centers[y] + torch.randn(400, 32, generator=gen)
    lin = linear_probe(x[:300], y[:300], x[300:], y[300:], epochs=20)
    assert lin["top1"] > 0.9 and lin["top5"] == 1.0
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:], k=20) > 0.9
    shuffled = y[torch.randperm(400, generator=gen)]
    assert linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:], epochs=20)["top1"] < 0.45


@pytest.fixture(scope="module")
def trained_run(photo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(None, tiny_overrides(photo_data / "train", run / "run", **{
        "train.epochs": 2, "train.knn_every_epochs": 1, "data.val_root": str(photo_data / "val"),
        "tracking.uri": f"sqlite:///{run}/m.db"}))
    result = train(cfg)
    return run, result


def test_knn_monitor_is_logged_during_pretraining(trained_run):
    run, result = trained_run
    rows = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn/top1" in r]
    assert [r["step"] for r in knn] == [10, 20] and all(0 <= r["knn/top1"] <= 1 for r in knn)
    history = MlflowClient(f"sqlite:///{run}/m.db").get_metric_history(result.run_id, "knn/top1")
    assert [m.step for m in history] == [10, 20]


def test_eval_command_reports_probe_knn_finetune_tsne_and_logs_to_the_training_run(trained_run, photo_data):
    run, result = trained_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PY, "-m", "launch", "eval", "--checkpoint", str(result.encoder_path),
                           "--train-data", str(photo_data / "train"), "--val-data", str(photo_data / "val.npz"),
                           "--probe-epochs", "5", "--finetune", "0.5", "--finetune-epochs", "1", "--tsne",
                           "--workers", "0", "--device", "cpu", "--mlflow"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "run" / "eval"
    report = json.loads((out / "report.json").read_text())
    assert set(report["rows"]) == {"SimCLR", "random init"}
    for row in report["rows"].values():
        assert {"linear_top1", "linear_top5", "knn_top1", "finetune_0.5_top1"} <= set(row)
        assert all(0 <= row[k] <= 1 for k in row if k != "tsne")
    assert (out / "tsne_simclr.png").stat().st_size > 1000 and (out / "tsne_random_init.png").exists()
    assert "| SimCLR |" in proc.stdout and "| random init |" in proc.stdout
    client = MlflowClient(f"sqlite:///{run}/m.db")
    metrics = client.get_run(result.run_id).data.metrics
    assert "eval/linear_top1" in metrics and "eval/random_init_knn_top1" in metrics
    assert {a.path for a in client.list_artifacts(result.run_id, "eval")} >= {"eval/tsne_simclr.png",
                                                                              "eval/report.json",
                                                                              "eval/neighbours.png"}
    assert report["neighbours"] == str(out / "neighbours.png") and (out / "neighbours.png").stat().st_size > 10_000
    assert f"nearest neighbours (8 queries, each beside its 8 nearest training images): {out}" in proc.stdout


def test_neighbours_picture_shows_each_querys_nearest_training_images(tmp_path, photo_data):
    """A tiny set where the answer is known: each validation feature is a copy of one chosen training
    feature (some of another class), so its nearest neighbour must be that training image."""
    import numpy as np
    import torch
    from PIL import Image

    from data_pipeline import open_source
    from trainer.observe.plots import neighbours_plot, pick_queries

    train, val = open_source(photo_data / "train"), open_source(photo_data / "val")
    train_y, val_y = torch.as_tensor(train.labels), torch.as_tensor(val.labels)
    gen = torch.Generator().manual_seed(0)
    train_x = torch.randn(len(train), 32, generator=gen)
    target = torch.randint(0, len(train), (len(val),), generator=gen)  # any training image, any class
    val_x = train_x[target] + 1e-3 * torch.randn(len(val), 32, generator=gen)
    queries = pick_queries(val_y)
    assert len(queries) == 8 and len({int(val_y[q]) for q in queries}) == 8  # one per class (10 classes)

    def thumb(_row: int) -> np.ndarray:
        return np.full((24, 24, 3), 128, dtype=np.uint8)

    out = tmp_path / "neighbours.png"
    path, found = neighbours_plot({"SimCLR": (train_x, val_x), "random init": (torch.randn(len(train), 32), val_x)},
                                  train_y, val_y, thumb, thumb, train.classes, out, queries)
    assert path == out and Image.open(out).size[0] > 1000  # 2 panels x (1 query + 8 neighbours) columns
    assert [rows[0] for rows in found["SimCLR"]] == [int(target[q]) for q in queries]
    assert all(len(rows) == 8 for rows in found["SimCLR"])


def test_bench_command_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PY, "-m", "launch", "bench", "--arch", "resnet18", "--image-size", "16",
                           "--batch-size", "4", "--warmup", "1", "--iters", "2", "--loss-batches", "64",
                           "--loss-worlds", "2", "--loss-iters", "1", "--scaling", "1", "2", "--profile", "1", "2",
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["ssl"]["phases"]) == {"forward", "loss_gather", "backward_allreduce", "optimizer"}
    assert result["ssl"]["images_per_s"] > 0 and result["ssl"]["ssl_over_supervised_time"] > 0
    assert [r["world"] for r in result["scaling"]] == [1, 2]
    assert result["loss"][0]["global_batch"] == 64 and "speedup" in result["lars"]
    assert result["device"] and result["versions"]["torch"] and "git_commit" in result
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "SSL step (2 views)" in proc.stdout and "naive/ours" in proc.stdout
    # --profile 1 2: step 2 of extra steps after the timing, traced beside the result (as train.profile.steps)
    (trace,) = result["ssl"]["profile"]
    assert trace == str(tmp_path / "bench_profile" / "rank0_steps2-2.trace.json.gz")
    ops = [e.get("name") for e in json.loads(gzip.decompress(Path(trace).read_bytes()))["traceEvents"]]
    assert "aten::convolution" in ops and ops.count("Optimizer.step#LARS.step") == 1


@pytest.mark.slow
def test_eval_logs_by_default_and_a_lone_encoder_gets_a_run_of_its_own(trained_run, photo_data, tmp_path, capfd):
    """No flag needed: an encoder whose folder names no run (copied away from its run folder) gets an
    evaluation run of its own, tagged with its path; a store that cannot be reached costs one warning,
    never the evaluation; --no-mlflow logs nothing."""
    import shutil

    from launch.evaluation import eval_parser, run_evaluation
    from trainer.runtime.distributed import free_port

    run, result = trained_run
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(result.encoder_path, lone / "encoder.pt")
    shutil.copy(result.run_dir / "config.yaml", lone / "config.yaml")

    def evaluate(*extra: str) -> dict:
        return run_evaluation(eval_parser().parse_args([
            "--checkpoint", str(lone / "encoder.pt"), "--train-data", str(photo_data / "train"), "--val-data",
            str(photo_data / "val"), "--probe-epochs", "1", "--workers", "0", "--device", "cpu", "--no-baseline",
            *extra]))

    capfd.readouterr()
    report = evaluate()
    client = MlflowClient(f"sqlite:///{run}/m.db")
    (own,) = client.search_runs([client.get_experiment_by_name("simclr-eval").experiment_id])
    assert own.data.tags["simclr.checkpoint"] == str((lone / "encoder.pt").resolve())
    assert own.data.tags["mlflow.source.name"] == "simclr eval"
    assert own.data.metrics["eval/linear_top1"] == pytest.approx(report["rows"]["SimCLR"]["linear_top1"])
    assert "logged to MLflow run" in capfd.readouterr().out
    text = (lone / "config.yaml").read_text().replace(f"sqlite:///{run}/m.db", f"http://127.0.0.1:{free_port()}")
    (lone / "config.yaml").write_text(text)
    assert evaluate()["rows"]["SimCLR"]["linear_top1"] == report["rows"]["SimCLR"]["linear_top1"]
    said = capfd.readouterr()
    assert said.err.count("warning: MLflow at") == 1 and "the evaluation is not logged there" in said.err, said.err
    evaluate("--no-mlflow")
    said = capfd.readouterr()
    assert "warning:" not in said.err and "logged to" not in said.out


def test_demo_command_runs_end_to_end(tmp_path, photo_data):
    """`make demo`'s command, shortened: pretraining (2 ranks), the MLflow model, eval and the report;
    on the suite's small photo set (the demo keeps a demo_data/ it finds)."""
    import shutil

    for split in ("train", "val"):
        shutil.copytree(photo_data / split, tmp_path / "demo_data" / split)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run([PY, "-m", "launch", "demo", "--workdir", str(tmp_path), "train.epochs=1",
                           "data.image_size=16", "tracking.system_metrics=false"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| SimCLR |" in proc.stdout and "| random init |" in proc.stdout
    assert "mlflow.pytorch.load_model('runs:/" in proc.stdout
    assert "verdict (at the end): " in proc.stdout and "-bound" in proc.stdout  # where the time went (#35)
    assert (tmp_path / "runs" / "demo" / "eval" / "report.json").exists()
    results = json.loads((tmp_path / "demo_results.json").read_text())  # the figures README quotes, with their source
    assert results["benchmark"] == "demo" and results["steps"] > 0 and results["git_commit"]
    assert set(results["rows"]) == {"SimCLR", "random init"} and "val_top1" in results["online_probe_by_epoch"]
    # the evaluation logs into the training's MLflow run (found from the run folder's record) and leaves
    # no training files of its own in the eval folder
    assert "logged to MLflow run" in proc.stdout
    assert not {"metrics.jsonl", "mlflow_run.json"} & {p.name for p in (tmp_path / "runs" / "demo" / "eval").iterdir()}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = json.loads((tmp_path / "runs" / "demo" / "mlflow_run.json").read_text())["run_id"]
    assert "eval/linear_top1" in client.get_run(run_id).data.metrics


@pytest.mark.slow
def test_eval_on_two_ranks_equals_one_process(photo_data, tmp_path):
    """--nproc 2: each rank extracts its share of both sets, the shares are gathered back in order,
    and the report is the one-process report (to 1e-5), written once."""
    import json
    import subprocess
    import sys

    from tests.helpers.runs import REPO, tiny_overrides
    from trainer.config import load_config
    from trainer.run.loop import train

    result = train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{
        "train.epochs": 1, "tracking.enabled": "false"})))
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        proc = subprocess.run([sys.executable, "-m", "launch", "eval", "--nproc", str(nproc), "--checkpoint",
                               str(result.encoder_path), "--train-data", str(photo_data / "train"), "--val-data",
                               str(photo_data / "val"), "--device", "cpu", "--workers", "0", "--probe-epochs", "20",
                               "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("report:") == 1  # rank 0 alone writes and says so
        reports[nproc] = json.loads((out / "report.json").read_text())
    assert reports[2]["ranks"] == 2 and reports[1]["ranks"] == 1
    for name, row in reports[1]["rows"].items():
        for key, value in row.items():
            assert abs(reports[2]["rows"][name][key] - value) <= 1e-5, (name, key)


@pytest.mark.slow
def test_bench_overhead_times_our_loop_against_a_bare_one(tmp_path):
    """simclr bench overhead: 2 CPU ranks run the bare loop, the bare loop with our step, and our
    whole loop (run_training: its collectives on both ranks) on one batch; ratios to the bare loop."""
    out = tmp_path / "overhead.json"
    proc = subprocess.run([PY, "-m", "launch", "bench", "overhead", "--steps", "3", "--warmup", "1", "--repeats", "1",
                           "--batch-size", "8", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {mode: row["steps"] for mode, row in result["rows"].items()} == {"bare": 3, "our step": 3, "ours": 3}
    assert result["overhead_mean"] == result["rows"]["ours"]["mean_ms"] / result["rows"]["bare"]["mean_ms"]
    assert result["git_commit"] and result["versions"]["torch"] and result["config"]["nproc"] == 2
    assert "overhead (ours / bare)" in proc.stdout and "target" in proc.stdout


@pytest.mark.parametrize("argv,said", [(["--nproc", "3"], r"--batch-size 16 \(global\) does not divide over --nproc 3"),
                                       (["--nproc", "0"], "--nproc 0: must be at least 1"),
                                       (["--steps", "1"], "--steps 1: must be at least 2")])
def test_bench_overhead_refuses_what_cannot_run(argv, said):
    from benchmarks.overhead import parse_args
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=said):
        parse_args(argv)


def test_the_benchmarks_table_printer_keeps_columns_whatever_a_cell_holds(capsys):
    from benchmarks.common import print_table

    print_table("t", [("model", "<8"), ("ms", ">8.2f"), ("img/s", ">8.1f")], [["a", 1.234, 10.0], ["b", None, "n/a"]])
    assert capsys.readouterr().out.splitlines() == ["", "== t", "model         ms   img/s", "a           1.23    10.0",
                                                    "b              -     n/a"]


def test_bench_kernels_writes_its_figures_then_fails_a_missed_target_with_check(tmp_path, monkeypatch, capsys):
    """``simclr bench kernels``: one JSON with both kernels; a LARS slower than timm's (or, on the
    CPU, a SyncBatchNorm over 1.5x BatchNorm2d) is named, and ``--check`` exits 1 only after the JSON
    is written (the GPU proof's stage reports its figures either way). Figures stubbed: no timing here."""
    from benchmarks import kernels
    from launch.cli import main

    def bench(lars_speedup: float, bn_ratio: float) -> None:
        monkeypatch.setattr(kernels, "bench_lars", lambda arch, iters, device: {
            "n_tensors": 3, "ours_ms": 2.0, "timm_ms": 2.0 * lars_speedup, "speedup": lars_speedup})
        monkeypatch.setattr(kernels, "bench_sync_batchnorm", lambda device, batch, iters, dtype: [
            {"shape": [batch, 8, 4, 4], "dtype": "float32", "ours_ms": bn_ratio, "batchnorm2d_ms": 1.0,
             "ratio": bn_ratio}])

    out = tmp_path / "k.json"
    bench(1.25, 1.2)
    with pytest.raises(SystemExit) as ended:
        main(["bench", "kernels", "--device", "cpu", "--check", "--out", str(out)])
    assert ended.value.code == 0
    assert json.loads(out.read_text())["missed"] == []
    bench(0.8, 1.6)
    with pytest.raises(SystemExit) as ended:
        main(["bench", "kernels", "--device", "cpu", "--check", "--out", str(out)])
    assert ended.value.code == 1
    result = json.loads(out.read_text())
    assert result["missed"] == ["LARS on resnet50: 1.25x timm's time (target <= 1.0x)",
                                "SyncBatchNorm: 1.60x BatchNorm2d's time (target <= 1.5x)"]
    assert result["sync_batchnorm"]["worst_ratio"] == 1.6 and "targets missed" in capsys.readouterr().out
    cuda = kernels.missed_targets(torch.device("cuda"), 1.6, [{"arch": "resnet50", "speedup": 1.1}])
    assert cuda == []  # on CUDA SyncBatchNorm is reported against cuDNN, with no target
