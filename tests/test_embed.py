"""``simclr embed``: every sample's features in dataset order, the same bytes on 1 and 2 ranks, a
restart that computes only what is missing, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.runs import assert_one_line_error, simclr
from trainer.evaluation.encoder_loading import load_encoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, photo_data) -> Path:
    run = tmp_path_factory.mktemp("embed_run") / "run"
    proc = simclr("train", "--config", "demo_cpu", f"data.root={photo_data / 'train'}", f"train.run_dir={run}",
                  "train.epochs=1", "data.image_size=16", "data.batch_size=16", "tracking.enabled=false",
                  "train.progress_bar=false", "model.arch=resnet18")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def embed(*args: str, nproc: int = 1):
    return simclr("embed", "--dtype", "float32", "--chunk-rows", "16", "--nproc", str(nproc), *args)


@pytest.mark.slow
def test_embeddings_are_the_encoders_features_in_dataset_order_on_one_and_two_ranks(trained, photo_data, tmp_path):
    from trainer.evaluation.embed import embed as embed_dataset

    one, two = tmp_path / "one", tmp_path / "two"
    embed_dataset(str(trained / "encoder.pt"), str(photo_data / "train"), str(one), dtype="float32", chunk_rows=16)
    proc = embed("--checkpoint", str(trained / "encoder.pt"), "--data", str(photo_data / "train"), "--out", str(two),
                 nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded 80 samples x 512 (float32)" in proc.stdout
    a, b = np.load(one / "embeddings.npy", mmap_mode="r"), np.load(two / "embeddings.npy", mmap_mode="r")
    assert a.shape == (80, 512) and a.dtype == np.float32 and np.array_equal(a, b)  # bitwise, 1 vs 2 ranks
    rows = list(csv.DictReader(open(one / "index.csv")))
    assert [int(r["row"]) for r in rows] == list(range(80))
    # the features are the frozen encoder's, in dataset order: recompute a few rows directly
    from data_pipeline import build_eval_batches, open_source

    encoder, cfg = load_encoder(trained / "encoder.pt")
    encoder.eval()
    source = open_source(photo_data / "train")
    pick = [0, 37, 79]
    images, labels = next(iter(build_eval_batches(cfg.data, source, torch.device("cpu"), 3, pick)))
    with torch.no_grad():
        want = encoder(images).numpy()
    assert np.allclose(a[pick], want, atol=1e-5)
    for i, label in zip(pick, labels.tolist()):
        assert rows[i]["sample"] == source.sample_name(i) and int(rows[i]["label"]) == label
        assert rows[i]["class"] == source.classes[label]
    meta = json.loads((one / "meta.json").read_text())
    assert meta["complete"] is True and meta["arch"] == "resnet18" and meta["samples"] == 80 and meta["dim"] == 512
    assert meta["head_layers"] == 0 and len(meta["checkpoint_sha256"]) == 64 and meta["commit"]


@pytest.mark.slow
def test_a_stopped_embed_finishes_without_redoing_finished_chunks(trained, photo_data, tmp_path):
    from trainer.evaluation.embed import embed as embed_dataset

    out = tmp_path / "out"
    args = ("--checkpoint", str(trained / "encoder.pt"), "--data", str(photo_data / "train"), "--out", str(out))
    embed_dataset(str(trained / "encoder.pt"), str(photo_data / "train"), str(out), dtype="float32", chunk_rows=16)
    full = np.load(out / "embeddings.npy").copy()
    # what a run stopped after two of its five chunks leaves: two progress lines (one cut short by
    # the kill), the other rows never written, meta.json not complete
    (out / "progress.rank0").write_text("0\n1\n4")
    rows = np.lib.format.open_memmap(out / "embeddings.npy", mode="r+")
    rows[32:] = 0
    rows.flush()
    del rows
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    again = embed(*args, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(2 of 5 chunks were already done)" in again.stdout
    assert np.array_equal(np.load(out / "embeddings.npy"), full)
    assert json.loads((out / "meta.json").read_text())["complete"] is True


def test_bad_input_is_one_line(trained, photo_data, tmp_path, capsys):
    """In this process (the command line's own main): each mistake is one line, exit 2, nothing lost."""
    import subprocess

    from launch.cli import main

    def simclr_embed(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main(["embed", "--dtype", "float32", "--chunk-rows", "16", "--workers", "0", *args])
            code = 0
        except SystemExit as stop:
            code = stop.code
        said = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, said.out, said.err)

    args = ("--data", str(photo_data / "train"), "--out", str(tmp_path / "out"))
    assert_one_line_error(simclr_embed("--checkpoint", str(tmp_path / "nope.pt"), *args), "nope.pt", "does not exist")
    assert_one_line_error(simclr_embed("--checkpoint", str(trained / "encoder.pt"), "--data", str(tmp_path / "missing"),
                                       "--out", str(tmp_path / "o2")), "missing", "does not exist")
    assert simclr_embed("--checkpoint", str(trained / "encoder.pt"), *args).returncode == 0
    step = sorted((trained / "checkpoints").glob("step_*.pt"))[-1]
    clash = simclr_embed("--checkpoint", str(step), *args)  # another file (another checkpoint) into the same folder
    assert_one_line_error(clash, "already holds other embeddings", f"--checkpoint {(trained / 'encoder.pt').resolve()}"
                          f" there, {step.resolve()} now", "--overwrite")
    assert np.load(tmp_path / "out" / "embeddings.npy").shape == (80, 512)  # nothing lost
    head = simclr_embed("--checkpoint", str(step), "--head-layers", "1", *args[:-1], str(tmp_path / "h"))
    assert head.returncode == 0, head.stderr[-3000:]
    other_head = simclr_embed("--checkpoint", str(step), "--head-layers", "2", *args[:-1], str(tmp_path / "h"))
    assert_one_line_error(other_head, "--head-layers 1 there, 2 now")  # it named the same checkpoint twice
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert_one_line_error(simclr_embed("--checkpoint", str(step), *args[:-1], str(out)), f"--out {out}")
    assert_one_line_error(simclr_embed("--checkpoint", str(trained), *args), f"{trained} is a folder")
    bad_tree = tmp_path / "bad_tree"
    shutil.copytree(photo_data / "train", bad_tree)
    victims = sorted(bad_tree.rglob("*.jpg"))[5:7]
    victims[0].write_bytes(victims[0].read_bytes()[:300])  # truncated
    victims[1].write_text("not an image")
    corrupt = simclr_embed("--checkpoint", str(step), "--data", str(bad_tree), "--out", str(tmp_path / "c"))
    # round 7, E9: only the first of two was named, and nothing let the others be embedded
    assert_one_line_error(corrupt, "cannot decode 2 images", f"{victims[0]} (truncated JPEG",
                          f"{victims[1]} (not a JPEG", "run the same command again", "--skip-corrupt")
    assert "skip_corrupt" not in corrupt.stderr and not (tmp_path / "c" / "embeddings.npy").exists()
    skipped = simclr_embed("--checkpoint", str(step), "--data", str(bad_tree), "--out", str(tmp_path / "c"),
                           "--skip-corrupt")
    assert skipped.returncode == 0 and "skipped 2 damaged file(s)" in skipped.stderr, skipped.stderr
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["skipped"] == [str(v) for v in victims] and meta["samples"] == 78 and meta["complete"]
    kept = np.load(tmp_path / "c" / "embeddings.npy")
    with open(tmp_path / "c" / "index.csv") as f:
        index = list(csv.DictReader(f))
    assert kept.shape == (78, 512) and len(index) == 78 and not {str(v) for v in victims} & {r["sample"] for r in index}
    replaced = simclr_embed("--checkpoint", str(step), "--overwrite", *args)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["checkpoint"] == str(step.resolve())
    whole = np.load(tmp_path / "out" / "embeddings.npy")
    with open(tmp_path / "out" / "index.csv") as f:
        row_of = {Path(r["sample"]).relative_to(photo_data / "train"): int(r["row"]) for r in csv.DictReader(f)}
    same = [row_of[Path(r["sample"]).relative_to(bad_tree)] for r in index]
    np.testing.assert_allclose(kept, whole[same], rtol=1e-4, atol=1e-4)  # the others' rows, as without damage


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_stopped_embed_says_so_and_how_to_go_on(photo_data, tmp_path, capsys, monkeypatch, how):
    """A signal mid-embedding (here from inside the work, so it always lands mid-run) is one line that
    names it and gives the command that goes on; not the training's 'nothing was trained'."""
    import os
    import signal
    import time

    import trainer.evaluation.embed
    from launch.cli import main
    from trainer import STOPPED_AT_START

    def interrupted(*_args, **_kwargs):
        if how == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler stops it at once
        raise AssertionError("SIGTERM did not stop the embedding")

    monkeypatch.setattr(trainer.evaluation.embed, "embed", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["embed", "--checkpoint", "enc.pt", "--data", str(photo_data / "train"), "--out", str(out)])
    assert stop.value.code == 128 + signal.Signals[how]
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("[simclr]")]
    assert line.startswith(f"[simclr] warning: {how}: embedding stopped; the finished chunks are kept in {out}")
    assert f"Run again to go on: simclr embed --checkpoint enc.pt --data {photo_data / 'train'}" in line
    assert STOPPED_AT_START not in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before  # handlers given back


@pytest.mark.parametrize("layout", ["npz", "shards"])
def test_every_layout_embeds_in_dataset_order(trained, photo_data, tmp_path, layout):
    """Arrays and tar shards too (shards are read in their stored order; rows still land at their
    sample's place)."""
    from data_pipeline import build_eval_batches, open_source
    from data_pipeline.shards import make_shards
    from trainer.evaluation.embed import embed as embed_dataset

    data = photo_data / "train.npz"
    if layout == "shards":
        data = tmp_path / "shards"
        make_shards(open_source(photo_data / "train"), data, 16)
    done = embed_dataset(str(trained / "encoder.pt"), str(data), str(tmp_path / "out"), dtype="float32",
                         chunk_rows=24, workers=0)
    rows = np.load(tmp_path / "out" / "embeddings.npy")
    assert done["samples"] == len(rows) == 80
    encoder, cfg = load_encoder(trained / "encoder.pt")
    encoder.eval()
    source = open_source(data)
    pick = [3, 41, 77]
    got = {}
    for i in pick:  # one at a time: each sample's own features, wherever the layout keeps it
        images, _ = next(iter(build_eval_batches(cfg.data, source, torch.device("cpu"), 1, [i])))
        with torch.no_grad():
            got[i] = encoder(images).numpy()[0]
    for i in pick:
        assert np.allclose(rows[i], got[i], atol=1e-4), i
    index = list(csv.DictReader(open(tmp_path / "out" / "index.csv")))
    assert [r["sample"] for r in index[:2]] == [source.sample_name(0), source.sample_name(1)]
