"""One listing of an image tree per job (``TreeIndex``): made once by one rank, handed to the others,
kept in the run folder, and refreshed folder by folder on a restart.

A tree of 1.28M files (ImageNet) on a shared file system is the slow part of a start when every
rank walks it and stats every file. Here one process lists it with ``os.scandir``'s entry types
(no ``stat`` per file), the other ranks receive the listing over the process group and never
touch the tree, and a restart stats each *folder* (its mtime changes when a file in it is added,
removed or renamed) and lists again only the folders that changed: O(folders), not O(files).
Each folder also keeps its files' check verdicts (``data_pipeline.file_checks``), so a restart
re-checks only the files of folders that changed. A file rewritten in place under the same name
changes no folder and is not noticed (its content is checked when a decoder meets it).

The listing's order equals ``sorted(Path.rglob)``'s (names compared part by part), so a tree gives
the same samples, labels and classes with or without an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.sources import IMAGE_EXTENSIONS, UNREAD_IMAGE_EXTENSIONS, DataError
from foundation import collectives
from foundation.atomic_files import atomic_write
from foundation.logs import get_logger

log = get_logger("data")

MAGIC = b"SIMCLR-TREE-INDEX 2\n"  # 2: the header carries the body's length and sha256
RACY_NS = 2_000_000_000  # a folder changed this close to the index's writing is listed again (coarse mtimes)


@dataclass
class Folder:
    """One folder of the tree: its mtime when listed, the image files directly inside (by name), the
    folders a listing descends into, and its files' check verdicts."""

    mtime_ns: int
    files: list[str]
    subdirs: list[str]
    links: list[str] = field(default_factory=list)  # the root's sub-folders that are symbolic links
    checked: bool = False  # every file checked since the folder was last listed with other files
    bad: dict[str, str] = field(default_factory=dict)  # file name -> what is wrong with it
    unread: dict[str, int] = field(default_factory=dict)  # images of formats not read (GIF, TIFF, ...): suffix -> count


@dataclass
class TreeChanges:
    added: list[str] = field(default_factory=list)  # relative paths
    removed: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # relative folders whose files changed

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def describe(self, root: Path) -> str:
        where = ", ".join((f or ".") + "/" for f in self.folders[:3]) + (" ..." if len(self.folders) > 3 else "")
        return (f"{root} changed since this run's index: {len(self.added)} image(s) added, {len(self.removed)} "
                f"removed, in {len(self.folders)} folder(s) ({where})")


def _suffix(name: str) -> str:
    """``Path(name).suffix`` without making a Path (1.28M of them cost seconds)."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class TreeIndex:
    """The image files under ``root`` by folder (relative folder "" is the root itself)."""

    def __init__(self, root: Path, folders: dict[str, Folder], written_ns: int = 0) -> None:
        self.root, self.folders, self.written_ns = root, folders, written_ns
        self.relisted = 0  # folders the last refresh listed again

    # -- listing --------------------------------------------------------------------------------
    @classmethod
    def scan(cls, root: Path) -> TreeIndex:
        index = cls(root, {})
        index._scan_below("", TreeChanges())
        return index

    def _list_folder(self, rel: str) -> Folder:
        """One folder's entries: names only, types from the directory entry (a stat only for links)."""
        path = os.path.join(self.root, rel) if rel else str(self.root)
        if rel and "/" not in rel and not os.access(path, os.R_OK | os.X_OK):
            raise DataError(f"class folder {path} cannot be read by this user (permissions); give it read "
                            f"access (chmod -R a+rX {path}) or move it out of {self.root}")
        try:
            mtime = os.stat(path).st_mtime_ns  # before the listing: a change during it shows on the next start
            files, subdirs, links, unread = [], [], [], {}
            with os.scandir(path) as entries:
                for entry in entries:
                    name = entry.name
                    if name[0] == ".":
                        continue
                    # a name with an image suffix is nearly always a file: test that first (the entry's
                    # type, no syscall). The root's sub-folders are classes, links followed
                    # (Path.is_dir); below them rglob's rule: linked folders are not descended into.
                    suffix = _suffix(name).lower()
                    if suffix in IMAGE_EXTENSIONS and entry.is_file():
                        files.append(name)
                    elif suffix in UNREAD_IMAGE_EXTENSIONS:
                        unread[suffix] = unread.get(suffix, 0) + 1
                    elif entry.is_dir(follow_symlinks=not rel):
                        subdirs.append(name)
                        if not rel and entry.is_symlink():
                            links.append(name)
        except PermissionError:
            raise DataError(f"folder {path} cannot be read by this user (permissions); give it read access "
                            f"(chmod -R a+rX {path}) or move it out of {self.root}") from None
        return Folder(mtime, sorted(files), sorted(subdirs), sorted(links), unread=unread)

    def _scan_below(self, rel: str, changes: TreeChanges) -> None:
        """List ``rel`` and every folder below it, each file counted as added."""
        pending = [rel]
        while pending:
            current = pending.pop()
            folder = self._list_folder(current)
            self.folders[current] = folder
            changes.added += [_join(current, f) for f in folder.files]
            pending += [_join(current, d) for d in folder.subdirs]

    def _drop_below(self, rel: str, changes: TreeChanges) -> None:
        folder = self.folders.pop(rel, None)
        if folder is None:
            return
        changes.removed += [_join(rel, f) for f in folder.files]
        for d in folder.subdirs:
            self._drop_below(_join(rel, d), changes)

    def refresh(self) -> TreeChanges:
        """Stat every folder; list again those whose mtime moved (or that changed too close to the
        index's writing to tell); say what files came and went."""
        changes = TreeChanges()
        self.relisted = 0
        for rel in sorted(self.folders, key=lambda r: r.count("/")):  # parents first
            old = self.folders.get(rel)
            if old is None:  # dropped with its parent
                continue
            path = os.path.join(self.root, rel) if rel else str(self.root)
            try:
                mtime = os.stat(path).st_mtime_ns
            except FileNotFoundError:
                if not rel:
                    raise DataError(f"data path {self.root} does not exist; set data.root to an image folder, an "
                                    ".npz file, an STL-10 or CIFAR folder, or a folder of tar shards") from None
                continue  # its parent changed too, and drops it
            if mtime == old.mtime_ns and mtime < self.written_ns - RACY_NS:
                continue
            new = self._list_folder(rel)
            self.relisted += 1
            if new.files == old.files:  # listed again for safety, and unchanged: its verdicts stand
                new.checked, new.bad = old.checked, old.bad
            else:
                before, after = set(old.files), set(new.files)
                changes.added += [_join(rel, f) for f in new.files if f not in before]
                changes.removed += [_join(rel, f) for f in old.files if f not in after]
                changes.folders.append(rel)
            self.folders[rel] = new
            for d in set(old.subdirs) - set(new.subdirs):
                self._drop_below(_join(rel, d), changes)
            for d in sorted(set(new.subdirs) - set(old.subdirs)):
                self._scan_below(_join(rel, d), changes)
                changes.folders.append(_join(rel, d))
        return changes

    def walk(self, rel: str = "", skip_links: bool = False) -> list[str]:
        """Relative paths of the image files under ``rel``, in ``sorted(rglob)`` order: a folder's
        files and sub-folders merged by name, each sub-folder's files at its name's place."""
        folder = self.folders[rel]
        subdirs = set(folder.subdirs) - (set(folder.links) if skip_links else set())
        prefix = f"{rel}/" if rel else ""
        if not subdirs:  # the common case (a class folder of files): one comprehension
            return [prefix + name for name in folder.files]
        out: list[str] = []
        for name in sorted([*folder.files, *subdirs]):
            if name in subdirs:
                out += self.walk(prefix + name)
            else:
                out.append(prefix + name)
        return out

    # -- file checks ----------------------------------------------------------------------------
    def unchecked(self, rels: list[str]) -> list[int]:
        """Positions in ``rels`` (relative file paths) whose folder has not been checked since it changed."""
        return [i for i, r in enumerate(rels) if not self.folders[os.path.dirname(r)].checked]

    def known_bad(self, rels: list[str]) -> dict[int, str]:
        where = {r: i for i, r in enumerate(rels)}
        return {where[_join(rel, name)]: why for rel, folder in self.folders.items()
                for name, why in folder.bad.items() if _join(rel, name) in where}

    def record_checks(self, checked: list[str], bad: dict[str, str]) -> None:
        """Verdicts for ``checked`` (relative paths; every file of their folders): ``bad`` maps the bad ones."""
        for rel in {os.path.dirname(r) for r in checked}:
            self.folders[rel].checked, self.folders[rel].bad = True, {}
        for r, why in bad.items():
            self.folders[os.path.dirname(r)].bad[os.path.basename(r)] = why

    # -- storage --------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        fields: list[bytes] = []
        enc = os.fsencode
        for rel, f in self.folders.items():
            fields += [enc(rel) if rel else b".", str(f.mtime_ns).encode(), b"1" if f.checked else b"0",
                       json.dumps(f.unread).encode(),
                       str(len(f.files)).encode(), str(len(f.subdirs)).encode(), str(len(f.links)).encode(),
                       str(len(f.bad)).encode(), *map(enc, f.files), *map(enc, f.subdirs), *map(enc, f.links)]
            for name, why in f.bad.items():
                fields += [enc(name), why.encode()]
        body = b"\0".join(fields)
        head = json.dumps({"root": str(self.root), "written_ns": self.written_ns, "body_bytes": len(body),
                           "body_sha256": hashlib.sha256(body).hexdigest()}).encode()
        return MAGIC + head + b"\n" + body

    @classmethod
    def from_bytes(cls, data: bytes, root: Path) -> TreeIndex:
        """The index ``data`` holds; ``ValueError`` (saying why) unless it is whole: a derived file is
        never trusted in part (a cut body parses, and would silently drop the images it lost)."""
        if not data.startswith(MAGIC):
            raise ValueError("not a tree index of this version")
        head, _, body = data[len(MAGIC):].partition(b"\n")
        try:
            meta = json.loads(head)
        except ValueError:
            raise ValueError("its header is not JSON") from None
        if not isinstance(meta, dict) or not {"root", "written_ns", "body_bytes", "body_sha256"} <= meta.keys():
            raise ValueError("its header is not an index header")
        if meta["body_bytes"] != len(body):
            raise ValueError(f"it holds {len(body)} bytes where its header says {meta['body_bytes']} (cut short?)")
        if meta["body_sha256"] != hashlib.sha256(body).hexdigest():
            raise ValueError("its checksum does not match its content")
        if meta["root"] != str(root):
            raise ValueError("an index of another tree")
        parts, dec, i, folders = body.split(b"\0") if body else [], os.fsdecode, 0, {}
        while i < len(parts):
            rel = "" if parts[i] == b"." else dec(parts[i])
            mtime, checked, unread = int(parts[i + 1]), parts[i + 2] == b"1", json.loads(parts[i + 3])
            nf, nd, nl, nb = (int(x) for x in parts[i + 4 : i + 8])
            i += 8
            files = [dec(x) for x in parts[i : i + nf]]
            subdirs = [dec(x) for x in parts[i + nf : i + nf + nd]]
            links = [dec(x) for x in parts[i + nf + nd : i + nf + nd + nl]]
            i += nf + nd + nl
            bad = {dec(parts[i + 2 * k]): parts[i + 2 * k + 1].decode() for k in range(nb)}
            i += 2 * nb
            folders[rel] = Folder(mtime, files, subdirs, links, checked, bad, unread)
        return cls(root, folders, meta["written_ns"])


@dataclass(frozen=True)
class IndexStore:
    """Where a job keeps its tree indexes (its run folder; None: listed afresh each time) and which
    rank this process is: rank 0 lists and keeps, the others receive."""

    folder: Path | None
    rank: int = 0
    world_size: int = 1

    def path_for(self, root: Path) -> Path | None:
        if self.folder is None:
            return None
        key = os.fsencode(os.path.abspath(root))  # one file per tree, whatever the working folder
        return Path(self.folder) / f"tree_index-{hashlib.sha1(key).hexdigest()[:12]}.bin"

    def save(self, index: TreeIndex) -> None:
        """Rank 0 writes the index atomically (a crash leaves the previous one); a read-only or full
        disk only costs the next start a listing."""
        path = self.path_for(index.root)
        if path is None or self.rank != 0:
            return
        index.written_ns = time.time_ns()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, index.to_bytes())
        except OSError:
            pass


def _load_or_scan(root: Path, store: IndexStore | None) -> tuple[TreeIndex, bool]:
    """The kept index refreshed (a restart), else a new listing; and whether it must be written."""
    path = store.path_for(root) if store is not None else None
    if path is not None and path.is_file():
        try:
            index = TreeIndex.from_bytes(path.read_bytes(), root)
            if "" not in index.folders:
                raise ValueError("it lacks the tree's root folder")
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:  # a damaged index costs a listing
            log.info(f"the kept listing {path} is damaged ({exc}); listing {root} again")
            index = None
        if index is not None:
            changes = index.refresh()
            if changes:  # whether a resume may go on with other files is the checkpoint's to say
                log.info(f"{changes.describe(root)}")
            return index, bool(changes) or index.relisted > 0
    return TreeIndex.scan(root), True


def shared_tree_index(root: Path, store: IndexStore | None) -> TreeIndex:
    """The tree's index for every rank: rank 0 lists (or refreshes the kept index) and hands it over
    the process group; the other ranks never touch the tree. A listing error reaches every rank."""
    if store is None or not collectives.active():
        index, dirty = _load_or_scan(root, store)
        if dirty and store is not None:
            store.save(index)
        return index
    payload: tuple[str, Any] | None = None
    failure: BaseException | None = None
    if store.rank == 0:
        try:
            index, dirty = _load_or_scan(root, store)
            if dirty:
                store.save(index)
            payload = ("index", index.to_bytes())
        except Exception as exc:  # every rank must hear of it, or the others wait here until the timeout
            failure, payload = exc, ("data" if isinstance(exc, DataError) else "other", str(exc))
    kind, value = collectives.broadcast_object(payload)
    if failure is not None:
        raise failure
    if kind == "data":
        raise DataError(value)
    if kind == "other":
        raise RuntimeError(f"rank 0 could not list {root}: {value}")
    return index if store.rank == 0 else TreeIndex.from_bytes(value, root)
