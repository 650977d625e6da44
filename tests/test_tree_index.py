"""The image tree is listed once per job (``data_pipeline.tree_index``): the same samples as a plain
``sorted(rglob)`` listing, a restart that lists only the folders that changed and says what changed,
and ranks other than 0 that never walk the tree."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from data_pipeline import IndexStore
from data_pipeline.image_files import list_image_files
from data_pipeline.sources import IMAGE_EXTENSIONS
from data_pipeline.tree_index import TreeIndex
from tests.helpers.runs import run_torchrun

CPU = torch.device("cpu")


def reference_listing(root: Path, labels: str) -> tuple[list[Path], list[int], list[str]]:
    """What the listing was before the index: ``sorted(rglob)`` per class folder (or of the whole
    tree), a stat per file; the index must give exactly this."""
    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))

    if labels == "none":
        files = images(root)
        return files, [-1] * len(files), []
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, label_list = [], []
    for label, d in enumerate(classes):
        found = images(d)
        paths += found
        label_list += [label] * len(found)
    return paths, label_list, [d.name for d in classes]


def tricky_tree(root: Path, photo: bytes) -> Path:
    """Nesting, names whose string order differs from their parts' order, hidden entries, other
    files, upper-case suffixes, linked folders (followed as classes, not below), a non-UTF-8 name."""
    layout = ["a/x.jpg", "a/b/y.jpg", "a/b.jpg", "a/b-c.jpg", "a/b/c/z.PNG", "a/.hidden.jpg", "a/.cache/q.jpg",
              "a/notes.txt", "a/noext", "b/1.JPEG", "b/10.jpg", "b/2.jpg", "b/sub.d/3.webp", "c/deep/er/st.bmp",
              "c/a.jpg", "other/b/x.jpg"]
    for rel in layout:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(photo)
    (root / ".git").mkdir()
    (root / ".git" / "x.jpg").write_bytes(photo)
    os.symlink(root / "other", root / "linked_class")  # a class folder that is a link: followed
    os.symlink(root / "b", root / "a" / "linked_sub")  # below a class: not descended into (rglob's rule)
    odd = os.fsdecode(b"caf\xe9.jpg")  # not UTF-8
    (root / "c" / odd).write_bytes(photo)
    return root


@pytest.mark.parametrize("labels", ["folders", "none"])
def test_listing_equals_sorted_rglob(tmp_path, photo_data, labels):
    photo = next((photo_data / "train" / "coffee").iterdir()).read_bytes()
    root = tricky_tree(tmp_path / "tree", photo)
    want_paths, want_labels, want_classes = reference_listing(root, labels)
    for store in (None, IndexStore(tmp_path / "run"), IndexStore(tmp_path / "run")):  # fresh, kept, reused
        source = list_image_files(root, labels, store)
        assert source.paths == want_paths and source.labels.tolist() == want_labels
        assert source.classes == want_classes
    assert len(want_paths) > 10


def test_photo_tree_equals_sorted_rglob(photo_data):
    source = list_image_files(photo_data / "train")
    paths, labels, classes = reference_listing(photo_data / "train", "folders")
    assert source.paths == paths and source.labels.tolist() == labels and source.classes == classes


def test_restart_lists_only_changed_folders_and_says_what_changed(tmp_path, photo_data, capsys, monkeypatch):
    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    store = IndexStore(tmp_path / "run")
    list_image_files(root, "auto", store)
    index_file = store.path_for(root)
    assert index_file.is_file() and index_file.stat().st_size < 6000  # names by folder, not JSON of full paths
    index = TreeIndex.from_bytes(index_file.read_bytes(), root)
    index.written_ns += 10**12  # as if written long after the folders last changed (no racy folders)
    index_file.write_bytes(index.to_bytes())

    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scanned.append(str(p)) or real_scandir(p))
    same = list_image_files(root, "auto", store)
    assert scanned == [] and "changed" not in capsys.readouterr().out  # an unchanged tree: no folder listed

    (root / "coffee" / next(iter(sorted((root / "coffee").iterdir()))).name).rename(root / "coffee" / "renamed.jpg")
    (root / "rocket" / sorted((root / "rocket").iterdir())[0].name).unlink()
    shutil.copy(sorted((root / "chelsea").iterdir())[0], root / "chelsea" / "zz_added.jpg")
    (root / "zebra").mkdir()  # a new class
    shutil.copy(sorted((root / "chelsea").iterdir())[0], root / "zebra" / "z.jpg")
    changed = list_image_files(root, "auto", store)
    out = capsys.readouterr().out
    assert "3 image(s) added, 2 removed" in out and "coffee/" in out and "zebra/" in out
    assert "reads the new list" not in out  # whether a resume may go on is the checkpoint's to say (refused by default)
    assert sorted(scanned) == sorted([str(root), *(str(root / d) for d in ("coffee", "rocket", "chelsea", "zebra"))])
    fresh = list_image_files(root, "auto", None)
    assert changed.paths == fresh.paths and changed.classes == fresh.classes == same.classes + ["zebra"]
    assert changed.labels.tolist() == fresh.labels.tolist()


def test_a_damaged_index_costs_a_listing_only(tmp_path, photo_data):
    store = IndexStore(tmp_path / "run")
    first = list_image_files(photo_data / "train", "auto", store)
    store.path_for(photo_data / "train").write_bytes(b"SIMCLR-TREE-INDEX 1\n{not json")
    again = list_image_files(photo_data / "train", "auto", store)
    assert again.paths == first.paths


@pytest.mark.slow
def test_only_rank_0_walks_the_tree(tmp_path, photo_data):
    """2 gloo ranks build the loader (listing and file check) with the run folder's index: rank 1
    lists no folder and stats no file of the tree; the index reaches it over the process group."""
    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    out = tmp_path / "calls"
    proc = run_torchrun("count_tree_calls.py", str(root), str(tmp_path / "run"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["samples"] == ranks[1]["samples"] == 80 and ranks[0]["classes"] == ranks[1]["classes"]
    assert ranks[0]["scandir"] >= 11  # the root and its 10 class folders
    assert ranks[1]["scandir"] == 0 and ranks[1]["listdir"] == 0
    inside = [p for p in ranks[1]["stat"] if p != str(root) and Path(p).parent != root]
    assert inside == [], inside  # only the root and the layout probes beside it (O(1), whatever the tree)
    assert not any(Path(p).parent == root and (root / Path(p).name).is_dir() for p in ranks[1]["stat"])
    assert ranks[0]["checked"] + ranks[1]["checked"] == 80 and ranks[1]["checked"] > 0  # the check split over ranks



def _damaged_copies(good: bytes) -> dict[str, bytes]:
    """The kept index damaged as disks and people damage files."""
    head_end = good.index(b"\n", len(b"SIMCLR-TREE-INDEX 2\n")) + 1
    body = good[head_end:]
    cut_in_last_name = len(good) - 3  # every folder still parses: only the checksum can tell
    swapped = good[:head_end] + body.replace(b"coffee", b"coffeX", 1)  # a valid header over a wrong body
    return {"cut at 60%": good[: len(good) * 6 // 10], "cut at 20%": good[: len(good) // 5],
            "cut in the last name": good[:cut_in_last_name], "header only": good[:head_end],
            "random bytes": os.urandom(3000), "empty": b"", "header a JSON list": b"SIMCLR-TREE-INDEX 2\n[1,2]\n",
            "header not JSON": b"SIMCLR-TREE-INDEX 2\n{oops\n" + body, "valid header, wrong body": swapped,
            "version 1": b"SIMCLR-TREE-INDEX 1\n" + good[len(b"SIMCLR-TREE-INDEX 2\n"):]}


def test_a_damaged_kept_index_is_listed_again_with_one_note(tmp_path, photo_data, capsys):
    """A kept index that is cut, garbage, or a valid header over a wrong body is never used in part
    (it would drop images or crash the resume): the tree is listed again, with one note, and the
    index is rewritten whole."""
    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    store = IndexStore(tmp_path / "run")
    want = list_image_files(root, "auto", store)
    index_file = store.path_for(root)
    good = index_file.read_bytes()
    capsys.readouterr()
    for case, damaged in _damaged_copies(good).items():
        assert damaged != good, case
        index_file.write_bytes(damaged)
        got = list_image_files(root, "auto", store)
        out = capsys.readouterr().out
        assert got.paths == want.paths and got.labels.tolist() == want.labels.tolist(), case
        assert got.classes == want.classes, case
        assert out.count("the kept listing") == 1 and "is damaged" in out and "listing" in out, (case, out)
        assert TreeIndex.from_bytes(index_file.read_bytes(), root).walk() == TreeIndex.scan(root).walk(), case


def test_images_of_formats_not_read_are_counted_and_a_link_back_to_the_root_is_refused(tmp_path, photo_data, capsys):
    """An animated GIF was silently not listed; a link at the root pointing to the root became an
    11th class holding every image again."""
    from data_pipeline.sources import DataError

    root = tmp_path / "tree"
    shutil.copytree(photo_data / "train", root)
    (root / "coffee" / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    (root / "rocket" / "scan.TIFF").write_bytes(b"II*\0" + b"\0" * 20)
    want = list_image_files(photo_data / "train", "auto", None)
    got = list_image_files(root, "auto", IndexStore(tmp_path / "run"))
    assert len(got) == len(want)
    out = capsys.readouterr().err
    assert "warning: 2 file(s) under" in out and "1 .gif, 1 .tiff" in out and "convert them" in out
    list_image_files(root, "auto", IndexStore(tmp_path / "run"))  # from the kept index: still said
    assert "1 .gif, 1 .tiff" in capsys.readouterr().err
    os.symlink(".", root / "selfloop")
    with pytest.raises(DataError, match="selfloop is a symbolic link to .* which holds .* itself"):
        list_image_files(root, "auto", None)
