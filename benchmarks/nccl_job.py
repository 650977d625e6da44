"""The GPU proof's NCCL stage: a user's first multi-GPU job, on one GPU.

``simclr train --nproc 1`` makes a 1-rank process group (NCCL on a GPU, gloo with ``--dry`` on the
CPU) and so runs every collective a 64-GPU job runs, in the same order: DDP, the own SyncBatchNorm,
the loss's gather of negatives, every rank's window figures, the stop agreement, the checkpoint's
gathered state, the online probe. The job is stopped with SIGTERM mid-run (as SLURM pre-empts),
resumed to its end with the same command, then its encoder goes through ``simclr eval --nproc 1`` and
``simclr embed --nproc 1`` (its last checkpoint: the run stops at ``train.stop_after_steps``). Each
step's exit status, seconds and evidence go to ``--out`` (JSON, rewritten after each step, so a
stage cut short still says what finished).

    python3 -m benchmarks.nccl_job --data D/cifar10-jpeg --work W --out O/nccl_job.json   # GPU node
    python3 -m benchmarks.nccl_job --dry --data D/cifar10-jpeg --work W --out O/nccl_job_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def overrides(data: Path, run_dir: Path, dry: bool) -> list[str]:
    """A CIFAR-10 ResNet-18 run that checkpoints often, logs every few steps and ends its first
    epoch before it stops (the online probe's figures are logged at epoch ends)."""
    sizes = (["train.device=cpu", "precision=fp32", "data.image_size=16", "data.batch_size=16", "data.num_workers=0",
              "data.backend=torchvision", "model.proj_hidden_dim=32", "model.proj_out_dim=16"] if dry else
             ["train.device=cuda", "precision=bf16", "data.batch_size=1024", "data.num_workers=8"])
    return ["--config", "configs/cifar10_resnet18.yaml", f"data.root={data / 'train'}",
            f"data.val_root={data / 'test'}", f"train.run_dir={run_dir}", "train.epochs=2",
            "train.stop_after_steps=" + ("8" if dry else "60"),
            "train.log_every=2", "checkpoint.every_steps=4", "train.stop_check_every=1", "train.progress_bar=false",
            "tracking.enabled=false", "train.knn_every_epochs=0", *sizes]


def steps_logged(run_dir: Path) -> int:
    """The last step in the run's metrics.jsonl (0 before the first window)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def run(command: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return {"command": command[2:], "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": (proc.stdout + proc.stderr)[-3000:], "output": proc.stdout + proc.stderr}


def stop_mid_run(command: list[str], run_dir: Path, at_step: int, timeout: float) -> dict:
    """Start the job, SIGTERM its launcher once the run has logged ``at_step``, wait for it to end."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sent_at = None
    while proc.poll() is None and time.perf_counter() - start < timeout:
        if sent_at is None and steps_logged(run_dir) >= at_step:
            sent_at = steps_logged(run_dir)
            proc.send_signal(signal.SIGTERM)  # the launcher passes it on to its ranks once, as scancel does
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0]
    return {"command": command[2:], "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "sigterm_after_step": sent_at, "output_tail": output[-3000:], "output": output}


def checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("_")[1]): p for p in sorted((run_dir / "checkpoints").glob("step_*.pt"))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.nccl_job", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a labelled dataset folder holding train/ and test/ (cifar10-jpeg)")
    p.add_argument("--work", required=True, help="run folders, evaluation and embeddings go here")
    p.add_argument("--out", required=True, help="the stage's JSON")
    p.add_argument("--dry", action="store_true", help="CPU ranks on gloo, tiny sizes (CI)")
    p.add_argument("--timeout-s", type=float, default=240.0, help="the most any one command may take")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, work, out = Path(args.data), Path(args.work), Path(args.out)
    run_dir = work / "nccl_run"
    simclr = [sys.executable, "-m", "launch"]
    train = [*simclr, "train", "--nproc", "1", *overrides(data, run_dir, args.dry)]
    device = ["--device", "cpu" if args.dry else "cuda"]
    report: dict = {"dry": args.dry, "steps": {}, "ok": False}

    def record(name: str, result: dict, ok: bool, **evidence) -> bool:
        result = {k: v for k, v in result.items() if k != "output"}
        report["steps"][name] = {**result, "ok": ok, **evidence}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"[nccl-job] {name}: {'ok' if ok else 'FAILED'} (exit {result['exit']}, {result['seconds']} s) "
              f"{json.dumps(evidence)}", flush=True)
        if not ok:
            print(result["output_tail"], flush=True)
        return ok

    stopped = stop_mid_run(train, run_dir, at_step=2 if args.dry else 10, timeout=args.timeout_s)
    backend = "gloo" if args.dry else "nccl"
    grouped = f"process group: {backend}, 1 rank(s)" in stopped["output"]
    kept = checkpoints(run_dir)
    if not record("train_stopped_by_sigterm", stopped, stopped["exit"] == 128 + signal.SIGTERM and grouped and
                  bool(kept), process_group=grouped, checkpoints=sorted(kept)):
        return 1
    resumed = run(train, args.timeout_s)
    resumed_from = max(kept)
    ranks_rows = len((run_dir / "ranks.jsonl").read_text().splitlines()) if (run_dir / "ranks.jsonl").exists() else 0
    final = steps_logged(run_dir)
    said = f"resumed from {kept[resumed_from]} at step {resumed_from}" in resumed["output"]
    probe = "probe/train_top1" in (run_dir / "metrics.jsonl").read_text()
    last = checkpoints(run_dir)
    if not record("train_resumed", resumed, resumed["exit"] == 0 and said and final == max(last) and ranks_rows > 0
                  and probe,
                  resumed_from_step=resumed_from, final_step=final, rank_rows=ranks_rows, online_probe=probe):
        return 1
    eval_dir = work / "nccl_eval"
    evaluated = run([*simclr, "eval", "--nproc", "1", "--checkpoint", str(last[max(last)]), "--train-data",
                     str(data / "test"), "--val-data", str(data / "test"), "--probe-epochs", "5", "--no-baseline",
                     "--no-mlflow", "--out", str(eval_dir), *device], args.timeout_s)
    found = eval_dir / "report.json"
    rows = json.loads(found.read_text()).get("rows", {}) if found.exists() else {}
    grouped = f"process group: {backend}, 1 rank(s)" in evaluated["output"]
    if not record("eval", evaluated, evaluated["exit"] == 0 and bool(rows) and grouped, rows=rows,
                  process_group=grouped):
        return 1
    emb = work / "nccl_embed"
    embedded = run([*simclr, "embed", "--nproc", "1", "--checkpoint", str(last[max(last)]), "--data",
                    str(data / "test"), "--out", str(emb), "--overwrite", *device], args.timeout_s)
    meta = json.loads((emb / "meta.json").read_text()) if (emb / "meta.json").exists() else {}
    grouped = f"process group: {backend}, 1 rank(s)" in embedded["output"]
    if not record("embed", embedded, embedded["exit"] == 0 and meta.get("complete", False) and grouped,
                  samples=meta.get("samples"), dim=meta.get("dim"), process_group=grouped):
        return 1
    report["ok"] = True
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    sys.exit(main())
