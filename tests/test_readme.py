"""README.md is the first screen: short, every link to docs/ live, and every quick-start command
run here on tiny data, so that what a newcomer copies works."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.runs import PY, REPO, python_path, tiny_overrides
from trainer.runtime.distributed import free_port

README = (REPO / "README.md").read_text()
BIN = Path(PY).parent
# what a quick-start command gets on top of its own words here: tiny sizes, and its results out of
# the repository's own benchmarks/results
TINY_TRAIN = ["train.epochs=1", "data.image_size=16", "data.batch_size=16", "model.proj_hidden_dim=32",
              "model.proj_out_dim=16", "train.progress_bar=false"]


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_is_a_first_screen_and_links_every_docs_page():
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\(docs/([\w.-]+\.md)\)", README))
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert linked <= pages, linked - pages
    assert pages - linked <= {"index.md"}, f"docs pages README does not link: {pages - linked}"
    for page in pages:  # and each page leads back
        assert "(../README.md)" in (REPO / "docs" / page).read_text(), page


def test_quick_start_commands_are_the_ones_the_test_runs():
    commands = quick_start_commands()
    assert len(commands) >= 8 and all(c.startswith(".venv/bin/") for c in commands), commands
    gpu = [c for c in commands if c.endswith("# GPU")]
    assert gpu and all("--nproc 8" in c or "cuda" in c or "imagenet" in c for c in gpu)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, photo_data) -> Path:
    """What ``make demo`` leaves in the working folder, at tiny sizes: demo_data/ and runs/demo/."""
    folder = tmp_path_factory.mktemp("newcomer")
    shutil.copytree(photo_data / "train", folder / "demo_data" / "train")
    shutil.copytree(photo_data / "val", folder / "demo_data" / "val")
    proc = subprocess.run([PY, "-m", "launch", "train", *tiny_overrides(folder / "demo_data" / "train",
                           folder / "runs" / "demo", **{"train.epochs": 1, "checkpoint.every_steps": 100})],
                          cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def run_line(line: str, folder: Path, extra: list[str]) -> subprocess.CompletedProcess:
    command = line.replace(".venv/bin/", f"{BIN}/") + " " + " ".join(extra)
    return subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path()})


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(quick_start_commands())))
def test_each_quick_start_command_runs(index, demo_folder, tmp_path):
    line = quick_start_commands()[index]
    if line.endswith("# GPU"):
        pytest.skip("needs a GPU (README says so)")
    words = line.split()
    verb = words[1] if words[0].endswith("simclr") else words[0]
    extra: list[str] = []
    if words[0].endswith("mlflow"):
        port = free_port()
        proc = subprocess.Popen(["bash", "-c", line.replace(".venv/bin/", f"{BIN}/").split("#")[0]
                                 + f" --port {port}"], cwd=demo_folder, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 90
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
                        assert page.status == 200
                    break
                except OSError:
                    assert time.time() < deadline and proc.poll() is None, "mlflow ui did not answer"
                    time.sleep(1)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        return
    if verb == "submit" and shutil.which("srun") is None and not os.environ.get("SIMCLR_REQUIRE_SLURM"):
        pytest.skip("submitit needs SLURM's srun to write a script (CI installs it)")
    if words[1] == "train":
        extra = [*TINY_TRAIN, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    elif words[1] == "bench":
        extra = ["--out", str(tmp_path / "bench.json")]
        if words[2:3] == ["startup"]:
            extra += ["--work", str(tmp_path / "startup")]
    elif words[1] == "eval":
        extra = ["--probe-epochs", "5", "--out", str(tmp_path / "eval")]
    elif words[1] == "embed":
        extra = ["--overwrite"]
    proc = run_line(line, demo_folder, extra)
    assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-3000:])
    if words[1:3] == ["bench", "startup"]:  # its JSON: a first start and a restart, the listings compared
        import json

        result = json.loads((tmp_path / "bench.json").read_text())
        (row,) = result["rows"]
        assert row["first_s"] > 0 and row["restart_s"] > 0 and row["first_calls"] is None  # --no-strace
        assert list((tmp_path / "startup").glob("run_200_1/tree_index-*.bin"))  # the run folder kept the listing
        assert set(result["listing"]["200"]) >= {"ours_s", "torchvision_make_dataset_s", "eval_indexed_s"}


# a quoted result: three decimals (accuracies, calls per file), outside `code`
QUOTED = re.compile(r"(?<![\d.])\d+\.\d{3}(?![\d])")
SOURCE = re.compile(r"<!-- figures: (.+?) -->")


def figures_without_a_source(text: str, results: Path) -> list[str]:
    """Every three-decimal figure of ``text`` must sit in a block (a table or a paragraph) under a
    ``<!-- figures: FILE.json ... -->`` line and equal, rounded, a number in one of those files."""
    problems, sources = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if (marker := SOURCE.search(line)):
            sources = []
            for name in marker.group(1).split():
                if not (results / name).is_file():
                    problems.append(f"line {n}: {name} is not in {results}")
                    continue
                sources.extend(numbers_in(json.loads((results / name).read_text())))
            continue
        if not line.strip():
            sources = None
            continue
        for figure in QUOTED.findall(re.sub(r"`[^`]*`", "", line)):
            if sources is None:
                problems.append(f"line {n}: {figure} has no <!-- figures: ... --> source above its block")
            elif not any(round(v, 3) == float(figure) for v in sources):
                problems.append(f"line {n}: {figure} is in none of its files")
    return problems


def numbers_in(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers_in(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers_in(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_every_quoted_figure_comes_from_a_results_file(tmp_path):
    results = REPO / "benchmarks" / "results"
    problems = {page.relative_to(REPO).as_posix(): figures_without_a_source(page.read_text(), results)
                for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
    assert {page: p for page, p in problems.items() if p} == {}
    (tmp_path / "run.json").write_text(json.dumps({"rows": {"SimCLR": {"linear_top1": 0.6125}}}))
    assert figures_without_a_source("<!-- figures: run.json -->\n| SimCLR | 0.613 |\n", tmp_path) == []
    assert figures_without_a_source("<!-- figures: run.json -->\n| SimCLR | 0.650 |\n", tmp_path) == [
        "line 2: 0.650 is in none of its files"]
    assert figures_without_a_source("<!-- figures: run.json -->\n| a | 0.613 |\n\n| b | 0.613 |\n", tmp_path) == [
        "line 4: 0.613 has no <!-- figures: ... --> source above its block"]
    assert figures_without_a_source("<!-- figures: gone.json -->\n", tmp_path) == [
        f"line 1: gone.json is not in {tmp_path}"]
