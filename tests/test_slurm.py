"""submitit launching against a real one-node SLURM cluster started by the suite (and the parts
that need no cluster: dry-run scripts, cluster-config validation, sweep planning).

The cluster tests skip on a machine without SLURM or root, except where SIMCLR_REQUIRE_SLURM=1
(as .ci/run sets): there a missing cluster is a failure, never a skip."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from launch.cluster_config import load_cluster_config
from launch.slurm import parse_sweep, plan_runs, submit, wait_for_job
from tests.helpers.runs import PY, REPO, checkpoint_run_id, simclr, tiny_overrides
from trainer.config import ConfigError, load_config
from trainer.state import checkpoint as ckpt

CONFIGS = sorted((REPO / "cluster_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_dry_run_script_carries_each_cluster_option(path, capsys):
    cluster = load_cluster_config(path)
    script = submit(load_config(None, ["data.root=/data/x", "data.batch_size=512"]), cluster, dry_run=True)
    assert f"#SBATCH --partition={cluster.partition}" in script
    assert f"#SBATCH --nodes={cluster.nodes}" in script
    assert f"#SBATCH --ntasks-per-node={cluster.gpus_per_node or cluster.tasks_per_node}" in script
    assert f"#SBATCH --cpus-per-task={cluster.cpus_per_task}" in script
    assert f"#SBATCH --time={cluster.time_min}" in script
    assert f"#SBATCH --signal=USR2@{cluster.signal_delay_s}" in script
    if cluster.gpus_per_node:
        assert f"#SBATCH --gpus-per-node={cluster.gpus_per_node}" in script
    if cluster.mem_gb:
        assert f"#SBATCH --mem={cluster.mem_gb}GB" in script
    for opt, val in (("account", cluster.account), ("qos", cluster.qos)):
        if val:
            assert f"#SBATCH --{opt}={val}" in script
    if cluster.constraint:
        assert f"#SBATCH --constraint='{cluster.constraint}'" in script
    if cluster.exclusive:
        assert "#SBATCH --exclusive" in script
    for key, value in cluster.extra_sbatch.items():
        assert f"#SBATCH --{key}={value}" in script
    for line in cluster.setup:
        assert line in script
    for key, value in cluster.env.items():
        assert f"export {key}={value}" in script
    if cluster.network_interface:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            assert f"export {var}={cluster.network_interface}" in script
    assert "srun" in script and "--kill-on-bad-exit=1" in script


@pytest.mark.parametrize("recipe,extra", [
    ("configs/imagenet_resnet50.yaml", []),
    ("configs/imagenet_resnet50_multicrop.yaml", ["model.arch=timm/convnext_tiny"])])
def test_cli_dry_run_prints_script(recipe, extra):
    proc = subprocess.run([PY, "-m", "launch", "submit", "--cluster", "cluster_configs/single_node.yaml",
                           "--config", recipe, "--dry-run", "data.root=/d", *extra],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=8" in proc.stdout and "submitit.core._submit" in proc.stdout


@pytest.mark.parametrize("text,needle", [
    ("partition: gpu\nnodes: 1\ngpu_per_node: 8\n", "unknown config key 'cluster.gpu_per_node' (did you mean "
                                                     "'gpus_per_node'?)"),
    ("nodes: 2\ngpus_per_node: 8\n", "cluster.partition is missing"),
    ("partition: gpu\nnodes: 4\ngpus_per_node: 8\nmax_gpus: 16\n", "32 GPUs, more than cluster.max_gpus=16"),
    ("partition: gpu\nnodes: zero\n", "cluster.nodes: expected an integer"),
    # the job would be told of its end before it trains; negative resources; a line break that adds an #SBATCH line
    ("partition: gpu\ntime_min: 1\nsignal_delay_s: 120\n", "cluster.signal_delay_s=120 leaves no time to train"),
    ("partition: gpu\ngpus_per_node: -2\n", "cluster.gpus_per_node=-2 must be >= 0"),
    ('partition: "gpu\\n#SBATCH --qos=high"\n', "cluster.partition='gpu\\n#SBATCH --qos=high' holds a line break"),
])
def test_bad_cluster_config_is_refused_before_submitting(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster_config(path)
    assert needle in str(err.value)
    proc = subprocess.run([PY, "-m", "launch", "submit", "--cluster", str(path), "data.root=/d"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_batch_must_split_over_the_clusters_ranks():
    cluster = load_cluster_config(REPO / "cluster_configs/generic_multinode.yaml")  # 32 ranks
    with pytest.raises(ConfigError, match="does not divide over the 32 ranks"):
        submit(load_config(None, ["data.batch_size=100"]), cluster, dry_run=True)


def test_sync_bn_blocks_must_split_the_clusters_ranks():
    """Checked before the job waits in the queue, not by every rank once it starts."""
    cluster = load_cluster_config(REPO / "cluster_configs/generic_multinode.yaml")  # 32 ranks
    with pytest.raises(ConfigError, match=r"sync_bn_group_size=5 does not divide the 32 ranks this cluster config"):
        submit(load_config(None, ["model.sync_bn_group_size=5"]), cluster, dry_run=True)
    assert submit(load_config(None, ["model.sync_bn_group_size=8"]), cluster, dry_run=True)


def test_the_private_submitit_calls_we_rely_on_still_exist():
    """launch/submitit_adapter.py holds every private submitit call; a submitit release that renames
    or reshapes one fails here, by name, not in a pre-empted job on a cluster."""
    import inspect

    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    from launch.slurm import make_executor
    from launch.submitit_adapter import submission_script

    requeue = getattr(submitit.JobEnvironment, "_requeue", None)
    assert requeue is not None, (f"submitit {submitit.__version__} has no JobEnvironment._requeue: "
                                 "update requeue_running_job")
    assert list(inspect.signature(requeue).parameters) == ["self", "countdown"], "JobEnvironment._requeue changed"
    make_text = getattr(SlurmExecutor, "_make_submission_file_text", None)
    assert make_text is not None, (f"submitit {submitit.__version__} has no SlurmExecutor._make_submission_file_text: "
                                   "update submission_script")
    assert list(inspect.signature(make_text).parameters) == ["self", "command", "uid"]
    executor = make_executor(load_cluster_config(REPO / "cluster_configs/generic_multinode.yaml"), "adapter")
    one, array = submission_script(executor), submission_script(executor, 3)
    assert one.startswith("#!/bin/bash") and "#SBATCH --array=0-2" in array and "--array" not in one


def test_sweep_plans_one_named_run_each_in_its_own_dir():
    assert parse_sweep(["optim.lr=0.3,0.6", "loss.temperature=0.1,0.2"]) == [
        {"optim.lr": 0.3, "loss.temperature": 0.1}, {"optim.lr": 0.3, "loss.temperature": 0.2},
        {"optim.lr": 0.6, "loss.temperature": 0.1}, {"optim.lr": 0.6, "loss.temperature": 0.2}]
    runs = plan_runs(load_config(None, ["train.run_dir=runs/x"]), ["optim.lr=0.3,0.6"], "job")
    assert [r.optim.lr for r in runs] == [0.3, 0.6]
    assert [r.tracking.run_name for r in runs] == ["job[lr=0.3]", "job[lr=0.6]"]
    assert len({r.train.run_dir for r in runs}) == 2 and all(r.train.run_dir.startswith("runs/x/") for r in runs)
    with pytest.raises(ConfigError, match="temperature"):
        plan_runs(load_config(None), ["loss.temperature=0.1,-1"], "job")  # each point is validated



def test_every_value_in_the_sbatch_script_is_quoted_or_refused(tmp_path):
    """Cluster ``env:`` values reached the script unquoted (``"8.0 9.0"`` kept 8.0; a ``;`` ran a
    command). Now the script passes ``bash -n`` and its exports, run with ``set -x``, give the exact
    values and run nothing; a bad variable name, or a line break in ``--name``, is refused by name."""
    values = {"TORCH_CUDA_ARCH_LIST": "8.0 9.0", "PAYLOAD": "a b;touch PWNED $(touch PWNED2) `touch PWNED3`'\"x"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"partition": "debug", "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2,
                                    "time_min": 10, "log_dir": str(tmp_path / "logs"), "env": values}))
    script = submit(load_config(None, ["data.root=/d"]), load_cluster_config(path), dry_run=True,
                    name="j;touch PWNED4 'q'")
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    exports = "\n".join(line for line in script.splitlines() if line.startswith("export "))
    shown = subprocess.run(["bash", "-c", f"set -x\n{exports}\nprintf '%s\\n' \"$TORCH_CUDA_ARCH_LIST\" \"$PAYLOAD\""],
                           cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.splitlines() == list(values.values()), shown
    assert not list(tmp_path.glob("PWNED*"))

    path.write_text(yaml.safe_dump({"partition": "debug", "env": {"BAD NAME": "1"}}))
    with pytest.raises(ConfigError, match="cluster.env key 'BAD NAME' is not a variable name"):
        load_cluster_config(path)
    proc = simclr("submit", "--cluster", "cluster_configs/local_test.yaml", "--dry-run", "--name",
                  "x\n#SBATCH --uid=0", "data.root=/d")
    assert proc.returncode == 2 and "--name='x\\n#SBATCH --uid=0' holds a line break" in proc.stderr, proc.stderr
    assert "#SBATCH --uid" not in proc.stdout


def test_a_sweep_dry_run_shows_the_job_array_and_its_runs():
    proc = simclr("submit", "--cluster", "cluster_configs/local_test.yaml", "--dry-run", "--sweep",
                  "optim.lr=0.1,0.2", "--name", "lrs", "data.root=/d", "data.batch_size=8", "train.run_dir=runs/s")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-1%2" in proc.stdout
    assert "#   0: lrs[lr=0.1]  runs/s/" in proc.stdout and "#   1: lrs[lr=0.2]  runs/s/" in proc.stdout


# --------------------------------------------------------------------------- against real SLURM


@pytest.fixture(scope="module")
def slurm():
    from tests.slurm_cluster import running_cluster

    with running_cluster(nodes=1) as cluster:
        yield cluster


def simclr_submit(tmp_path, *args, timeout=300):
    return simclr("submit", "--cluster", str(REPO / "cluster_configs/local_test.yaml"), *args, cwd=tmp_path,
                  timeout=timeout, env_extra={"PYTHONPATH": str(REPO)})


def mlflow_runs(db: Path, experiment="simclr"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slurm
def test_two_task_job_trains_and_logs(slurm, photo_data, tmp_path):
    over = tiny_overrides(photo_data / "train", tmp_path / "runs", **{"train.epochs": 1,
                                                                        "tracking.uri": f"sqlite:///{tmp_path}/m.db"})
    proc = simclr_submit(tmp_path, "--wait", *over)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job" in proc.stdout and "finished: step 10" in proc.stdout
    client, runs = mlflow_runs(tmp_path / "m.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["world_size"] == "2" and run.data.tags["slurm.job_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6, 8, 10]


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted(slurm, photo_data, tmp_path,
                                                                     two_local_ranks_20_steps):
    # 20 steps: the notice goes at the first checkpoint (step 4), a few seconds before the end
    common = {"train.epochs": 2, "tracking.uri": f"sqlite:///{tmp_path}/m.db", "checkpoint.every_steps": 4}
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "runs", **common))
    cluster = load_cluster_config(REPO / "cluster_configs/local_test.yaml")
    cluster.log_dir = str(tmp_path / "logs")
    (sub,) = submit(cfg, cluster, name="preempt")
    run_dir = Path(sub.run_dir)
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(run_dir) is None:  # training is under way
        assert time.time() < deadline, "job never checkpointed"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", sub.job_id], check=True)  # the pre-emption notice
    noticed = time.time()
    wait_for_job(sub.job)  # through the requeue to the end
    results = sub.job.results()
    print(f"[measured] USR2 pre-emption: checkpointed, requeued and finished {time.time() - noticed:.1f}s after the "
          "notice; 0 steps lost")
    assert results[0]["step"] == 20
    log = Path(sub.stdout).read_text()
    assert "checkpointed and requeued (restart 1/2)" in log and "resumed from" in log
    restarts = subprocess.run(["scontrol", "show", "job", sub.job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts

    # the same config, uninterrupted, as 2 local ranks: bitwise-identical weights
    a, b = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir)), two_local_ranks_20_steps
    assert a["step"] == b["step"] == 20
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # one MLflow run, continued across the requeue
    client, runs = mlflow_runs(tmp_path / "m.db")
    preempt_runs = [r for r in runs if r.info.run_name == "preempt"]
    assert len(preempt_runs) == 1
    steps = [m.step for m in client.get_metric_history(preempt_runs[0].info.run_id, "train/loss")]
    assert steps[-1] == 20 and steps == sorted(set(steps))


@pytest.mark.slurm
def test_sweep_job_array_completes(slurm, photo_data, tmp_path):
    over = tiny_overrides(photo_data / "train", tmp_path / "runs", **{"train.epochs": 1,
                                                                        "tracking.uri": f"sqlite:///{tmp_path}/m.db"})
    proc = simclr_submit(tmp_path, "--wait", "--name", "sweep", "--sweep", "loss.temperature=0.2,0.5", "--", *over)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("submitted job")]
    assert len(ids) == 2 and all("_" in i for i in ids)  # array tasks: <array id>_<index>
    _, runs = mlflow_runs(tmp_path / "m.db")
    assert sorted(r.info.run_name for r in runs) == ["sweep[temperature=0.2]", "sweep[temperature=0.5]"]
    assert sorted(r.data.params["loss.temperature"] for r in runs) == ["0.2", "0.5"]
    assert {r.data.tags["slurm.array_task_id"] for r in runs} == {"0", "1"}


@pytest.mark.slurm
def test_cancelled_job_is_reported_not_waited_on(slurm, photo_data, tmp_path):
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "runs",
                                           **{"train.epochs": 500, "tracking.enabled": "false"}))
    cluster = load_cluster_config(REPO / "cluster_configs/local_test.yaml")
    cluster.log_dir = str(tmp_path / "logs")
    (sub,) = submit(cfg, cluster, name="cancelme")
    deadline = time.time() + 120
    while sub.job.state not in ("RUNNING",):
        assert time.time() < deadline
        time.sleep(0.5)
    subprocess.run(["scancel", sub.job_id], check=True)
    start = time.time()
    with pytest.raises(Exception) as err:
        sub.job.results()
    assert time.time() - start < 120
    assert "CANCELLED" in str(err.value) or "CANCELLED" in sub.job.state


@pytest.mark.slurm
def test_two_task_job_goes_on_as_a_one_task_job_in_the_same_run(slurm, photo_data, tmp_path):
    """Pre-empted with no requeues left, a 2-task job says how to go on; resubmitted with --resume
    on a 1-task cluster config it continues from its checkpoint into the same MLflow run."""
    import yaml

    two = yaml.safe_load((REPO / "cluster_configs/local_test.yaml").read_text())
    two.update(max_requeues=0, log_dir=str(tmp_path / "logs"))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump({**two, "tasks_per_node": 1}))
    common = {"train.epochs": 4, "tracking.uri": f"sqlite:///{tmp_path}/m.db", "checkpoint.every_steps": 4}
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "runs", **common))
    (sub,) = submit(cfg, load_cluster_config(tmp_path / "two.yaml"), name="shrink")
    run_dir = Path(sub.run_dir)
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(run_dir) is None:
        assert time.time() < deadline, "job never checkpointed"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", sub.job_id], check=True)
    with pytest.raises(Exception):  # noqa: B017 - submitit re-raises the job's own failure
        sub.job.results()
    assert f"--resume {run_dir}" in Path(sub.stderr).read_text()
    stopped = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert stopped["world_size"] == 2 and 0 < stopped["step"] < 40

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([PY, "-m", "launch", "submit", "--cluster", str(tmp_path / "one.yaml"), "--resume",
                           str(run_dir), "--wait", "--name", "shrink"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert final["step"] == 40 and final["world_size"] == 1
    assert checkpoint_run_id(final) == checkpoint_run_id(stopped)
    client, runs = mlflow_runs(tmp_path / "m.db")
    (run,) = [r for r in runs if r.info.run_id == checkpoint_run_id(final)]
    assert run.info.status == "FINISHED" and len(runs) == 1
    assert run.data.tags["simclr.world_size_history"] == f"0:2,{stopped['step']}:1"


def test_a_refused_sbatch_is_one_line_and_leaves_no_files(photo_data, tmp_path, monkeypatch):
    """sbatch saying no (a wrong partition, account or qos) was a traceback, and left the attempt's
    .submission_file_*.sh and .pkl files in the log folder."""
    import dataclasses

    from launch.cluster_config import load_cluster_config
    from launch.slurm import submit
    from tests.helpers.runs import REPO, tiny_overrides
    from trainer.config import ConfigError, load_config

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", 'echo "sbatch: error: invalid partition specified: gpu-big" >&2; exit 1'),
                       ("srun", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cluster = dataclasses.replace(load_cluster_config(REPO / "cluster_configs" / "local_test.yaml"),
                                  log_dir=str(tmp_path / "logs"))
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run"))
    with pytest.raises(ConfigError, match="sbatch refused the job: sbatch: error: invalid partition specified"):
        submit(cfg, cluster)
    assert not [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]


def test_resubmitting_onto_a_shape_that_does_not_divide_the_batch_names_the_shapes(photo_data, tmp_path):
    """A resumed run keeps its batch: 'use a batch that is a multiple of 3' was no advice."""
    import dataclasses

    from launch.cluster_config import load_cluster_config
    from launch.slurm import submit
    from tests.helpers.runs import REPO, tiny_overrides
    from trainer.config import ConfigError, load_config

    cluster = dataclasses.replace(load_cluster_config(REPO / "cluster_configs" / "local_test.yaml"), tasks_per_node=3)
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"keeps its batch.*nodes x ranks per node.* among 1, 2, 4, 8") as info:
        submit(cfg, cluster, resume=True)
    assert "multiple of" not in str(info.value)
    with pytest.raises(ConfigError, match="multiple of 3"):
        submit(cfg, cluster)


@pytest.mark.slurm
def test_an_evaluation_job_on_two_tasks_equals_one_process(slurm, photo_data, tmp_path):
    """simclr submit --eval: each task extracts its share; the report equals a one-process eval (to
    1e-5), written once by rank 0."""
    import json

    from trainer.run.loop import train

    result = train(load_config(None, tiny_overrides(photo_data / "train", tmp_path / "run", **{
        "train.epochs": 1, "tracking.enabled": "false"})))
    common = ["--checkpoint", str(result.encoder_path), "--train-data", str(photo_data / "train"), "--val-data",
              str(photo_data / "val"), "--device", "cpu", "--workers", "0", "--probe-epochs", "20"]
    proc = simclr_submit(tmp_path, "--wait", "--eval", *common, "--out", str(tmp_path / "slurm_eval"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted evaluation job" in proc.stdout and "finished: SimCLR linear top-1" in proc.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    alone = subprocess.run([PY, "-m", "launch", "eval", *common, "--out", str(tmp_path / "alone")], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    on_slurm = json.loads((tmp_path / "slurm_eval" / "report.json").read_text())
    one = json.loads((tmp_path / "alone" / "report.json").read_text())
    assert on_slurm["ranks"] == 2 and one["ranks"] == 1
    for name, row in one["rows"].items():
        for key, value in row.items():
            assert abs(on_slurm["rows"][name][key] - value) <= 1e-5, (name, key)


def test_an_evaluation_job_dry_run_and_bad_options(capsys):
    from launch.cli import main

    with pytest.raises(SystemExit) as ended:
        main(["submit", "--cluster", str(REPO / "cluster_configs/local_test.yaml"), "--dry-run", "--eval",
              "--checkpoint", "x.pt", "--train-data", "t", "--val-data", "v"])
    assert ended.value.code == 0 and "#SBATCH" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ended:
        main(["submit", "--cluster", str(REPO / "cluster_configs/local_test.yaml"), "--eval", "--checkpoint", "x.pt",
              "--train-data", "t", "--val-data", "v", "--finetune", "3"])
    assert ended.value.code == 2 and "--finetune 3" in capsys.readouterr().err
