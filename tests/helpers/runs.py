"""What the tests share besides fixtures: the tiny run's overrides, one way to run the ``simclr``
command line, damaged copies of the photo set, and how to read a run's newest checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainer.runtime.distributed import torchrun_command
from trainer.state import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent.parent
PY = sys.executable


_STORE_TEMPLATE: list[Path] = []


def seed_mlflow_store(db: Path) -> None:
    """A new sqlite MLflow store at ``db``, copied from one made once per test process: making a
    store runs MLflow's schema migrations (2 s), which most tests would otherwise pay once each.
    Only the schema is copied (no experiment). Where MLflow is absent (the GPU machine), nothing."""
    if db.exists():
        return
    if not _STORE_TEMPLATE:
        import tempfile

        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            return
        import atexit
        import shutil

        folder = tempfile.mkdtemp(prefix="simclr_store_template_")
        atexit.register(shutil.rmtree, folder, True)
        template = Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()
        _STORE_TEMPLATE.append(template)
    import shutil

    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], db)


def tiny_overrides(data_root: Path, run_dir: Path, **extra) -> list[str]:
    """A run that trains in seconds on the CPU, tracked in ``run_dir``'s sibling mlflow.db (seeded
    with MLflow's schema, unless ``tracking.uri`` is given)."""
    if "tracking.uri" not in extra:
        seed_mlflow_store(run_dir.parent / "mlflow.db")
    # timm's test ResNet (0.4M parameters): a torchvision ResNet-18 here cost 130 ms a step of 8 small
    # images, a 44 MB all-reduce a step and 90 MB a checkpoint; the tests that are about a torchvision
    # encoder or its CIFAR stem name one
    base = {
        "model.arch": "timm/test_resnet", "model.cifar_stem": "false", "model.proj_hidden_dim": 32,
        "model.proj_out_dim": 16,
        "data.root": str(data_root), "data.backend": "torchvision", "data.image_size": 16, "data.batch_size": 8,
        "data.num_workers": 0, "data.augment.blur_prob": 0.5,
        "optim.lr": 0.5, "optim.warmup_epochs": 1, "loss.temperature": 0.2,
        "train.epochs": 2, "train.device": "cpu", "train.run_dir": str(run_dir), "train.log_every": 2,
        "train.progress_bar": "false", "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
        "tracking.uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}",
        # each costs seconds per run; test_tracking turns them on where they are the subject
        "tracking.log_model": "false", "tracking.system_metrics": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def simclr(*args: str, cwd: Path = REPO, timeout: float = 300,
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``simclr ARGS`` (``python -m launch``) as a user runs it, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([PY, "-m", "launch", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: exit 2, no traceback, one ``simclr: error:`` line holding every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("simclr: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def checkpoint_run_id(state: dict) -> str | None:
    """The MLflow run a loaded checkpoint continues (its tracking state is the tracker's own)."""
    from trainer.tracking import Tracker

    return Tracker.run_id_in(ckpt.tracking_state(state))


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint of a run folder, loaded."""
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for va, vb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(va["momentum_buffer"], vb["momentum_buffer"])


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header chunk claiming ``width`` x ``height`` (a decompression bomb's
    start: a decoder allocates for the claimed size), then its end chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def animated_webp() -> bytes:
    """A real two-frame animated WebP (Pillow writes it): torchvision refused it mid-run, DALI trained on it."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "WEBP", save_all=True, append_images=[Image.new("RGB", (8, 8), "blue")],
                                         duration=100)
    return buf.getvalue()


# the broken files users have: an empty file, a JPEG cut short (an interrupted copy), something else,
# a small file that decodes to gigabytes (20000 x 20000: 1.2 GB), and an animation
BAD_FILES = {"zero_byte": b"", "truncated_jpeg": b"\xff\xd8\xff\xe0 truncated garbage",
             "not_an_image": b"%PDF-1.4 this is not an image", "decompression_bomb": png_header(20000, 20000),
             "animated_webp": animated_webp()}


def corrupt_copy(photo_data: Path, tmp_path: Path, class_name: str, index: int, junk: bytes) -> tuple[Path, Path]:
    """A copy of the training tree in which one image is replaced by ``junk`` bytes."""
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    bad = sorted((root / class_name).iterdir())[index]
    bad.write_bytes(junk)
    return root, bad


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH already holds (the GPU proof's rehearsal puts
    an import blocker there, which the ranks must keep)."""
    return os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240, env_extra: dict | None = None):
    """Run ``tests/helpers/<script>`` under real torchrun (gloo, CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path(), **(env_extra or {})}
    cmd = torchrun_command(nproc, [str(REPO / "tests" / "helpers" / script), *args])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_status(uri: str, run_id: str) -> str:
    """The MLflow run's status (RUNNING, FINISHED, KILLED, FAILED)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.status


def start_training(photo_data: Path, run_dir: Path, *launcher: str, **over) -> subprocess.Popen:
    overrides = tiny_overrides(photo_data / "train", run_dir, **{"train.epochs": 200, "checkpoint.every_steps": 1000,
                                                                "train.log_every": 1, **over})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([PY, "-m", *launcher, *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int = 3, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.3)
