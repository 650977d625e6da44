"""The package layers point one way: ``launch -> benchmarks -> trainer -> data_pipeline -> foundation``.

Every import in every module counts, including those inside functions (a lazy import is still a
dependency), so ``python -m trainer`` never needs ``launch`` and the data pipeline never needs the
trainer. Within a package the module graph has no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.runs import REPO

LAYERS = {"foundation": 0, "data_pipeline": 1, "trainer": 2, "benchmarks": 3, "launch": 4}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of the project modules that ``path`` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in LAYERS}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in imports_of(path, name) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_points_up_a_layer():
    upward = [f"{src} imports {dst}" for src, deps in graph().items() for dst in deps
              if LAYERS[dst.split(".")[0]] > LAYERS[src.split(".")[0]]]
    assert upward == []


def test_no_import_cycles_between_modules():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            # a package's __init__ importing its own submodule is how packages expose them, not a cycle
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


# trainer's rooms, bottom to top (docs/architecture.md): a module imports from its own room or a lower
# one; rooms on one level import neither way. The package's own __init__ (version, a message) is below all.
TRAINER_ROOMS = {"runtime": 0, "model": 1, "losses": 1, "observe": 2, "tracking": 2, "config": 3, "state": 4,
                 "evaluation": 5, "run": 6, "__main__": 7}


def trainer_room(module: str) -> str | None:
    """The room of a trainer module (``trainer.run.loop`` -> ``run``; the package itself: None)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "trainer" and len(parts) > 1 else None


def test_trainers_rooms_point_one_way():
    """Inside trainer/ too: the run above evaluation, above checkpoint state, above the config, above
    what observes and tracks, above the model and losses, above the runtime (#43)."""
    edges = graph()
    rooms = {trainer_room(m) for m in edges if m.startswith("trainer.")}
    assert rooms == set(TRAINER_ROOMS), f"rooms of trainer/ without a place: {rooms ^ set(TRAINER_ROOMS)}"
    upward = [f"{src} imports {dst}" for src, deps in edges.items() for dst in deps
              if trainer_room(src) and trainer_room(dst) and trainer_room(src) != trainer_room(dst)
              and TRAINER_ROOMS[trainer_room(dst)] >= TRAINER_ROOMS[trainer_room(src)]]
    assert upward == []
    assert not edges["trainer"], "trainer/__init__.py imports nothing of the package: every room may import it"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself can fail: a function-level import and a relative import are both found."""
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    from launch.cli import main\n\nfrom .loss import nt_xent\n")
    assert imports_of(f, "trainer.mod") >= {"launch.cli", "launch.cli.main", "trainer.loss"}


def test_architecture_map_matches_the_tree():
    """The architecture page's module map (docs/architecture.md, "How it fits together") names every
    module of the four packages, and names no file that is not there."""
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## How it fits together", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"([\w/]+\.py)\b", section))
    files = {path.relative_to(REPO) for path in project_modules().values()}
    missing = sorted(str(f) for f in files if f.name != "__init__.py" and f.name not in {Path(n).name for n in named})
    assert not missing, f"docs/architecture.md's module map lacks {missing}"
    basenames = {f.name for f in files}
    stale = sorted(n for n in named if Path(n).name not in basenames and not (REPO / n).exists())
    assert not stale, f"docs/architecture.md's module map names files that do not exist: {stale}"
    for room in TRAINER_ROOMS:  # each room of trainer/ (a folder, or one module) is on the map with its purpose
        where = f"trainer/{room}/" if (REPO / "trainer" / room).is_dir() else f"trainer/{room}.py"
        assert re.search(rf"^{where} +\S", section, re.M), f"the map lacks the room {where}"
