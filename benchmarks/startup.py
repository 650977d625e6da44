"""Start-up benchmark: how long a run takes to reach its first step on a large image tree, and how
many file-system calls it makes per file, on a first start and on a restart, with 1 and 2 ranks.

    python -m benchmarks.startup                          # 20k and 200k files (hard links of real JPEGs)
    python -m benchmarks.startup --sizes 2000 20000 --ranks 1
    simclr bench startup ...                              # the same

Trees are ImageFolder trees of N files (ImageNet's density, ~1,300 a class folder) made by hard-linking
a few real JPEGs, so they cost almost no disk. For each size and rank count it times ``simclr train``
to the end of step 1 (a first start in a fresh run folder), then to the end of the first step of
a restart in the same folder, and counts the job's file-system calls (every process, under
``strace -f -c``; "not measured" where strace is missing). Calls per file are marginal: the
difference between two tree sizes over the difference in files, so the constant cost (Python's
imports) cancels. It also times the listing alone against torchvision's ``make_dataset`` and the
listing this project had before (``sorted(rglob)`` with a stat per file) on the same tree, and the
two listings ``simclr eval`` makes (fresh, and with the training run's index).

Writes JSON (device, versions, commit) under benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PER_CLASS = 1300  # ImageNet's files per class folder
SYSCALLS = "%file,getdents64"  # what strace counts: every call that names a path, and directory reads
TINY_RUN = ["model.arch=resnet18", "model.cifar_stem=true", "model.proj_hidden_dim=32", "model.proj_out_dim=16",
            "data.image_size=16", "data.batch_size=16", "data.backend=torchvision", "data.num_workers=0",
            "train.device=cpu", "precision=fp32", "tracking.enabled=false", "train.progress_bar=false",
            "train.epochs=1", "checkpoint.every_steps=1000"]


def make_tree(root: Path, files: int, photos: list[Path]) -> Path:
    """An ImageFolder tree of ``files`` hard links to ``photos`` (kept: a later run reuses it)."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(files):
        return root
    shutil.rmtree(root, ignore_errors=True)
    classes = max(2, round(files / PER_CLASS))
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c, files, classes):
            os.link(photos[i % len(photos)], folder / f"n{c:08d}_{i}.JPEG")
    done.write_text(str(files))
    return root


def rglob_listing(root: Path) -> int:
    """The listing before the tree index (a stat per file), for comparison."""
    from data_pipeline.sources import IMAGE_EXTENSIONS

    n = 0
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        n += len(sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                        and not any(part.startswith(".") for part in p.relative_to(d).parts)))
    return n


def time_listings(root: Path, rounds: int) -> dict[str, float]:
    """Seconds to list ``root`` (median of ``rounds``, interleaved, page cache warm)."""
    from torchvision.datasets.folder import make_dataset

    from data_pipeline.image_files import list_image_files
    from data_pipeline.sources import IMAGE_EXTENSIONS

    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    ways = {"ours_s": lambda: len(list_image_files(root)),
            "torchvision_make_dataset_s": lambda: len(make_dataset(str(root), {c: i for i, c in enumerate(classes)},
                                                                   extensions=IMAGE_EXTENSIONS)),
            "before_rglob_s": lambda: rglob_listing(root)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():
        fn()  # warm the page cache for all alike
    for _ in range(rounds):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def time_eval_listings(root: Path, work: Path) -> dict[str, float]:
    """``simclr eval`` opens two sets: fresh, then beside a run folder that holds their index."""
    from data_pipeline import IndexStore, open_source

    store = IndexStore(work / "eval_index")
    shutil.rmtree(store.folder, ignore_errors=True)
    out = {}
    for name in ("eval_first_s", "eval_indexed_s"):
        t = time.perf_counter()
        open_source(root, store=store)
        open_source(root, store=store)  # the held-out set (the same tree here: the same cost)
        out[name] = time.perf_counter() - t
    return out


def train_command(root: Path, run_dir: Path, ranks: int, stop_after: int) -> list[str]:
    return [sys.executable, "-m", "launch", "train", *(["--nproc", str(ranks)] if ranks > 1 else []),
            *TINY_RUN, f"data.root={root}", f"train.run_dir={run_dir}", f"train.stop_after_steps={stop_after}"]


def run_to_step(cmd: list[str], strace_out: Path | None) -> float:
    """Wall seconds of one start to the end of its step (under strace when ``strace_out`` is set)."""
    if strace_out is not None:
        cmd = ["strace", "-f", "-c", "-e", f"trace={SYSCALLS}", "-o", str(strace_out), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[-4:])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def strace_calls(path: Path) -> int:
    """The total of ``strace -c``'s summary (its last line: 'total')."""
    for line in reversed(path.read_text().splitlines()):
        fields = line.split()
        if fields and fields[-1] == "total":
            return int(fields[3])  # % time, seconds, usecs/call, calls, [errors], total
    raise ValueError(f"no strace summary in {path}")


def measure_starts(root: Path, files: int, ranks: int, work: Path, use_strace: bool) -> dict:
    """A first start and a restart: wall seconds (without strace) and file-system calls (with it)."""
    row: dict = {"files": files, "ranks": ranks}
    run = work / f"run_{files}_{ranks}"
    shutil.rmtree(run, ignore_errors=True)
    row["first_s"] = run_to_step(train_command(root, run, ranks, 1), None)
    row["restart_s"] = run_to_step(train_command(root, run, ranks, 2), None)
    row["first_calls"] = row["restart_calls"] = None
    if use_strace:
        traced = work / f"traced_{files}_{ranks}"
        shutil.rmtree(traced, ignore_errors=True)
        run_to_step(train_command(root, traced, ranks, 1), work / "strace_first.txt")
        run_to_step(train_command(root, traced, ranks, 2), work / "strace_restart.txt")
        row["first_calls"] = strace_calls(work / "strace_first.txt")
        row["restart_calls"] = strace_calls(work / "strace_restart.txt")
    return row


def marginal(rows: list[dict], key: str) -> dict[int, float | None]:
    """Calls per file between the smallest and the largest tree, for each rank count."""
    out = {}
    for ranks in sorted({r["ranks"] for r in rows}):
        mine = sorted((r for r in rows if r["ranks"] == ranks), key=lambda r: r["files"])
        lo, hi = mine[0], mine[-1]
        if hi["files"] == lo["files"] or hi[key] is None or lo[key] is None:
            out[ranks] = None
        else:
            out[ranks] = (hi[key] - lo[key]) / (hi["files"] - lo["files"])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="simclr bench startup", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000], help="tree sizes (files)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts (default 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the listing timings (median)")
    p.add_argument("--work", default=None, help="where the trees and run folders go (kept: trees are reused)")
    p.add_argument("--no-strace", action="store_true", help="time only; do not count file-system calls")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/startup_<device>.json)")
    args = p.parse_args(argv)
    from benchmarks.common import RESULTS, device_name, result_header, write_json
    from data_pipeline.sample_data import make_demo_dataset
    from trainer.runtime.device import choose_device

    work = Path(args.work or Path(tempfile.gettempdir()) / "simclr_startup")
    work.mkdir(parents=True, exist_ok=True)
    photos_dir = work / "photos"
    if not (photos_dir / "train").is_dir():
        make_demo_dataset(photos_dir, size=32, train_per_class=8, val_per_class=1, seed=1)
    photos = sorted((photos_dir / "train").rglob("*.jpg"))
    use_strace = not args.no_strace and shutil.which("strace") is not None
    rows, listings = [], {}
    for files in sorted(args.sizes):
        root = make_tree(work / f"tree_{files}", files, photos)
        listings[files] = {**time_listings(root, args.rounds), **time_eval_listings(root, work)}
        for ranks in args.ranks:
            rows.append(measure_starts(root, files, ranks, work, use_strace))
            print(f"  {files} files, {ranks} rank(s): first {rows[-1]['first_s']:.1f} s, restart "
                  f"{rows[-1]['restart_s']:.1f} s", flush=True)
    big, small = max(args.sizes), min(args.sizes)
    restart_ratio = {r: next(x["restart_s"] for x in rows if x["files"] == big and x["ranks"] == r)
                     / next(x["restart_s"] for x in rows if x["files"] == small and x["ranks"] == r)
                     for r in args.ranks}
    result = {**result_header("startup", device_name(choose_device("cpu"))),
              "strace": "counted (strace -f -c, " + SYSCALLS + ")" if use_strace else "not measured (no strace)",
              "rows": rows, "listing": {str(k): v for k, v in listings.items()},
              "calls_per_file_first": marginal(rows, "first_calls"),
              "calls_per_file_restart": marginal(rows, "restart_calls"),
              "restart_s_largest_over_smallest": restart_ratio}
    print_result(result)
    out = write_json(result, Path(args.out) if args.out else RESULTS / "startup_cpu.json")
    print(f"wrote {out}")
    return result


def print_result(result: dict) -> None:
    from benchmarks.common import print_table

    print_table(f"start-up on {result['device']}; file-system calls: {result['strace']}",
                [("files", ">8"), ("ranks", ">6"), ("first s", ">9.1f"), ("restart s", ">11.1f"),
                 ("first calls", ">13"), ("restart calls", ">15")],
                [[r["files"], r["ranks"], r["first_s"], r["restart_s"], r["first_calls"], r["restart_calls"]]
                 for r in result["rows"]])
    for name, key in (("first start", "calls_per_file_first"), ("restart", "calls_per_file_restart")):
        per = ", ".join(f"{k} rank(s) {'-' if v is None else f'{v:.3f}'}" for k, v in result[key].items())
        print(f"calls per file, {name} (marginal): {per}")
    for files, t in result["listing"].items():
        print(f"listing {files} files: ours {t['ours_s']:.2f} s, torchvision make_dataset "
              f"{t['torchvision_make_dataset_s']:.2f} s ({t['ours_s'] / t['torchvision_make_dataset_s']:.2f}x), "
              f"before (rglob + stat) {t['before_rglob_s']:.2f} s; simclr eval's two sets: first "
              f"{t['eval_first_s']:.2f} s, indexed {t['eval_indexed_s']:.2f} s")
    ratio = ", ".join(f"{k} rank(s) {v:.2f}x" for k, v in result["restart_s_largest_over_smallest"].items())
    print(f"restart to step 1, largest tree over smallest: {ratio}")


if __name__ == "__main__":
    from foundation.logs import configure

    configure()  # a script is an entry point: it sets up the console lines
    main()
