"""SLURM through submitit: one task per GPU, the same ``train`` entry point as every other path.

Pre-emption and time limits: SLURM signals every task (``--signal=USR2@<delay>``); each rank
asks the loop to stop, the ranks agree at the next step boundary, the trainer writes a checkpoint
with its one atomic writer, and rank 0 requeues the job (``scontrol requeue``) until
``max_requeues`` is reached. The requeued job runs the same pickled config, whose ``run_dir`` is
unique to this submission, so it resumes its own newest checkpoint into the same MLflow run and
never another run's.
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.config import check_world_size
from foundation.logs import get_logger
from foundation.process_rank import launched_rank
from launch.cluster_config import ClusterConfig, check_one_line, ranks_per_node
from launch.submitit_adapter import requeue_running_job, submission_script
from trainer.config import Config, config_from_dict, config_to_dict
from trainer.model.simclr import sync_bn_groups
from trainer.runtime.dataclass_yaml import ConfigError, parse_value, set_dotted
from trainer.runtime.distributed import flight_recorder_dumps, lost_peer

log = get_logger()


def parse_sweep(items: list[str]) -> list[dict[str, Any]]:
    """``["optim.lr=0.3,0.6", "loss.temperature=0.1,0.2"]`` -> the 4 combinations as {key: value}."""
    axes = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"sweep '{item}' must look like key=v1,v2 (e.g. optim.lr=0.3,0.6)")
        key, values = item.split("=", 1)
        parsed = [parse_value(v) for v in values.split(",") if v != ""]
        if not parsed:
            raise ConfigError(f"sweep {key} has no values")
        axes.append([(key, v) for v in parsed])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


class TrainingJob:
    """What submitit pickles and runs on every task: export the torch.distributed environment
    from SLURM's, train, and on pre-emption checkpoint + requeue."""

    def __init__(self, config: dict[str, Any], max_requeues: int) -> None:
        self.config, self.max_requeues = config, max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit

        from trainer.run.interrupts import on_signals
        from trainer.run.loop import train

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        stop = threading.Event()
        cfg = config_from_dict(self.config)
        # In place of submitit's handlers (which would exit mid-step): stop at the ranks' next stop check.
        # USR2 (time limit near, or a pre-emption notice) -> checkpoint and requeue; TERM (scancel,
        # or SLURM requeueing/pre-empting on its own) -> checkpoint and let SLURM decide.
        # ours for the rest of the task: a second notice while requeueing must not reach submitit's
        with on_signals((signal.SIGUSR2, signal.SIGTERM), lambda _signum: stop.set()) as received:
            try:
                result = train(cfg, stop=stop, on_start=_tag_slurm_facts)
            except RuntimeError as exc:
                if not lost_peer(exc):
                    raise
                run_dir = cfg.train.run_dir
                dumps = flight_recorder_dumps(Path(run_dir))
                log.warning(f"rank {launched_rank()} on {socket.gethostname()}: lost contact with the "
                            f"other ranks ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); a rank or its "
                            f"node died or hung. The last checkpoint in {run_dir} is intact; go on with: simclr submit "
                            f"--cluster CLUSTER --resume {run_dir}" + (f". {dumps}" if dumps else ""))
                raise
            if result.preempted:
                if signal.SIGUSR2 in received:
                    self._requeue_or_stop(launched_rank())
                log.info(f"stopped by SIGTERM at step {result.step}; checkpoint written")
                sys.exit(-1)
        return {"step": result.step, "loss": result.loss, "run_id": result.run_id, "run_dir": str(result.run_dir)}

    def _requeue_or_stop(self, rank: int) -> None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            run_dir = self.config["train"]["run_dir"]
            raise RuntimeError(f"pre-empted after {restarts} requeues (cluster max_requeues={self.max_requeues}); "
                               f"the checkpoint in {run_dir} is intact; go on with: simclr submit --cluster CLUSTER "
                               f"--resume {run_dir}")
        if rank == 0:
            requeue_running_job(self.max_requeues - restarts)
            log.info(f"checkpointed and requeued (restart {restarts + 1}/{self.max_requeues})")
        else:
            time.sleep(120)  # rank 0 is requeueing; SLURM ends this task
        sys.exit(-1)  # like submitit itself: no result file, the job is not over


def _tag_slurm_facts(tracker, info) -> None:
    tags = {f"slurm.{k.lower()[6:]}": v for k, v in os.environ.items()
            if k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                     "SLURM_RESTART_COUNT", "SLURM_JOB_NUM_NODES", "SLURM_JOB_PARTITION")}
    tags["world_size"] = str(info.world_size)
    tracker.set_tags(tags)


def make_executor(cluster: ClusterConfig, name: str):
    import submitit

    executor = submitit.AutoExecutor(folder=Path(cluster.log_dir) / "%j", cluster="slurm")
    env = dict(cluster.env)
    if cluster.network_interface:
        env.setdefault("GLOO_SOCKET_IFNAME", cluster.network_interface)
        env.setdefault("NCCL_SOCKET_IFNAME", cluster.network_interface)
    # values are quoted: "8.0 9.0" stays one value, and a ';' in one runs nothing
    setup = [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()] + list(cluster.setup)
    extra = dict(cluster.extra_sbatch)
    if cluster.exclusive:
        extra["exclusive"] = True
    if cluster.account:
        extra["account"] = cluster.account
    if cluster.qos:
        extra["qos"] = cluster.qos
    params: dict[str, Any] = dict(
        name=name, nodes=cluster.nodes, tasks_per_node=ranks_per_node(cluster), cpus_per_task=cluster.cpus_per_task,
        timeout_min=cluster.time_min, slurm_partition=cluster.partition, slurm_signal_delay_s=cluster.signal_delay_s,
        slurm_setup=setup, slurm_additional_parameters=extra, slurm_array_parallelism=cluster.array_parallelism,
        # a rank that fails ends the whole step at once, instead of the others waiting for a lost node
        slurm_srun_args=["--kill-on-bad-exit=1"],
    )
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.mem_gb:
        params["mem_gb"] = cluster.mem_gb
    if cluster.constraint:
        params["slurm_constraint"] = cluster.constraint
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor, runs: list[Config] | None = None) -> str:
    """The sbatch file submitit would submit (for ``--dry-run``): a job array when there are several
    runs, followed by one comment line per array task naming its run."""
    text = submission_script(executor, len(runs or []))
    if runs and len(runs) > 1:
        text += f"\n# a job array of {len(runs)} runs (SLURM_ARRAY_TASK_ID: MLflow run name, run folder):\n"
        text += "".join(f"#   {i}: {r.tracking.run_name}  {r.train.run_dir}\n" for i, r in enumerate(runs))
    return text


@dataclass
class Submitted:
    job_id: str
    run_name: str
    run_dir: str
    stdout: str
    stderr: str
    job: Any = None


def plan_runs(cfg: Config, sweep: list[str], base_name: str) -> list[Config]:
    """One resolved config per sweep point, each with its own run_dir (unique to this submission)
    and MLflow run name."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    runs = []
    for point in parse_sweep(sweep):
        data = config_to_dict(cfg)
        suffix = ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        for key, value in point.items():
            set_dotted(data, key, value)
        base = cfg.tracking.run_name or base_name
        data["train"]["run_dir"] = str(Path(cfg.train.run_dir) / f"{stamp}-{len(runs)}")
        data["checkpoint"]["resume"] = "auto"
        data["tracking"]["run_name"] = f"{base}[{suffix}]" if suffix else base
        runs.append(config_from_dict(data))  # validated like any other config
    return runs


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config of an earlier submission's run folder, to continue it (from its newest checkpoint,
    into its MLflow run) as a new job, e.g. on another number of nodes or GPUs."""
    from trainer.config import load_config

    # the newest job's config: config.yaml is the first's, config.step_<N>.yaml a resume's that changed something
    changed = sorted(Path(run_dir).glob("config.step_*.yaml"))
    config_file = changed[-1] if changed else Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; pass the run folder that simclr submit "
                          "printed (run dir ...)")
    return load_config(config_file, [*overrides, f"train.run_dir={run_dir}", "checkpoint.resume=auto"])


def submit(cfg: Config, cluster: ClusterConfig, sweep: list[str] | None = None, dry_run: bool = False,
           name: str = "simclr", resume: bool = False) -> list[Submitted] | str:
    """Submit one job per sweep point, each into a run folder of its own; ``resume``: one job that
    continues ``cfg``'s run folder (``resume_config``) instead of starting a new one."""
    from trainer.run.loop import preflight

    if resume and sweep:
        raise ConfigError("--resume continues one run; it cannot be combined with --sweep")
    check_one_line("--name", name)
    runs = [cfg] if resume else plan_runs(cfg, sweep or [], name)
    world = cluster.nodes * ranks_per_node(cluster)
    for run in runs:
        preflight(run)  # before a job waits in the queue, not when it starts
        check_world_size(run.data.batch_size, world,
                         f"this cluster config starts ({cluster.nodes} nodes x {ranks_per_node(cluster)})",
                         "nodes x ranks per node (--cluster with other nodes or gpus_per_node)", resume, ConfigError)
        if run.model.sync_bn:
            sync_bn_groups(world, run.model.sync_bn_group_size,
                           f" this cluster config starts ({cluster.nodes} nodes x {ranks_per_node(cluster)})")
    executor = make_executor(cluster, name)
    if dry_run:
        return sbatch_script(executor, runs)
    from trainer.tracking import prepare_store

    prepare_store(cfg.tracking)
    jobs = submit_jobs(executor, runs, cluster)
    return [Submitted(j.job_id, r.tracking.run_name, r.train.run_dir, str(j.paths.stdout), str(j.paths.stderr), j)
            for j, r in zip(jobs, runs)]


class EvalJob:
    """What submitit runs on every task of ``simclr submit --eval``: the torch.distributed
    environment from SLURM's, then ``simclr eval``'s work as one rank (each rank extracts its share;
    rank 0 writes the report once, whole). Pre-empted or out of time (USR2), it is requeued and
    simply runs again: nothing half-written exists to continue from."""

    def __init__(self, eval_args: list[str]) -> None:
        self.eval_args = eval_args

    def __call__(self) -> dict[str, Any] | None:
        import submitit

        from launch.evaluation import eval_parser, run_evaluation

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return run_evaluation(eval_parser().parse_args(self.eval_args))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's pre-emption hook: requeue the same evaluation."""
        import submitit

        return submitit.helpers.DelayedSubmission(EvalJob(self.eval_args))


def submit_eval(eval_args: list[str], cluster: ClusterConfig, name: str = "simclr-eval",
                dry_run: bool = False) -> Any:
    """One evaluation job over ``cluster``'s ranks (``simclr submit --eval``); its sbatch script
    when ``dry_run``."""
    check_one_line("--name", name)
    executor = make_executor(cluster, name)
    if dry_run:
        return sbatch_script(executor)
    return submit_jobs(executor, [EvalJob(eval_args)], cluster)[0]


def submit_jobs(executor: Any, runs: list[Config] | list[EvalJob], cluster: ClusterConfig) -> list[Any]:
    """Submit one job per run (an array when several). When sbatch refuses, its message becomes one
    line, and the files submitit wrote for the attempt (``.submission_file_*.sh``, pickles) are
    removed: nothing was submitted, and nothing is left behind."""
    import contextlib
    import io
    import subprocess

    from submitit.core.utils import FailedJobError

    folder = Path(cluster.log_dir)
    before = set(folder.iterdir()) if folder.exists() else set()
    said = io.StringIO()
    try:
        jobs = [run if isinstance(run, EvalJob) else TrainingJob(config_to_dict(run), cluster.max_requeues)
                for run in runs]
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's stderr itself: it goes in our line
            if len(jobs) == 1:
                return [executor.submit(jobs[0])]
            with executor.batch():
                return [executor.submit(job) for job in jobs]
    except (FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        for path in (set(folder.iterdir()) if folder.exists() else set()) - before:
            if path.is_file() and (path.name.startswith(".submission_file_") or path.suffix == ".pkl"):
                path.unlink(missing_ok=True)
        why = next((line for line in (str(exc) + "\n" + said.getvalue()).splitlines() if line.strip()),
                   type(exc).__name__)
        raise ConfigError(f"sbatch refused the job: {why.strip()}; check the cluster config (partition, account, qos, "
                          "time_min, gpus_per_node); nothing was submitted") from None


def wait_for_job(job: Any, settle_s: float = 20.0, poll_s: float = 5.0) -> None:
    """Block until ``job`` has really ended: every task's result file exists, or SLURM reports a
    final state that still holds ``settle_s`` later. A requeue (pre-emption, a lost node) passes
    through states that look final for a moment; submitit's own ``results()`` can take one of them
    for the end and then fail looking for the result that the next attempt writes. Call
    ``job.results()`` afterwards: it returns at once, or raises the job's own error."""
    tasks = [job.task(k) for k in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    final_since = None
    while not all(task.paths.result_pickle.exists() for task in tasks):
        if job.watcher.is_done(job.job_id, mode="force"):
            final_since = final_since or time.time()
            if time.time() - final_since >= settle_s:
                return
        else:
            final_since = None
        time.sleep(poll_s)
