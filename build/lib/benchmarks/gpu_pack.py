"""Pack the GPU proof for a lent GPU machine, print the calls that run it there, and rehearse them here.

    python3 -m benchmarks.gpu_pack             # make gpu-proof-pack: DALI + the datasets in parts, the call plan
    python3 -m benchmarks.gpu_pack --dry       # the same with a tiny payload (the photos in the datasets' layout)
    python3 -m benchmarks.gpu_pack unpack      # on the machine, in the last call: join, check, install DALI
    python3 -m benchmarks.gpu_pack rehearse    # make gpu-proof-rehearsal: the dry plan run here as there

A call to the machine carries at most 64 MiB with the working tree, and the machine stays warm
only ~30 s after a call, so what the image lacks (DALI with its CUDA 13 libraries, and the
CIFAR-10 and Imagenette images) travels as one payload: the wheels re-stored uncompressed (their
files unchanged) so that xz can do better than zip, and the datasets, in one ``tar.xz`` cut into
parts (``.gpu_part_<k>/``). Each part call copies its part to ``$SIMCLR_GPU_TMP`` (default
/tmp/simclr_gpu); the last one joins and checks them, installs DALI into the image's Python and runs
the proof; a rerun, while the machine is warm, runs the proof alone. ``.gpu_proof/`` (the commit
and the plan) travels with the proof call.

The rehearsal runs the dry plan's calls exactly as printed, in a copy of the tree as it travels (no
``.git``, no ``.venv``), with MLflow and submitit made unimportable and ``$OUT`` an empty folder,
then checks that folder against the rules of what comes back.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROOF_DIR = ".gpu_proof"
PART_PREFIX = ".gpu_part_"
TMP = "${SIMCLR_GPU_TMP:-/tmp/simclr_gpu}"  # on the machine; the rehearsal points it at a temp folder
CALL_MIB = 64  # what one call may carry, the working tree included
MARGIN_MIB = 2
DALI_VERSION = "2.4.0"
# DALI's dependencies that the GPU image lacks (it has numpy, six, packaging, pyyaml, tqdm, pytest)
DALI_DEPS = ["nvidia-nvimgcodec-cu13[all]<0.10.0,>=0.9.0", "nvidia-libnvcomp-cu13==5.3.0.16",
             "astunparse<=1.6.3,>=1.6.0", "gast<=0.7.0,>=0.3.3", "optree", "makefun", "libcst~=1.8", "nvtx"]
IN_IMAGE = ("numpy-", "six-", "packaging-", "typing_extensions-", "pyyaml-", "PyYAML-", "wheel-")
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                          "manylinux2014_x86_64", "manylinux1_x86_64", "any") for a in ("--platform", p)]]
# the datasets' parts the proof reads (Imagenette's validation split is not needed: carry less)
DATA_PARTS = ["cifar10-jpeg/train", "cifar10-jpeg/test", "imagenette2-224-subset/train"]

# Device-minute estimate: figures seen here (the device tool's notes and earlier sessions)
DEVICE_BUDGET_S = 15 * 60
MACHINE_START_S = 90
CALL_OVERHEAD_S = 12  # a call's own start and return, on a warm machine
TRANSFER_MIB_PER_S = 8
XZ_MIB_PER_S = 12  # of the payload, decompressed by Python's lzma (one thread; 21 s for 252 MiB here)
PIP_MIB_PER_S = 30  # the stored wheels, installed with --no-compile


@dataclass
class Call:
    carry: list[str]
    mib: float  # what this call carries, the working tree included
    command: str
    timeout_s: int
    why: str

    unpack_s: float = 0.0  # the last part's call joins, decompresses and installs

    def seconds(self) -> float:
        """This call's device time, the proof's run excluded."""
        return CALL_OVERHEAD_S + self.mib / TRANSFER_MIB_PER_S + self.unpack_s


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def travelling_files(repo: Path = REPO) -> list[str]:
    """What every call sends: tracked files and untracked ones that git does not ignore."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=repo).split("\0")
    return [f for f in listed if f and (repo / f).is_file()]


def tree_mib(repo: Path = REPO) -> float:
    return sum((repo / f).stat().st_size for f in travelling_files(repo)) / 2**20


def exclude(*patterns: str) -> None:
    """Keep the packed folders out of git (they travel only when a call carries them)."""
    path = REPO / ".git" / "info" / "exclude"
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.read_text().splitlines() if path.exists() else []
    with open(path, "a") as f:
        for p in patterns:
            if p not in have:
                f.write(p + "\n")


def stored_wheel(src: Path, dst: Path) -> None:
    """The same wheel with its members stored, not deflated: files and RECORD unchanged, and xz
    then compresses the libraries much better than zip did."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)  # before the copy's method changes: zin reads by this ZipInfo
            stored = copy.copy(info)
            stored.compress_type = zipfile.ZIP_STORED
            zout.writestr(stored, data)


def download_dali(folder: Path) -> list[Path]:
    """DALI (CUDA 13) and what it needs that the GPU image lacks, as wheels for its Python 3.12."""
    raw = folder / "raw"
    pip = [sys.executable, "-m", "pip", "download", "-q", *PLATFORM, "-d", str(raw)]
    for args in (["--no-deps", f"nvidia-dali-cuda130=={DALI_VERSION}"], DALI_DEPS):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True)  # pip's index warnings: on failure only
        if proc.returncode:
            raise SystemExit(f"gpu_pack: pip download {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    wheels = []
    for whl in sorted(raw.glob("*.whl")):
        if not whl.name.startswith(IN_IMAGE):  # a second copy of what the image has would stop the install
            wheels.append(folder / whl.name)
            stored_wheel(whl, wheels[-1])
    return wheels


def dry_payload_data(folder: Path) -> Path:
    from benchmarks.gpu_proof import dry_data

    return dry_data(folder)


def write_payload(path: Path, wheels: list[Path], data: Path) -> None:
    """One tar.xz of whl/ and data/ (xz from the system, threaded, where it is installed)."""
    members = [(w, f"whl/{w.name}") for w in wheels] + [(data / d, f"data/{d}") for d in DATA_PARTS]
    missing = [str(src) for src, _ in members if not src.exists()]
    if missing:
        raise SystemExit(f"gpu_pack: missing {', '.join(missing)}: the datasets lie in ../shared/data (see its "
                         "README), or pass --data")
    tar_path = path.with_suffix("")
    with tarfile.open(tar_path, "w") as tar:
        for src, name in members:
            tar.add(src, arcname=name)
    if shutil.which("xz"):
        subprocess.run(["xz", "-T0", "-6", "-f", str(tar_path)], check=True)
    else:
        import lzma

        with open(tar_path, "rb") as fin, lzma.open(path, "wb", preset=6) as fout:
            shutil.copyfileobj(fin, fout, 2**20)
        tar_path.unlink()


def split_parts(payload: Path, part_bytes: int, dest: Path) -> list[tuple[str, int]]:
    """``payload`` cut into ``dest/.gpu_part_<k>/payload.<kk>``; returns (folder, bytes) for each."""
    for old in dest.glob(f"{PART_PREFIX}*"):
        shutil.rmtree(old)
    parts = []
    with open(payload, "rb") as f:
        k = 0
        while chunk := f.read(part_bytes):
            k += 1
            folder = dest / f"{PART_PREFIX}{k}"
            folder.mkdir()
            (folder / f"payload.{k:02d}").write_bytes(chunk)
            parts.append((folder.name, len(chunk)))
    return parts


def proof_command(work: str, dry: bool) -> str:
    return (f'python3 -m benchmarks.gpu_proof --data {TMP}/data --out "$OUT" --work {TMP}/{work}'
            + (" --dry" if dry else ""))


def make_calls(parts: list[tuple[str, int]], tree: float, proof_mib: float, proof_cap_s: int,
               dry: bool) -> list[Call]:
    """The calls in order: each part to the machine's temp folder, the last one with the proof."""
    calls = []
    def copy(part: str) -> str:
        return f"mkdir -p {TMP}/parts && cp {part}/* {TMP}/parts/"

    proof = proof_command("work", dry)
    for i, (folder, size) in enumerate(parts, 1):
        last = i == len(parts)
        cmd = copy(folder)
        if last:
            cmd += f" && python3 -m benchmarks.gpu_pack unpack && {proof}"
        else:
            cmd += f" && ls -l {TMP}/parts"
        calls.append(Call([folder, PROOF_DIR] if last else [folder], tree + size / 2**20 + (proof_mib if last else 0),
                          cmd, min(600, proof_cap_s + 90) if last else 120,
                          "the last part; join, check and install, then the proof" if last
                          else f"part {i} of {len(parts)} (back to back: the machine stays warm ~30 s)"))
    return calls


def rerun_call(tree: float, proof_mib: float, proof_cap_s: int, dry: bool) -> Call:
    return Call([PROOF_DIR], tree + proof_mib, proof_command("work_rerun", dry), min(600, proof_cap_s + 30),
                "only to rerun the proof, while the machine is still warm (a cold one needs every call again)")


def pack(args: argparse.Namespace, dest: Path = REPO) -> dict:
    """The payload in parts and ``.gpu_proof/`` (commit, plan) under ``dest`` (the repository, or
    the rehearsal's own folder), and the call plan printed."""
    from benchmarks.gpu_proof import TOTAL_CAP_S

    if dest == REPO:
        exclude(f"/{PROOF_DIR}/", f"/{PART_PREFIX}*/")
    proof_dir = dest / PROOF_DIR
    shutil.rmtree(proof_dir, ignore_errors=True)
    proof_dir.mkdir()
    commit = git("rev-parse", "HEAD").strip()
    if git("status", "--porcelain", "--untracked-files=no").strip():
        print(f"gpu_pack: warning: tracked files differ from {commit[:12]}, which the results will name; commit first "
              "and pack again", file=sys.stderr)
    (proof_dir / "commit").write_text(commit + "\n")
    work = Path(tempfile.mkdtemp(prefix="simclr_pack_"))
    try:
        if args.dry:
            wheels, data = [], dry_payload_data(work / "data")
        else:
            wheels, data = download_dali(work / "whl"), Path(args.data)
        payload = work / "payload.tar.xz"
        write_payload(payload, wheels, data)
        digest = hashlib.sha256(payload.read_bytes()).hexdigest()
        tree = tree_mib()
        part_mib = args.part_mib or (CALL_MIB - MARGIN_MIB - tree)
        parts = split_parts(payload, int(part_mib * 2**20), dest)
        payload_bytes = payload.stat().st_size
        wheel_bytes = sum(w.stat().st_size for w in wheels)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plan = {"commit": commit, "dry": args.dry, "payload_sha256": digest, "payload_bytes": payload_bytes,
            "wheels": [w.name for w in wheels], "data": DATA_PARTS, "parts": [p for p, _ in parts],
            "tree_mib": tree}
    (proof_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    proof_mib = sum(f.stat().st_size for f in proof_dir.iterdir()) / 2**20
    calls = make_calls(parts, tree, proof_mib, TOTAL_CAP_S, args.dry)
    calls[-1].unpack_s = payload_bytes / 2**20 / XZ_MIB_PER_S + wheel_bytes / 2**20 / PIP_MIB_PER_S
    rerun = rerun_call(tree, proof_mib, TOTAL_CAP_S, args.dry)
    plan["calls"], plan["rerun"] = [asdict(c) for c in calls], asdict(rerun)
    estimate = {"machine_start_s": MACHINE_START_S, "calls_s": sum(c.seconds() for c in calls),
                "proof_s": TOTAL_CAP_S, "rerun_s": rerun.seconds() + TOTAL_CAP_S}
    estimate["first_try_s"] = estimate["machine_start_s"] + estimate["calls_s"] + estimate["proof_s"]
    plan["estimate"] = estimate
    (proof_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    print_plan(plan)
    return plan


def print_plan(plan: dict) -> None:
    e = plan["estimate"]
    print(f"payload {plan['payload_bytes'] / 2**20:.1f} MiB (sha256 {plan['payload_sha256'][:16]}...): "
          f"{len(plan['wheels'])} wheels, {', '.join(plan['data'])}; working tree {plan['tree_mib']:.1f} MiB a call")
    print("\nDevice calls, in order and back to back (each within ~30 s of the last: the machine must stay warm):")
    for i, call in enumerate(plan["calls"], 1):
        print(f"  {i}. run  carry={json.dumps(call['carry'])}  ({call['mib']:.1f} MiB, timeout_s={call['timeout_s']})"
              f"  -- {call['why']}\n     command: {call['command']}")
    r = plan["rerun"]
    print(f"  rerun  carry={json.dumps(r['carry'])}  ({r['mib']:.1f} MiB, timeout_s={r['timeout_s']})  -- {r['why']}\n"
          f"     command: {r['command']}\n"
          "     (add --stages NAME ... to rerun only the stages that failed: each costs at most its cap)")
    print("  then give_back.")
    left = DEVICE_BUDGET_S - e["first_try_s"]
    advice = ("room for the whole proof again" if left >= e["rerun_s"]
              else "rerun only the stages that failed (--stages), each at most its cap")
    print(f"\nDevice minutes (estimate): start {e['machine_start_s'] / 60:.1f} + calls {e['calls_s'] / 60:.1f} + proof "
          f"at most {e['proof_s'] / 60:.1f} = {e['first_try_s'] / 60:.1f} min for the first try, of "
          f"{DEVICE_BUDGET_S / 60:.0f}; {left / 60:.1f} min left: {advice}")


def unpack(args: argparse.Namespace) -> None:
    """On the machine: join the parts, check them against the plan, extract, install the wheels."""
    tmp = Path(os.environ.get("SIMCLR_GPU_TMP") or "/tmp/simclr_gpu")  # TMP, as the shell expands it
    plan = json.loads((REPO / PROOF_DIR / "plan.json").read_text())
    have = sorted((tmp / "parts").glob("payload.*"))
    want = [f"payload.{k:02d}" for k in range(1, len(plan["parts"]) + 1)]
    missing = sorted(set(want) - {p.name for p in have})
    if missing:
        raise SystemExit(f"gpu_pack unpack: {', '.join(missing)} of {len(want)} parts missing in {tmp / 'parts'}: the "
                         "machine went cold between calls (parts are lost with it); make every part call again, "
                         "back to back")
    start = time.perf_counter()
    digest = hashlib.sha256()
    joined = tmp / "payload.tar.xz"
    with open(joined, "wb") as out:
        for name in want:
            data = (tmp / "parts" / name).read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != plan["payload_sha256"]:
        raise SystemExit(f"gpu_pack unpack: the joined parts do not match the plan (sha256 {digest.hexdigest()[:16]}, "
                         f"planned {plan['payload_sha256'][:16]}): parts from another pack; pack again and resend")
    with tarfile.open(joined, "r:xz") as tar:
        tar.extractall(tmp, filter="data")
    joined.unlink()
    shutil.rmtree(tmp / "parts")
    wheels = sorted((tmp / "whl").glob("*.whl"))
    if wheels:  # into the image's own environment, beside its torch and CUDA wheels (one nvidia/ folder)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        *map(str, wheels)], check=True)
        shutil.rmtree(tmp / "whl")
    probe = subprocess.run([sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"],
                           capture_output=True, text=True)
    dali = probe.stdout.strip() if probe.returncode == 0 else f"not importable ({probe.stderr.strip()[-200:]})"
    counts = {d: sum(1 for _ in (tmp / "data" / d).rglob("*.jpg")) for d in plan["data"]}
    print(f"[gpu-pack] unpacked in {time.perf_counter() - start:.0f} s: DALI {dali}; "
          + ", ".join(f"{d} {n} images" for d, n in counts.items()), flush=True)


BLOCKER = '''"""The GPU machine's image has no MLflow and no submitit: make them unimportable here too."""
import sys


class _NotInTheImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "submitit"):
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU image has none)", name=name)
        return None


sys.meta_path.insert(0, _NotInTheImage())
'''


def rehearse(args: argparse.Namespace) -> dict:
    """Pack (dry), then run the plan's calls in a copy of the tree as it travels, as the machine would."""
    root = Path(args.root or tempfile.mkdtemp(prefix="simclr_rehearsal_"))
    packed = root / "packed"  # not the repository's own .gpu_proof/: a real pack there stays
    packed.mkdir(parents=True)
    plan = pack(argparse.Namespace(dry=True, data=None, part_mib=args.part_mib or 0.04), packed)
    machine = root / "machine"  # the copy: what travels, no .git, no .venv
    for rel in travelling_files():
        (machine / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, machine / rel)
    bin_dir, blocker = root / "bin", root / "blocker"  # python3 is this Python, as the image's is its own
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would lose the venv
    (bin_dir / "python3").chmod(0o755)
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = root / "OUT"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(blocker),
           "SIMCLR_GPU_TMP": str(root / "tmp"), "OMP_NUM_THREADS": "1"}
    env.pop("SIMCLR_GIT_COMMIT", None)
    calls = []
    for call in plan["calls"]:
        for rel in call["carry"]:  # carried paths arrive, and stay there for the next calls
            shutil.rmtree(machine / rel, ignore_errors=True)
            shutil.copytree(packed / rel, machine / rel)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-c", call["command"]], cwd=machine, env={**env, "OUT": str(out)},
                              capture_output=True, text=True, timeout=call["timeout_s"])
        calls.append({"command": call["command"], "rc": proc.returncode, "seconds": time.perf_counter() - start,
                      "output": proc.stdout + proc.stderr})
        print(f"[rehearsal] call {len(calls)}: rc {proc.returncode} in {calls[-1]['seconds']:.0f} s", flush=True)
        if proc.returncode:
            print(calls[-1]["output"][-12_000:], flush=True)
            break
    from benchmarks.gpu_proof import returnable_problems

    report = {"root": str(root), "out": str(out), "calls": calls, "returnable_problems": returnable_problems(out),
              "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
              "machine": str(machine), "env": {k: env[k] for k in ("PATH", "PYTHONPATH", "SIMCLR_GPU_TMP")}}
    (root / "report.json").write_text(json.dumps(report, indent=2))
    print(f"[rehearsal] {len(calls)}/{len(plan['calls'])} calls ran; {out} holds {', '.join(report['files'])}; "
          + ("it would come back whole" if not report["returnable_problems"]
             else "it would NOT come back whole: " + "; ".join(report["returnable_problems"])), flush=True)
    return report


def main(argv: list[str] | None = None) -> object:
    p = argparse.ArgumentParser(prog="benchmarks.gpu_pack", description=__doc__.split("\n")[0])
    p.add_argument("action", nargs="?", default="pack", choices=["pack", "unpack", "rehearse"])
    p.add_argument("--dry", action="store_true", help="pack: a tiny payload (no wheels; the photos as the datasets)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                   help="pack: the folder holding cifar10-jpeg/ and imagenette2-224-subset/ (default ../shared/data)")
    p.add_argument("--part-mib", type=float, default=0, help="pack: part size (default: what a call has room for)")
    p.add_argument("--root", default=None, help="rehearse: where the copy, $OUT and the machine's /tmp go")
    args = p.parse_args(argv)
    return {"pack": pack, "unpack": unpack, "rehearse": rehearse}[args.action](args)


if __name__ == "__main__":
    main()
