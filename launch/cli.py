"""The ``simclr`` command line. Every training path ends in ``trainer.run.loop.train``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from foundation.logs import get_logger
from foundation.process_rank import speaks_for_the_job
from launch.submit import cmd_submit
from launch.tools import cmd_bench, cmd_make_demo_data, cmd_make_shards, cmd_sync
from trainer import package_version
from trainer.runtime.rank_report import OPTION as REPORT_OPTION
from trainer.runtime.rank_report import RankReport

log = get_logger()


class _GivenOnce(argparse.Action):
    """An option that may be given once: a second one would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        before = getattr(namespace, self.dest, None)
        if before is not None:
            parser.error(f"{option_string} given twice ({before}, {values}): a run takes one recipe; change its "
                         "values with key=value overrides")
        setattr(namespace, self.dest, values)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action=_GivenOnce, help="a recipe: a YAML file, or a shipped recipe's name (demo_cpu, "
                   "cifar10_resnet18, imagenet_resnet50, ...); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=0.5 train.epochs=10 data.root=/data/imagenet/train")


def ranks_to_start(args: argparse.Namespace) -> int | None:
    """How many local ranks ``--nproc`` asks this command to start; None to work in this process
    (no ``--nproc``: one process and no process group; or this process is already a rank)."""
    return args.nproc if args.nproc is not None and "WORLD_SIZE" not in os.environ else None


def cmd_train(args: argparse.Namespace) -> int:
    from data_pipeline.object_store import check_data_roots
    from trainer.config import load_config
    from trainer.run.loop import preflight
    from trainer.runtime.dataclass_yaml import ConfigError
    from trainer.runtime.device import check_local_ranks

    cfg = load_config(args.config, args.overrides)  # validate before any rank starts
    preflight(cfg)
    nproc = 1 if args.nproc is None else args.nproc
    check_local_ranks(nproc, cfg.train.device, cfg.dist.backend)
    if cfg.data.batch_size % nproc:
        from data_pipeline.config import check_world_size
        from trainer.state.checkpoint import latest_checkpoint

        resumed = cfg.checkpoint.resume == "auto" and latest_checkpoint(cfg.train.run_dir) is not None
        check_world_size(cfg.data.batch_size, nproc, f"of --nproc {nproc}", "--nproc", resumed,
                         ConfigError)
    if cfg.model.sync_bn:
        from trainer.model.simclr import sync_bn_groups

        sync_bn_groups(nproc, cfg.model.sync_bn_group_size, f" of --nproc {nproc}")
    if getattr(args, "dry_run", False):
        from data_pipeline import remote_settings
        from data_pipeline.object_store import is_url
        from data_pipeline.remote_shards import check_remote_root
        from trainer.config import dump_config
        from trainer.state.resume import check_resume

        check_data_roots(cfg.data.root, cfg.data.val_root)
        for root in filter(is_url, (cfg.data.root, cfg.data.val_root)):  # the store's answer, as the run will get it
            check_remote_root(root, remote_settings(cfg.data))
        plan = check_resume(cfg)  # the refusal the run would meet, now
        print(dump_config(cfg), end="")
        log.info(f"config OK ({args.config or 'the defaults'}, {nproc} rank(s)); the run {plan}; "
                 "--dry-run: nothing trained")
        return 0
    if ranks_to_start(args):
        from launch.local import JobContext, run_local_ranks

        check_data_roots(cfg.data.root, cfg.data.val_root)  # here, once, instead of in every rank

        forwarded = (["--config", args.config] if args.config else []) + list(args.overrides)
        job = JobContext("training", resume_command(args, cfg), Path(cfg.train.run_dir))
        return run_local_ranks(args.nproc, forwarded, job=job)
    from trainer.run.interrupts import train_in_foreground

    return train_in_foreground(cfg)


def resume_command(args: argparse.Namespace, cfg) -> str:
    """The command that resumes this run where it stopped: the same one, less what would start it
    over (``checkpoint.resume=none``, a checkpoint of another folder, ``train.overwrite=true``)."""
    import shlex

    kept = [o for o in args.overrides if not o.startswith(("checkpoint.resume=", "train.overwrite="))]
    if cfg.checkpoint.resume != "auto" and not any(o.startswith("checkpoint.resume=") for o in args.overrides):
        kept.append("checkpoint.resume=auto")  # the recipe itself says otherwise
    nproc = [] if args.nproc is None else ["--nproc", str(args.nproc)]
    words = ["simclr", "train", *nproc, *(["--config", args.config] if args.config else []), *kept]
    return " ".join(shlex.quote(w) for w in words)


def cmd_eval(args: argparse.Namespace) -> int:
    """``simclr eval``: one process, or ``--nproc K`` local ranks that each extract their share."""
    from launch.evaluation import eval_argv, run_evaluation
    from trainer.runtime.dataclass_yaml import ConfigError
    from trainer.runtime.device import check_local_ranks

    bad = [f for f in args.finetune if not 0 < f <= 1]
    if bad:  # before any work: the probe would run first, then fail
        raise ConfigError(f"--finetune {bad[0]:g}: a label fraction must be in (0, 1], e.g. --finetune 0.01 0.1 1.0")
    if args.timeout_s <= 0:
        raise ConfigError(f"--timeout-s {args.timeout_s:g}: must be > 0 seconds")
    check_local_ranks(1 if args.nproc is None else args.nproc, args.device)
    if ranks_to_start(args):
        import shlex

        from launch.local import JobContext, run_local_ranks

        argv = eval_argv(args)
        again = " ".join(shlex.quote(w) for w in ["simclr", "eval", "--nproc", str(args.nproc), *argv])
        job = JobContext("evaluation", again, timeout_knob="--timeout-s")
        return run_local_ranks(args.nproc, ["eval", *argv], module="launch", job=job)
    from trainer.run.interrupts import run_interruptible

    def evaluate() -> int:
        run_evaluation(args)
        return 0

    def stopped(signal: str) -> None:
        if speaks_for_the_job():
            log.warning(f"{signal}: evaluation stopped; its report is written whole at the end, so nothing was "
                        "left half-written. Run the same command again")

    return run_interruptible(evaluate, stopped)


def cmd_embed(args: argparse.Namespace) -> int:
    """``simclr embed``: the frozen encoder's features of a dataset, one rank or ``--nproc K``."""
    import shlex

    from trainer.runtime.device import check_local_ranks

    check_local_ranks(1 if args.nproc is None else args.nproc, args.device)

    argv = ["--checkpoint", args.checkpoint, "--data", args.data, "--out", args.out, "--split", args.split,
            "--head-layers", str(args.head_layers), "--dtype", args.dtype, "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--device", args.device, "--chunk-rows", str(args.chunk_rows),
            *([] if args.nproc is None else ["--nproc", str(args.nproc)]), *(["--overwrite"] if args.overwrite else []),
            *(["--skip-corrupt"] if args.skip_corrupt else [])]
    # the command that goes on (finished chunks are kept): the user's own words where this is `simclr embed`
    words = sys.argv[1:] if sys.argv[1:2] == ["embed"] else ["embed", *argv]
    again = " ".join(shlex.quote(w) for w in ["simclr", *words])
    if ranks_to_start(args):
        from launch.local import JobContext, run_local_ranks

        return run_local_ranks(args.nproc, ["embed", *argv], module="launch", job=JobContext("embedding", again))
    from trainer.config import DistConfig
    from trainer.evaluation.embed import embed
    from trainer.run.interrupts import run_interruptible
    from trainer.runtime.distributed import init_distributed, teardown

    ranks: list = []  # this process's rank, once its group exists

    def embed_here() -> int:
        info = init_distributed(DistConfig(), args.device, launched=args.report_to is not None)
        ranks.append(info)
        try:
            done = embed(args.checkpoint, args.data, args.out, args.split, args.head_layers, args.dtype,
                         args.batch_size, args.overwrite, info.device, info.rank, info.world_size, args.chunk_rows,
                         args.workers, args.skip_corrupt)
        finally:
            teardown()
        if info.is_main:
            if done["skipped"]:
                log.warning(f"skipped {done['skipped']} damaged file(s) (--skip-corrupt): no rows; meta.json names "
                            "them")
            log.info(f"embedded {done['samples']} samples x {done['dim']} ({args.dtype}) into {done['out']}: "
                     f"embeddings.npy, index.csv, meta.json ({done['already_done']} of {done['chunks']} chunks were "
                     "already done)")
        return 0

    def stopped(signal: str) -> None:  # its finished chunks are on disk, the rest is redone
        if ranks and ranks[0].is_main:
            log.warning(f"{signal}: embedding stopped; the finished chunks are kept in {args.out}. Run again to go "
                        f"on: {again}")

    return run_interruptible(embed_here, stopped)


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's first command (``launch/demo.py``), running this parser's train and eval."""
    from launch.demo import run_demo

    def command(argv: list[str]) -> int:
        parsed = build_parser().parse_args(argv)
        return parsed.func(parsed)

    return run_demo(args, command)


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.sources import LABEL_MODES
    from launch.evaluation import add_eval_args
    from trainer.config import DEVICES

    parser = argparse.ArgumentParser(
        prog="simclr", description="SimCLR pretraining at scale: train, evaluate, benchmark and launch on SLURM. "
        "Configs are YAML recipes plus key=value overrides.")
    parser.add_argument("--verbose", action="store_true", help="show debug lines and the libraries' INFO lines "
                        "(MLflow's) too; give it before the command: simclr --verbose train ...")
    parser.add_argument("--quiet", action="store_true", help="show only warnings and errors (and the command's "
                        "results); give it before the command: simclr --quiet train ...")
    parser.add_argument("--version", action="version", version=f"simclr-scale {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, **kwargs) -> argparse.ArgumentParser:
        """A subcommand whose --help says what it does and each option's default."""
        return sub.add_parser(name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              **kwargs)

    p = command("train", "pretrain (one process, or --nproc K local ranks)")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to start on this node, one per GPU, in a process group (--nproc 1 as well: "
                        "one GPU runs every collective of a big job); left out: one process, no process group")
    p.add_argument("--dry-run", action="store_true", help="check the config and print it resolved; train nothing")
    p.set_defaults(func=cmd_train)

    p = command("eval", "linear probe + kNN of a trained encoder, beside a random-init baseline")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = command("embed", "write a dataset's encoder features to disk (embeddings.npy, index.csv, meta.json)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint step_N.pt or an exported encoder.pt")
    p.add_argument("--data", required=True, help="the dataset (any layout data.root accepts)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="", help="split of --data when it holds several (STL-10, CIFAR)")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks, each writing its own rows, one per GPU, in a process group (--nproc 1 as "
                        "well); left out: one process, no process group")
    p.add_argument("--head-layers", type=int, default=0, metavar="N",
                   help="features after the first N layers of the projection head (needs a step_N.pt)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="of embeddings.npy")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="data loading workers / DALI threads")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when visible")
    p.add_argument(REPORT_OPTION, default=None, help=argparse.SUPPRESS)  # set by the local launcher
    p.add_argument("--chunk-rows", type=int, default=8192, help="rows a rank writes at once; a restart redoes "
                   "at most one chunk per rank")
    p.add_argument("--overwrite", action="store_true", help="replace embeddings of another checkpoint or dataset")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="embed the images that decode; damaged files get no row (named in meta.json's skipped)")
    p.set_defaults(func=cmd_embed)

    p = command("bench", "training-throughput benchmark (step breakdown, SSL vs supervised, loss, LARS); "
                         "simclr bench feed|views|startup|overhead|store|kernels for the others",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="see simclr bench --help")
    p.set_defaults(func=cmd_bench)

    p = command("make-demo-data", "write a small ImageFolder dataset from photos shipped with "
                       "scikit-image and scikit-learn")
    p.add_argument("--out", default="demo_data", help="folder for train/, val/ and their .npz twins (a new one, or "
                   "one make-demo-data wrote before: nothing else is ever replaced)")
    p.add_argument("--size", type=int, default=64, help="side of each square crop (px)")
    p.add_argument("--train-per-class", type=int, default=48, help="training crops per class (10 classes)")
    p.add_argument("--val-per-class", type=int, default=16, help="held-out crops per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops' positions")
    p.set_defaults(func=cmd_make_demo_data)

    p = command("make-shards", "write a dataset (any layout data.root accepts) as WebDataset tar shards "
                       "with DALI index files, for fast starts and reads at scale")
    p.add_argument("src", help="the dataset: image folder, .npz, STL-10 or CIFAR folder")
    p.add_argument("out", nargs="?", help="a new (or empty) folder for shard-000000.tar ... and manifest.json, or "
                   "an empty object storage prefix (s3://bucket/prefix; pip install 'simclr-scale[s3]')")
    p.add_argument("--out", dest="out_option", metavar="OUT", help="the same as OUT")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--split", default="", help="split of SRC when it holds several (STL-10, CIFAR)")
    p.add_argument("--labels", default="auto", choices=LABEL_MODES,
                   help="for an image folder: class sub-folders, or none (unlabeled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order samples are written in")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for sources held as arrays")
    p.add_argument("--skip-corrupt", action="store_true", help="leave undecodable image files out")
    p.set_defaults(func=cmd_make_shards)

    p = command("sync", "replay a run folder (params, tags, metrics, artifacts) into MLflow "
                       "(after an outage)")
    p.add_argument("run_dir", help="the run folder (train.run_dir: it holds metrics.jsonl and mlflow_run.json)")
    p.add_argument("--run-id", default=None, help="the MLflow run to complete (default: the run's own)")
    p.add_argument("--uri", default="", help="the MLflow tracking URI (default: the run's own store)")
    p.add_argument("--experiment", default="", help="default: the run's own experiment")
    p.set_defaults(func=cmd_sync)

    p = command("submit", "submit the training to SLURM through submitit (one task per GPU)")
    _add_config_args(p)
    p.add_argument("--cluster", required=True, help="cluster config YAML (see cluster_configs/)")
    p.add_argument("--sweep", nargs="+", default=[], metavar="key=v1,v2",
                   help="submit a job array over the product of these values, e.g. optim.lr=0.3,0.6")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--name", default="simclr", help="SLURM job name")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and report how they ended")
    p.add_argument("--eval", nargs=argparse.REMAINDER, default=None, metavar="EVAL_OPTIONS",
                   help="submit an evaluation instead: everything after --eval is simclr eval's options (one rank "
                        "per task), e.g. --eval --checkpoint RUN/encoder.pt --train-data D/train --val-data D/val")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an earlier submission's run folder (its config, checkpoint and MLflow run) as a "
                        "new job, e.g. on another number of nodes or GPUs")
    p.set_defaults(func=cmd_submit)

    p = command("demo", "make demo data, pretrain with 2 CPU ranks, then linear-probe vs random init")
    p.add_argument("--workdir", default=".", help="where demo_data/, runs/demo and mlflow.db are written")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the pretraining")
    p.set_defaults(func=cmd_demo)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that ``key=value`` overrides may follow the options too
    (``simclr train --nproc 2 train.epochs=1``): argparse takes positionals in one run only."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # argparse's own message for what it does not know
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser (benchmarks/throughput.py), --help included
        argv = ["bench", "--", *argv[1:]]
    leading = []
    while argv[:1] in (["--verbose"], ["--quiet"]):  # before the command: for this process and its ranks
        leading.append(argv.pop(0)[2:])
    parser = build_parser()
    if len(set(leading)) > 1:
        parser.error("--verbose and --quiet together: give one (--verbose shows more, --quiet only warnings)")
    from foundation.logs import configure, set_verbosity

    set_verbosity(leading[0]) if leading else configure()
    args = parse_command_line(parser, argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from trainer.runtime.errors import exit_code_of

    sys.exit(exit_code_of(lambda: args.func(args), report=RankReport.given(getattr(args, "report_to", None))))
