"""The one atomic writer: a failed write leaves the old file and no temporary; every product file
that replaces a file goes through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from foundation.atomic_files import atomic_path, atomic_write

REPO = Path(__file__).resolve().parents[1]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_no_product_file_renames_over_a_file_but_the_atomic_writer():
    own = REPO / "data_pipeline" / "atomic_files.py"
    sites = [f"{path.relative_to(REPO)}:{n}" for folder in ("trainer", "data_pipeline", "launch", "benchmarks")
             for path in sorted((REPO / folder).rglob("*.py")) if path != own
             for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bos\.(replace|rename)\(", line)]
    assert sites == [], f"use foundation.atomic_files (atomic_path / atomic_write) at {sites}"
