"""Installable where users are: setup.cfg declares ranges, the lock files pin inside them, and
``pip install .`` into an environment that already has a torch in range keeps that torch."""

import configparser
import json
import os
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers.runs import PY, REPO

CORE = ("torch", "torchvision", "mlflow", "submitit")


def declared() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [x.strip() for x in cfg["options"]["install_requires"].splitlines()]
    return {r.name.lower(): r for r in (Requirement(x) for x in lines if x and not x.startswith("#"))}


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        if line and not line.startswith("#"):
            package, version = line.split("==")
            out[package.lower()] = Version(version)
    return out


def test_core_libraries_are_ranges_and_the_lock_files_pin_inside_them():
    reqs, exact, lowest = declared(), pins("constraints.txt"), pins("constraints-lowest.txt")
    for name in CORE:
        operators = {s.operator for s in reqs[name].specifier}
        assert operators == {">=", "<"}, f"{name}: {reqs[name]} should be a range with both ends"
        assert exact[name] in reqs[name].specifier, f"constraints.txt pins {name} {exact[name]} outside {reqs[name]}"
        floor = next(Version(s.version) for s in reqs[name].specifier if s.operator == ">=")
        assert lowest[name] == floor, f"constraints-lowest.txt pins {name} {lowest[name]}, the floor is {floor}"
    for name, req in reqs.items():  # every declared dependency is locked, and inside its range
        assert name in exact, f"{name} is not in constraints.txt"
        assert exact[name] in req.specifier, f"constraints.txt pins {name} {exact[name]} outside {req}"


def test_pip_install_keeps_the_torch_that_is_there(tmp_path):
    """What pip would do installing this checkout into the project's environment (torch already in
    range): install simclr-scale and nothing else, least of all another torch."""
    report = tmp_path / "report.json"
    proc = subprocess.run([PY, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet",
                           "--report", str(report), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    to_install = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    assert to_install == ["simclr-scale"], to_install


def test_dali_is_built_for_the_cuda_major_of_the_pinned_torch():
    """Two CUDA runtimes in one process (a CUDA 12 DALI beside a CUDA 13 torch) is untested
    territory: the default DALI matches torch's CUDA major, and both builds are offered as extras."""
    import torch

    cuda_major = torch.version.cuda.split(".")[0]  # the pinned wheels are a CUDA build, even on this CPU
    dali = [name for name in declared() if name.startswith("nvidia-dali-cuda")]
    assert dali == [f"nvidia-dali-cuda{cuda_major}0"], (dali, torch.version.cuda)
    assert f"nvidia-dali-cuda{cuda_major}0" in pins("constraints.txt")
    assert not [p for p in pins("constraints.txt") if p.startswith("nvidia-dali-") and p != dali[0]]
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = cfg["options.extras_require"]
    assert "nvidia-dali-cuda120" in extras["dali-cuda12"] and "nvidia-dali-cuda130" in extras["dali-cuda13"]


@pytest.mark.slow
def test_a_built_wheel_ships_the_recipes_and_runs_outside_the_clone(tmp_path):
    """How clusters install (pip install . / git+URL / a wheel): the wheel carries configs/ and
    cluster_configs/, and the installed simclr finds them by name from a folder outside the clone."""
    import shutil
    import sys
    import sysconfig

    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    source = tmp_path / "source"  # a copy of the clone's files: a build writes build/ beside them
    for rel in [f for f in listed if f and (REPO / f).is_file()]:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, source / rel)
    wheels = tmp_path / "dist"
    build = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("simclr_scale-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies come from the project's environment (a path, not a site folder: its editable
    # install's .pth does not run there), the project itself from the wheel alone
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([PY, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                              "--quiet", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c",
                            "import trainer.runtime.recipes as r; print(r.__file__); print(r.recipe_folders"
                            "('configs')[0]); print(r.recipe_folders('cluster_configs')[0])"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module, configs, clusters = where.stdout.split()
    assert module.startswith(str(site)) and configs.startswith(str(site)) and clusters.startswith(str(site))
    simclr = str(venv / "bin" / "simclr")
    demo = subprocess.run([simclr, "demo", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert demo.returncode == 0 and "--workdir" in demo.stdout, demo.stderr[-3000:]
    (tmp_path / "data").mkdir()
    check = subprocess.run([simclr, "train", "--config", "demo_cpu", "--dry-run", f"data.root={tmp_path / 'data'}"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "config OK (demo_cpu" in check.stdout, check.stderr[-3000:]
    cluster = subprocess.run([str(python), "-c", "from launch.cluster_config import load_cluster_config as l; "
                              "print(l('single_node').partition)"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=120)
    assert cluster.returncode == 0 and cluster.stdout.strip(), cluster.stderr[-3000:]
