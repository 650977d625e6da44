"""Multi-node SLURM for real: a two-node cluster on this machine (each slurmd in its own network
namespace, one CPU each, see tests/slurm_cluster.py) runs, pre-empts, requeues and loses a node of a
2-node job submitted through ``simclr submit``; gloo talks across the namespaces."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from launch.cluster_config import load_cluster_config
from launch.slurm import submit
from tests.helpers.runs import PY, REPO, checkpoint_run_id, tiny_overrides
from tests.test_slurm import mlflow_runs
from trainer.config import load_config
from trainer.state import checkpoint as ckpt

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def two_nodes():
    from tests.slurm_cluster import running_cluster

    with running_cluster(nodes=2) as cluster:
        yield cluster


def cluster_file(tmp_path: Path, nodes: int = 2, **extra) -> Path:
    """A cluster config for the test cluster: one rank per node, gloo on the namespaces' interface."""
    from tests.slurm_cluster import TestNetwork

    data = {"partition": "debug", "nodes": nodes, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1,
            "time_min": 10, "env": {"OMP_NUM_THREADS": "1"}, "network_interface": TestNetwork.INTERFACE,
            "log_dir": str(tmp_path / "logs"), "signal_delay_s": 30, "max_requeues": 2, **extra}
    path = tmp_path / f"cluster_{nodes}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for_checkpoint(run_dir: Path, job, timeout: float = 180) -> None:
    # only the file system is polled: asking submitit for the job's state can block for many seconds
    deadline = time.time() + timeout
    while ckpt.latest_checkpoint(run_dir) is None:
        assert time.time() < deadline, f"the job never checkpointed ({job.state})"
        time.sleep(0.2)


def newest(run_dir: Path) -> dict:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))


def test_two_node_job_trains_like_two_local_ranks_in_one_run(two_nodes, photo_data, tmp_path,
                                                            two_local_ranks_20_steps):
    common = {"train.epochs": 2, "tracking.uri": f"sqlite:///{tmp_path}/m.db"}
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "runs", **common))
    (sub,) = submit(cfg, load_cluster_config(cluster_file(tmp_path)), name="twonode")
    result = sub.job.results()[0]
    assert result["step"] == 20
    ours, ref = newest(Path(sub.run_dir)), two_local_ranks_20_steps
    assert ours["world_size"] == 2 and ours["step"] == ref["step"] == 20
    for key in ours["model"]:
        assert torch.allclose(ours["model"][key].double(), ref["model"][key].double(), atol=1e-5), key
    client, runs = mlflow_runs(tmp_path / "m.db")
    (run,) = [r for r in runs if r.info.run_name == "twonode"]
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert run.data.tags["slurm.job_nodelist"] == "node[1-2]" and run.data.tags["slurm.job_num_nodes"] == "2"
    logs = Path(sub.stdout).parent
    assert {p.name.split("_")[1] for p in logs.glob(f"{sub.job_id}_*_log.out")} == {"0", "1"}  # a log per node


def test_two_node_job_preempted_requeues_and_continues_bitwise(two_nodes, photo_data, tmp_path,
                                                            two_local_ranks_20_steps):
    # 20 steps: the pre-emption notice, sent at the first checkpoint (step 4), lands mid-run (a
    # 2-rank step across the namespaces takes a few hundred ms here, and the job needs 16 more)
    common = {"train.epochs": 2, "tracking.uri": f"sqlite:///{tmp_path}/m.db", "checkpoint.every_steps": 4}
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "runs", **common))
    (sub,) = submit(cfg, load_cluster_config(cluster_file(tmp_path)), name="preempt2")
    run_dir = Path(sub.run_dir)
    wait_for_checkpoint(run_dir, sub.job)
    subprocess.run(["scancel", "--signal=USR2", sub.job_id], check=True)
    # wait on the files, not on submitit: around a requeue its state polling can briefly see the
    # first attempt as finished and then look for a result that the second attempt writes later
    deadline = time.time() + 400
    while "finished at step 20/20" not in Path(sub.stdout).read_text():
        assert time.time() < deadline, "the requeued job did not finish"
        time.sleep(1)
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", sub.job_id], capture_output=True,
                                          text=True).stdout
    ours, ref = newest(run_dir), two_local_ranks_20_steps
    assert ours["step"] == ref["step"] == 20
    assert all(torch.equal(ours["model"][k], ref["model"][k]) for k in ours["model"])
    client, runs = mlflow_runs(tmp_path / "m.db")
    (run,) = [r for r in runs if r.info.run_name == "preempt2"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert run.info.status == "FINISHED" and steps[-1] == 20 and steps == sorted(set(steps))


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip() or "GONE"


def test_a_lost_node_ends_the_job_with_a_clear_message_and_it_resumes(two_nodes, photo_data, tmp_path):
    """SLURM requeues a job whose node failed; it would wait for two nodes again. The user cancels it
    and goes on with --resume on the node that is left."""
    timeout_s = 20
    common = {"train.epochs": 40, "tracking.uri": f"sqlite:///{tmp_path}/m.db", "checkpoint.every_steps": 4,
              "dist.timeout_s": timeout_s}
    cfg = load_config(None, tiny_overrides(photo_data / "train", tmp_path / "runs", **common))
    (sub,) = submit(cfg, load_cluster_config(cluster_file(tmp_path)), name="lostnode")
    run_dir = Path(sub.run_dir)
    wait_for_checkpoint(run_dir, sub.job)
    two_nodes.network.kill_node("node2")  # its slurmd and its rank, at once
    lost = time.time()
    while "lost contact with the other ranks" not in Path(sub.stderr).read_text():  # rank 0 gives up
        assert time.time() - lost < timeout_s + 15, "rank 0 did not notice the lost node"
        time.sleep(0.2)
    noticed = time.time() - lost
    assert f"--resume {run_dir}" in Path(sub.stderr).read_text()
    # SLURM itself ends (and requeues) the job once it declares the node dead: SlurmdTimeout=30 here
    while job_state(sub.job_id) == "RUNNING":
        assert time.time() - lost < 30 + 45, "SLURM did not end the job after losing a node"
        time.sleep(0.5)
    ended = time.time() - lost
    stopped = newest(run_dir)  # intact and loadable
    print(f"[measured] lost node: rank 0 stopped with the message {noticed:.1f}s later (dist.timeout_s={timeout_s}); "
          f"SLURM ended the job {ended:.1f}s later (SlurmdTimeout=30)")
    subprocess.run(["scancel", sub.job_id], check=True)  # requeued by SLURM, it would wait for node2

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    survivor = cluster_file(tmp_path, nodes=1, extra_sbatch={"nodelist": "node1"})  # node2 is gone
    proc = subprocess.run([PY, "-m", "launch", "submit", "--cluster", str(survivor), "--resume", str(run_dir),
                           "--wait", f"train.stop_after_steps={stopped['step'] + 8}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = newest(run_dir)
    assert resumed["step"] == stopped["step"] + 8 and checkpoint_run_id(resumed) == checkpoint_run_id(stopped)
    assert resumed["world_size"] == 1
