"""``simclr embed``: the frozen encoder's features of every sample of a dataset, written to disk in
dataset order, for retrieval, clustering, de-duplication and downstream models.

``OUT/embeddings.npy`` is one N x d array (float16 or float32; readers memory-map it) that rank 0
creates and every rank fills with its own rows, each chunk written whole at its byte offset
(``os.pwrite``, not a shared writable memory map), so nothing is gathered on one rank and
ImageNet's 1.28M x 2048 needs no more memory than a chunk. Chunk k goes to rank k % world; each
finished chunk is appended to ``progress.rank<R>`` once its rows are on disk, so a stopped run
started again (on any number of ranks) computes only the chunks no progress file names. A chunk's
rows are always batched the same way, so 1 and K ranks write the same bytes. Beside it:
``index.csv`` (row, sample, label, class) and ``meta.json`` (checkpoint and its sha256, arch, head
layers, data, dtype, commit, complete).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline import IndexStore, build_eval_batches, open_source
from data_pipeline.file_checks import find_corrupt_images
from data_pipeline.sources import SKIP_CORRUPT_HINT, DataError, bad_files_line
from foundation.atomic_files import atomic_path
from foundation.collectives import barrier, broadcast_object, on_rank_zero
from trainer.evaluation.encoder_loading import load_encoder
from trainer.runtime.dataclass_yaml import ConfigError
from trainer.runtime.run_files import atomic_write_text
from trainer.state.checkpoint import CheckpointError
from trainer.tracking import git_commit

CHUNK_ROWS = 8192


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _barrier() -> None:
    barrier()


def _done_chunks(out: Path) -> set[int]:
    done: set[int] = set()
    for progress in out.glob("progress.rank*"):
        # only whole lines: the last piece, after the last newline, is empty or was cut short by a kill
        for line in progress.read_text().split("\n")[:-1]:
            if line.isdigit():
                done.add(int(line))
    return done


# what each key of meta.json is, in the words of the command line (a refusal names what differs)
MEANING = {"checkpoint_sha256": "--checkpoint", "head_layers": "--head-layers", "data": "--data",
           "split": "--split", "dtype": "--dtype", "samples": "images", "chunk_rows": "--chunk-rows", "dim": "width"}


def check_out_folder(out: Path) -> None:
    """--out names a folder this user can write (or create): a file there, or a read-only disk, is
    one line now rather than a traceback after the model is loaded."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for embeddings.npy, index.csv and meta.json")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: {existing} is not writable by this user (or is on a "
                          "read-only disk); choose a folder you can write")


def check_images(source, skip_corrupt: bool) -> list[int]:
    """The dataset's files, checked once before any chunk (as a training run does at start): every
    bad file named, with a fix this command takes; with ``skip_corrupt`` their indices, which get no
    row. The verdicts are kept with the listing in --out."""
    checks = source.file_checks()
    if checks is None:
        return []
    pending = checks.pending()
    found = find_corrupt_images([source.sample_name(i) for i in pending])
    by_name = {source.sample_name(i): i for i in pending}
    fresh = {by_name[str(p)]: why for p, why in found.items()}
    checks.record(pending, fresh)
    bad = {**checks.known_bad(), **fresh}
    if bad and not skip_corrupt:
        raise DataError(f"{bad_files_line(source, bad)}; {EMBED_FIX}, or pass --skip-corrupt to embed the others "
                        "(meta.json lists what was skipped)")
    return sorted(bad)


EMBED_FIX = "remove or replace them, then run the same command again (finished chunks are kept)"


def _prepare(out: Path, meta: dict, overwrite: bool, rank: int) -> None:
    """Rank 0: a new output folder, the same run's folder to continue, or a refusal naming the clash."""
    if rank != 0:
        return
    old_meta = out / "meta.json"
    if old_meta.exists():
        try:
            old = json.loads(old_meta.read_text())
        except ValueError:
            old = {}
        shown = {"checkpoint_sha256": "checkpoint"}  # a digest says less than the file it came from
        differs = [f"{said} {old.get(shown.get(key, key), '?')} there, {meta[shown.get(key, key)]} now"
                   for key, said in MEANING.items() if old.get(key) != meta[key]]
        same = not differs
        if not same and not overwrite:
            raise ConfigError(f"{out} already holds other embeddings ({'; '.join(differs)}); choose another --out, "
                              "or pass --overwrite to replace them")
        if same:
            return
    elif (out / "embeddings.npy").exists() and not overwrite:
        raise ConfigError(f"{out} holds an embeddings.npy without its meta.json; choose another --out, or pass "
                          "--overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("progress.rank*"), out / "embeddings.npy", out / "index.csv"]:
        stale.unlink(missing_ok=True)
    np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=meta["dtype"],
                              shape=(meta["samples"], meta["dim"])).flush()
    atomic_write_text(out / "meta.json", json.dumps({**meta, "complete": False}, indent=2))


def embed(checkpoint: str, data: str, out: str, split: str = "", head_layers: int = 0, dtype: str = "float16",
          batch_size: int = 256, overwrite: bool = False, device: torch.device | None = None, rank: int = 0,
          world_size: int = 1, chunk_rows: int = CHUNK_ROWS, workers: int = 2, skip_corrupt: bool = False) -> dict:
    """Embed every sample of ``data`` with the encoder of ``checkpoint`` into ``out`` (this rank's share);
    with ``skip_corrupt`` the samples whose files are damaged get no row (``meta.json``'s ``skipped``)."""
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype {dtype}: use float16 or float32")
    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass a step_N.pt from a run's checkpoints/ "
                              "or an exported encoder.pt")
    check_out_folder(Path(out))
    device = device or torch.device("cpu")
    encoder, cfg = load_encoder(checkpoint, head_layers)
    encoder.eval().to(device)
    data_cfg = dataclasses.replace(cfg.data, num_workers=workers)
    store = IndexStore(Path(out), rank, world_size)
    source = open_source(data, split, cfg.data.labels, store)
    # a refusal on rank 0 ends every rank with its line
    skipped = broadcast_object(on_rank_zero(lambda: check_images(source, skip_corrupt), (DataError,)))
    samples = np.setdiff1d(np.arange(len(source)), np.asarray(skipped, dtype=np.int64))  # row r holds samples[r]
    n = len(samples)
    side = cfg.data.image_size
    with torch.no_grad():  # the feature width (eval mode: batch norm does not look at the batch)
        dim = int(encoder(torch.zeros(1, 3, side, side, device=device)).reshape(1, -1).shape[1])
    out_dir = Path(out)
    meta = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(Path(checkpoint)),
            "arch": cfg.model.arch, "head_layers": head_layers, "data": str(Path(data).resolve()), "split": split,
            "samples": n, "dim": dim, "dtype": dtype, "chunk_rows": chunk_rows, "image_size": cfg.data.image_size,
            "commit": git_commit(), "skipped": [source.sample_name(i) for i in skipped]}
    on_rank_zero(lambda: _prepare(out_dir, meta, overwrite, rank), (ConfigError,))
    done = _done_chunks(out_dir)
    chunks = [k for k in range(-(-n // chunk_rows)) if k not in done]
    mine = chunks[rank::world_size]
    array = np.lib.format.open_memmap(out_dir / "embeddings.npy", mode="r")
    offset, row_bytes = array.offset, dim * array.dtype.itemsize
    del array
    fd = os.open(out_dir / "embeddings.npy", os.O_WRONLY)
    try:
        with open(out_dir / f"progress.rank{rank}", "a") as progress, torch.no_grad():
            for k in mine:
                start, stop = k * chunk_rows, min(n, (k + 1) * chunk_rows)
                block = _embed_rows(encoder, source, data_cfg, samples[start:stop], device, batch_size, dim, dtype)
                os.pwrite(fd, block.tobytes(), offset + start * row_bytes)
                os.fsync(fd)  # the rows are on disk before the progress line says so
                progress.write(f"{k}\n")
                progress.flush()
                os.fsync(progress.fileno())
    finally:
        os.close(fd)
    _barrier()
    summary = {"samples": n, "skipped": len(skipped), "dim": dim, "chunks": -(-n // chunk_rows),
               "already_done": len(done), "computed_here": len(mine), "out": str(out_dir)}
    if rank == 0:
        _write_index(out_dir / "index.csv", source, samples)
        atomic_write_text(out_dir / "meta.json", json.dumps({**meta, "complete": True}, indent=2))
    return summary


def _embed_rows(encoder: torch.nn.Module, source: Any, data_cfg: Any, rows: np.ndarray, device: torch.device,
                batch_size: int, dim: int, dtype: str) -> np.ndarray:
    """The features of samples ``rows``, in their order (the layout reads them in its own)."""
    order = source.reading_order(rows)
    try:
        got = [encoder(images.to(device)).reshape(len(images), -1).float().cpu().numpy()
               for images, _ in build_eval_batches(data_cfg, source, device, batch_size, order.tolist())]
    except DataError as exc:  # a file that passed the check but does not decode
        raise DataError(str(exc).replace(SKIP_CORRUPT_HINT, "").rstrip(", ") + f"; {EMBED_FIX}") from None
    block = np.empty((len(rows), dim), dtype=dtype)
    block[np.searchsorted(rows, order)] = np.concatenate(got)
    return block


def _write_index(path: Path, source: Any, samples: np.ndarray) -> None:
    """``index.csv``: each row's sample, label and class, written whole."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "sample", "label", "class"])
        labels = np.asarray(source.labels)
        for row, i in enumerate(samples):
            label = int(labels[i])
            writer.writerow([row, source.sample_name(i), label,
                             source.classes[label] if 0 <= label < len(source.classes) else ""])
