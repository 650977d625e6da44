"""``simclr submit``: training runs (one, a sweep, or a resume) and evaluations as SLURM jobs
through submitit, and ``--wait`` for their ends."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.runtime.credentials import redact_uri


def submit_evaluation(args: argparse.Namespace) -> int:
    """``simclr submit --cluster C --eval <simclr eval options>``: the evaluation as a SLURM job,
    one rank per task (GPU), each extracting its share of the features."""
    from launch.cluster_config import load_cluster_config
    from launch.evaluation import eval_argv, eval_parser
    from launch.slurm import submit_eval, wait_for_job
    from trainer.runtime.dataclass_yaml import ConfigError

    if args.config or args.overrides or args.sweep or args.resume:
        raise ConfigError("--eval takes simclr eval's options only (after --eval); leave out --config, overrides, "
                          "--sweep and --resume")
    eval_args = eval_parser().parse_args(args.eval)  # validated here, before anything is submitted
    bad = [f for f in eval_args.finetune if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"--finetune {bad[0]:g}: a label fraction must be in (0, 1], e.g. --finetune 0.01 0.1 1.0")
    eval_args.nproc = 1  # the job's tasks are the ranks
    job = submit_eval(eval_argv(eval_args), load_cluster_config(args.cluster), name=args.name, dry_run=args.dry_run)
    if args.dry_run:
        print(job)
        return 0
    out_dir = Path(eval_args.out or Path(eval_args.checkpoint).parent / "eval")
    print(f"submitted evaluation job {job.job_id}\n  report   {out_dir / 'report.json'}\n  stdout   {job.paths.stdout}"
          f"\n  stderr   {job.paths.stderr}")
    if args.wait:
        wait_for_job(job)
        try:
            report = job.results()[0]  # rank 0's
        except Exception as exc:
            print(f"job {job.job_id} did not finish ({job.state}): {str(exc).splitlines()[0][:300]}", file=sys.stderr)
            return 1
        print(f"job {job.job_id} finished: " + ", ".join(f"{name} linear top-1 {row['linear_top1']:.3f}"
                                                          for name, row in report["rows"].items()))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.cluster_config import load_cluster_config
    from launch.slurm import resume_config, submit, wait_for_job
    from trainer.config import load_config
    from trainer.runtime.dataclass_yaml import ConfigError

    if args.eval is not None:
        return submit_evaluation(args)
    if args.resume and args.config:
        raise ConfigError("--resume takes the run's own config.yaml; leave out --config (overrides still apply)")
    cfg = resume_config(args.resume, args.overrides) if args.resume else load_config(args.config, args.overrides)
    cluster = load_cluster_config(args.cluster)
    out = submit(cfg, cluster, sweep=args.sweep, dry_run=args.dry_run, name=args.name, resume=bool(args.resume))
    if args.dry_run:
        print(out)
        return 0
    from trainer.tracking import resolve_tracking_uri, where_to_open

    uri = redact_uri(resolve_tracking_uri(cfg.tracking.uri))
    for s in out:
        print(f"submitted job {s.job_id}  run '{s.run_name}'\n  run dir  {s.run_dir}\n  stdout   {s.stdout}\n"
              f"  stderr   {s.stderr}\n  MLflow   experiment '{cfg.tracking.experiment}' at {uri} "
              f"({where_to_open(uri)})")
    if args.wait:
        failed = 0
        for s in out:
            try:
                wait_for_job(s.job)  # through requeues, to the real end
                result = s.job.results()[0]  # one result per task; rank 0 speaks for the job
                print(f"job {s.job_id} finished: step {result['step']}, loss {result['loss']:.4f}, "
                      f"MLflow run {result['run_id']}")
            except Exception as exc:  # submitit re-raises the job's failure or cancellation here
                failed += 1
                print(f"job {s.job_id} did not finish ({s.job.state}): {str(exc).splitlines()[0][:300]}",
                      file=sys.stderr)
        return 1 if failed else 0
    return 0
