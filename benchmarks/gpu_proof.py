"""The GPU proof: a user's acceptance check of a GPU node, in one command. Does this install decode
with DALI on the GPU, feed the model at its speed, and learn?

    python3 -m benchmarks.gpu_proof --data /data/proof --out proof_results   # on the GPU node
    python3 -m benchmarks.gpu_proof --dry                                     # tiny sizes, on a CPU

1. ``tests/test_gpu.py``: SyncBatchNorm numerics on CUDA, the DALI GPU pipeline, bf16 runs, no
   host syncs in the steady-state step under ``torch.cuda.set_sync_debug_mode("error")``. A test
   that skips fails the stage unless the stage expects that skip (in dry mode, on a CPU: every one);
1b. the first multi-GPU job on one GPU (``benchmarks.nccl_job``): ``simclr train --nproc 1`` on a
   1-rank NCCL group (every collective a big job runs), stopped by SIGTERM and resumed, then ``simclr
   eval --nproc 1`` and ``simclr embed --nproc 1`` on its encoder (dry: the same commands on gloo);
1c. the step's own kernels (``benchmarks.kernels --check``): SyncBatchNorm against cuDNN's BatchNorm
   (bf16 and fp32, ResNet-50's stage shapes, 64 images), LARS against timm's ``Lars`` on ResNet-50;
   the stage fails when LARS takes longer than timm's;
2. the feed benchmark (``benchmarks.feed``) on CIFAR-10 ResNet-18 (32 px, bf16, batch 512);
3. the feed benchmark on Imagenette ResNet-50 (224 px, bf16, batch 256);
4. the same with multi-crop views (2 x 224 + 6 x 96 px);
5. CIFAR-10 pretraining with its epochs chosen from stage 2's end-to-end speed so that the whole
   stage (the online probe, a validation pass per epoch, features and probes of two encoders,
   the file check) fits its cap, then the linear probe and kNN against random init.

``--data`` holds ``cifar10-jpeg/{train,test}`` and ``imagenette2-224-subset/train``. Everything the
proof keeps goes to ``--out``: the summary ``gpu_proof_<tag>.json`` (rewritten after every stage, so
a proof cut short still says what finished), ``gpu_proof_<tag>.log`` (every stage's whole output)
and each stage's JSON; run folders and checkpoints go to ``--work``. Each stage runs in its own
process group under its own time cap. The console shows each stage's plan before it starts, then
its status and key figures, and on failure its last lines. A tree without ``.git`` names its
commit through ``SIMCLR_GIT_COMMIT``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.gpu_proof_plan import (
    CIFAR_TEST,
    CIFAR_TRAIN,
    PLAN_GPU_VIEWS_PER_S,
    Stage,
    e2e_views_per_s,
    feed_stage,
    measured_start_s,
    plan_quality,
    resize_from_start,
)

REPO = Path(__file__).resolve().parent.parent
GPU_TESTS = REPO / "tests" / "test_gpu.py"  # a checkout's: the suite does not ship in the wheel
TAIL_LINES = 40  # of a failed stage's output, on the console
STAGE_NAMES = ("gpu_tests", "nccl_job", "kernels", "feed_cifar10_resnet18", "feed_imagenette_resnet50",
               "feed_imagenette_resnet50_multicrop", "quality_cifar10")
MULTICROP = "data.views=[{count: 2, size: %d}, {count: 6, size: %d, crop_scale: [0.05, 0.14]}]"  # SwAV's 2 + 6

def plan(args: argparse.Namespace, out: Path, work: Path) -> list[Stage]:
    """The stages, each with its cap and plan; the quality stage's epochs are set after stage 2."""
    py, data = sys.executable, Path(args.data)
    tests = Stage("gpu_tests", 90 if not args.dry else 60,
                  [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(GPU_TESTS)], [], 60.0,
                  "tests/test_gpu.py: SyncBatchNorm on CUDA, DALI on the GPU, no host syncs in the step",
                  expected_skips=("needs a CUDA device",) if args.dry else ())
    quality_cmd = [py, "-m", "benchmarks.quality", "--dataset", "cifar10", "--data-dir", str(data), "--run-dir",
                   str(work / "quality_run"), "--results-dir", str(out), "--no-markdown", "train.progress_bar=false",
                   "tracking.enabled=false", "train.knn_every_epochs=0"]
    nccl = Stage("nccl_job", 150 if args.dry else 90,
                 [py, "-m", "benchmarks.nccl_job", "--data", str(data / "cifar10-jpeg"), "--work", str(work / "nccl"),
                  "--out", str(out / "nccl_job.json"), "--timeout-s", "80", *(["--dry"] if args.dry else [])],
                 [out / "nccl_job.json"], 55.0 if args.dry else 60.0,
                 "the first multi-GPU job on one GPU: simclr train --nproc 1 on a 1-rank "
                 f"{'gloo (dry)' if args.dry else 'NCCL'} group, SIGTERM mid-run, resume, eval and embed --nproc 1")
    kernels_json = out / f"kernels_{'cpu' if args.dry else 'cuda'}.json"
    kernels = Stage("kernels", 25, [py, "-m", "benchmarks.kernels", "--out", str(kernels_json),
                                    *(["--device", "cpu", "--batch", "2", "--iters", "2", "--arch", "resnet18"]
                                      if args.dry else ["--batch", "64", "--iters", "20", "--check"])],
                    [kernels_json], 15.0, "the step's own kernels: SyncBatchNorm vs BatchNorm2d"
                    f"{'' if args.dry else ' (cuDNN)'}, LARS vs timm's Lars")
    if args.dry:
        tiny = ["train.device=cpu", "precision=fp32", "data.num_workers=1", "data.image_size=16", "data.backend=dali"]
        cifar = [*tiny, f"data.root={data / 'cifar10-jpeg' / 'train'}", "data.batch_size=16"]
        imagenette = [*tiny, f"data.root={data / 'imagenette2-224-subset' / 'train'}", "data.batch_size=8",
                      "model.proj_hidden_dim=64"]
        quality = Stage("quality_cifar10", 70, [*quality_cmd, "--probe-epochs", "5", *tiny, "data.batch_size=16"],
                        [out / "quality_cifar10_cpu.json"], 0.0,
                        "CIFAR-10 (here: the photos in its layout) pretraining, then linear probe and kNN")
        return [tests, nccl, kernels,
                feed_stage("feed_cifar10_resnet18", 60, out, "configs/cifar10_resnet18.yaml", cifar, 3, 1, 16, 20.0,
                           "feed: CIFAR-10 JPEGs, ResNet-18, tiny"),
                feed_stage("feed_imagenette_resnet50", 70, out, "configs/imagenet_resnet50.yaml", imagenette, 2, 1, 8,
                           6.0, "feed: Imagenette, ResNet-50, tiny"),
                feed_stage("feed_imagenette_resnet50_multicrop", 60, out, "configs/imagenet_resnet50.yaml",
                           [*imagenette, MULTICROP % (16, 8)], 1, 1, 8, 12.0,
                           "feed: Imagenette, ResNet-50, multi-crop 2x16 + 6x8 px, tiny", views=8),
                quality]
    common = ["train.device=cuda", "precision=bf16", "data.backend=dali", "data.num_workers=8"]
    cifar = [*common, f"data.root={data / 'cifar10-jpeg' / 'train'}", "data.batch_size=512"]
    imagenette = [*common, f"data.root={data / 'imagenette2-224-subset' / 'train'}", "data.batch_size=256"]
    return [tests, nccl, kernels,
            feed_stage("feed_cifar10_resnet18", 45, out, "configs/cifar10_resnet18.yaml", cifar, 80, 10, 512,
                       PLAN_GPU_VIEWS_PER_S["feed_cifar10_resnet18"],
                       "feed: CIFAR-10 JPEGs, ResNet-18 CIFAR stem, 32 px, bf16, batch 512"),
            feed_stage("feed_imagenette_resnet50", 45, out, "configs/imagenet_resnet50.yaml", imagenette, 30, 5, 256,
                       PLAN_GPU_VIEWS_PER_S["feed_imagenette_resnet50"],
                       "feed: Imagenette, ResNet-50, 224 px, bf16, batch 256"),
            feed_stage("feed_imagenette_resnet50_multicrop", 50, out, "configs/imagenet_resnet50.yaml",
                       [*imagenette, MULTICROP % (224, 96)], 20, 5, 256,
                       PLAN_GPU_VIEWS_PER_S["feed_imagenette_resnet50_multicrop"],
                       "feed: Imagenette, ResNet-50, multi-crop 2x224 + 6x96 px, bf16, batch 256", views=8),
            Stage("quality_cifar10", 130, [*quality_cmd, "--probe-epochs", "100", *common, "data.batch_size=512"],
                  [out / "quality_cifar10_cuda.json"], 0.0,
                  "CIFAR-10 ResNet-18 pretraining sized to the cap, then linear probe and kNN vs random init")]


def size_quality(stage: Stage, feed_json: Path, dry: bool) -> None:
    """Fill in the quality stage's epochs from stage 2's measured speed (a planning figure if it failed)."""
    measured = e2e_views_per_s(feed_json)
    views = measured or (20.0 if dry else PLAN_GPU_VIEWS_PER_S["feed_cifar10_resnet18"] / 2)
    if dry:  # the photos in CIFAR's layout, a few epochs' worth of a CPU
        data = Path(stage.command[stage.command.index("--data-dir") + 1]) / "cifar10-jpeg"
        train_n = sum(1 for p in (data / "train").rglob("*.jpg"))
        test_n = sum(1 for p in (data / "test").rglob("*.jpg"))
        qp = plan_quality(views, train_n, test_n, 5, 0.6 * stage.cap_s, probe_step_s=0.002, max_epochs=1)
    else:
        qp = plan_quality(views, CIFAR_TRAIN, CIFAR_TEST, 100, 0.8 * stage.cap_s)  # a fifth of the cap is margin
    # a tenth of the run warms up (the recipe's 10 epochs are for 500)
    stage.command += ["--epochs", str(qp.epochs), f"optim.warmup_epochs={max(1, qp.epochs // 10)}"]
    stage.planned_s = qp.total_s
    stage.what += (f" ({qp.epochs} epochs at {views:.0f} views/s {'measured' if measured else 'assumed'}: "
                   f"{qp.epochs} x ({qp.epoch_s:.1f} s train + {qp.val_pass_s:.1f} s validation) + "
                   f"{qp.eval_s:.0f} s evaluation + {qp.fixed_s:.0f} s start-up and file check)")


def unexpected_skips(output: str, expected: tuple[str, ...]) -> list[str]:
    """pytest's ``-rs`` lines (``SKIPPED [n] file:line: reason``) whose reason is none of ``expected``."""
    skipped = [line for line in output.splitlines() if line.startswith("SKIPPED [")]
    return [line for line in skipped if not any(reason in line for reason in expected)]


def key_figures(stage: Stage, output: str) -> str:
    """One line of what the stage found."""
    try:
        if stage.name == "gpu_tests":
            found = re.findall(r"(\d+ (?:passed|failed|skipped|error|errors))", output)
            return ", ".join(found[-4:]) or "no pytest summary"
        result = json.loads(stage.outputs[0].read_text())
    except (OSError, ValueError, IndexError):
        return ""
    if stage.name == "nccl_job":
        steps = result["steps"]
        done = [f"{name} {'ok' if step['ok'] else 'FAILED'}" for name, step in steps.items()]
        stopped, resumed = steps.get("train_stopped_by_sigterm", {}), steps.get("train_resumed", {})
        return (", ".join(done) + f"; SIGTERM after step {stopped.get('sigterm_after_step')}, resumed from "
                f"{resumed.get('resumed_from_step')} to {resumed.get('final_step')}")
    if stage.name == "kernels":
        by_dtype = {}
        for row in result["sync_batchnorm"]["rows"]:
            by_dtype[row["dtype"]] = max(by_dtype.get(row["dtype"], 0.0), row["ratio"])
        lars = [f"{r['arch']} {1 / r['speedup']:.2f}x" for r in result["lars"] if "speedup" in r]
        return ("SyncBatchNorm/BatchNorm2d at worst " + ", ".join(f"{v:.2f}x {k}" for k, v in by_dtype.items())
                + f"; LARS/timm {', '.join(lars) or 'skipped'}; targets "
                + ("missed: " + "; ".join(result["missed"]) if result["missed"] else "met")
                + ("" if result.get("checked") else " (not checked at these sizes)"))
    if stage.name.startswith("feed"):
        parts = []
        for r in result["rows"]:
            ratio = f" ({r['views_per_s_over_model']:.2f}x model)" if "views_per_s_over_model" in r else ""
            parts.append(f"{r['mode']} {r['views_per_s']:.0f} views/s{ratio}")
        e2e = next((r for r in result["rows"] if r["mode"] == "e2e"), None)
        if e2e:
            stall = "-" if e2e.get("epoch_stall_steps") is None else f"{e2e['epoch_stall_steps']:.2f}"
            syncs = e2e["host_syncs_per_step"]
            parts.append(f"data wait {100 * e2e['data_wait_share']:.1f}%, stall {stall} steps, "
                         + ("no device to sync (CPU)" if syncs is None else f"{syncs:.2f} syncs/step"))
        return "; ".join(parts)
    r = result
    return (f"linear {r['linear_top1']:.3f}, kNN {r['knn_top1']:.3f} (random init {r['random_linear_top1']:.3f} / "
            f"{r['random_knn_top1']:.3f}), {r['epochs']} epochs, pretrain {r['pretrain_wall_s']:.0f} s")


def run_stage(stage: Stage, env: dict[str, str], log: Callable[[str], None]) -> dict:
    """Run one stage in its own process group, killed whole at its cap; its output goes to the log
    as it comes, its status and key figures (or its last lines) to the console."""
    print(f"[gpu-proof] {stage.name}: planned {stage.planned_s:.0f} s, cap {stage.cap_s} s: {stage.what}", flush=True)
    log(f"\n===== {stage.name} (cap {stage.cap_s} s): {' '.join(stage.command[1:])}\n")
    start = time.perf_counter()
    lines: list[str] = []
    with tempfile.TemporaryFile("w+") as capture:
        proc = subprocess.Popen(stage.command, cwd=REPO, env=env, stdout=capture, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            proc.wait(timeout=stage.cap_s)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
        try:  # the stage's helpers (torchrun ranks, DataLoader workers) go with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        capture.seek(0)
        output = capture.read()
    seconds = time.perf_counter() - start
    log(output)
    lines = output.splitlines()
    unexpected = unexpected_skips(output, stage.expected_skips)
    if status == "ok" and unexpected:  # a check that did not run did not pass
        status = "failed"
        output += "".join(f"\n[gpu-proof] not expected to skip: {line}" for line in unexpected)
        lines = output.splitlines()
    figures = key_figures(stage, output)  # a stage that wrote its JSON says what it found, even when it failed
    print(f"[gpu-proof] {stage.name}: {status} in {seconds:.0f} s (planned {stage.planned_s:.0f}, cap {stage.cap_s})"
          + (f": {figures}" if figures else ""), flush=True)
    if status != "ok":
        print(f"[gpu-proof] {stage.name}: its last {min(TAIL_LINES, len(lines))} lines:", flush=True)
        for line in lines[-TAIL_LINES:]:
            print(f"    {line}", flush=True)
    return {"name": stage.name, "status": status, "seconds": seconds, "planned_s": stage.planned_s,
            "cap_s": stage.cap_s, "what": stage.what, "command": stage.command[1:], "figures": figures,
            "outputs": [p.name for p in stage.outputs if p.exists()], "output_tail": "\n".join(lines[-TAIL_LINES:])}


class ResultsFolder:
    """The results folder: the summary rewritten atomically after every stage, the log appended."""

    def __init__(self, out: Path, tag: str) -> None:
        self.out = out
        self.summary_path, self.log_path = out / f"gpu_proof_{tag}.json", out / f"gpu_proof_{tag}.log"
        self.log_path.write_text("")

    def log(self, text: str) -> None:
        with open(self.log_path, "a", errors="replace") as f:
            f.write(text)

    def write_summary(self, summary: dict) -> None:
        from trainer.runtime.run_files import atomic_write_text

        atomic_write_text(self.summary_path, json.dumps(summary, indent=2))


def dry_data(folder: Path) -> Path:
    """The datasets' layout (cifar10-jpeg/{train,test}, imagenette2-224-subset/train) filled with the
    shipped photos, for dry runs."""
    import shutil

    from data_pipeline.sample_data import make_demo_dataset

    if (folder / "cifar10-jpeg" / "train").is_dir():
        return folder
    photos = folder / "photos"
    make_demo_dataset(photos, size=32, train_per_class=8, val_per_class=4, seed=1)
    (folder / "cifar10-jpeg").mkdir(parents=True)
    shutil.copytree(photos / "train", folder / "cifar10-jpeg" / "train")
    shutil.copytree(photos / "val", folder / "cifar10-jpeg" / "test")
    (folder / "imagenette2-224-subset").mkdir()
    shutil.copytree(photos / "train", folder / "imagenette2-224-subset" / "train")
    shutil.rmtree(photos)
    return folder


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks.gpu_proof", description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU, same stages, files and JSON (CI)")
    p.add_argument("--data", default=None, help="folder holding cifar10-jpeg/{train,test} and "
                   "imagenette2-224-subset/train (dry: made from the shipped photos when not given)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/gpu_proof; dry: a temp "
                   "folder)")
    p.add_argument("--work", default=None, help="run folders and checkpoints (default: a temp folder under /tmp)")
    p.add_argument("--stages", nargs="+", default=None, metavar="NAME", choices=STAGE_NAMES,
                   help="only these stages (a rerun of the ones that failed; default: all)")
    args = p.parse_args(argv)
    if not GPU_TESTS.is_file() and (args.stages is None or "gpu_tests" in args.stages):
        p.error(f"the proof's first stage runs the test suite's {GPU_TESTS.relative_to(REPO)}, which an installed "
                "wheel does not hold: run it from a clone of the repository (make gpu-proof DATA=...), or leave that "
                "stage out (--stages with the others)")
    work = Path(args.work or tempfile.mkdtemp(prefix="simclr_proof_work_"))
    if args.data is None and not args.dry:
        p.error("--data is needed: a folder holding cifar10-jpeg/{train,test} and imagenette2-224-subset/train")
    args.data = args.data or str(dry_data(work / "data"))
    out = Path(args.out or (tempfile.mkdtemp(prefix="simclr_proof_") if args.dry else
                            REPO / "benchmarks" / "results" / "gpu_proof"))
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.common import device_name, result_header
    from trainer.runtime.device import choose_device
    from trainer.tracking import git_commit

    device = choose_device("cpu" if args.dry else "auto")
    tag = "cpu_dry" if args.dry else device.type
    results = ResultsFolder(out, tag)
    stages = plan(args, out, work)
    # sizes the quality stage, when the CIFAR-10 feed stage runs (else a planning figure)
    feed_json = next(s for s in stages if s.name == "feed_cifar10_resnet18").outputs[0]
    stages = [s for s in stages if args.stages is None or s.name in args.stages]
    caps = sum(s.cap_s for s in stages)
    path_parts = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "SIMCLR_GIT_COMMIT": git_commit(), "PYTHONPATH": os.pathsep.join(path_parts),
           "PYTHONUNBUFFERED": "1"}
    summary = {**result_header("gpu_proof", device_name(device)), "git_commit": env["SIMCLR_GIT_COMMIT"],
               "dry": args.dry, "total_cap_s": caps, "data": args.data, "work": str(work), "repo": str(REPO),
               "planned": [{"name": s.name, "cap_s": s.cap_s} for s in stages], "stages": []}
    print(f"[gpu-proof] {device_name(device)}, commit {summary['git_commit'][:12]}, {len(stages)} stages, caps "
          f"{caps} s in all; results in {out}", flush=True)
    results.write_summary(summary)
    start_s = None  # the first feed stage's measured start sizes the later ones
    for stage in stages:
        if stage.name == "quality_cifar10":
            size_quality(stage, feed_json, args.dry)
        if stage.name.startswith("feed") and start_s is not None:
            resize_from_start(stage, start_s)
        summary["stages"].append(run_stage(stage, env, results.log))
        if stage.name.startswith("feed") and start_s is None:
            start_s = measured_start_s(stage.outputs[0])
        summary["total_s"] = sum(r["seconds"] for r in summary["stages"])
        results.write_summary(summary)
    passed = sum(r["status"] == "ok" for r in summary["stages"])
    print(f"[gpu-proof] {passed}/{len(stages)} stages passed in {summary['total_s']:.0f} s; wrote "
          f"{', '.join(sorted(p.name for p in out.iterdir()))} to {out}", flush=True)
    return summary


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
