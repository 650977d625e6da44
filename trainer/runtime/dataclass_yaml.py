"""YAML files and ``key=value`` overrides into typed dataclasses, checked key by key.

The schema machinery that every config in the project uses (the run config in ``trainer.config``,
the cluster config in ``launch.slurm``): unknown keys get the closest valid name, values of the
wrong type name the key and what was expected. It knows nothing about SimCLR.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Container
from pathlib import Path
from typing import Any, Literal

import yaml

from foundation.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a config file or override; the CLI prints it and exits with status 2."""


Problem = tuple[str, Any, str]  # (the full key, its value, what is allowed): a section's ``problems()`` lists these


def failing(rules: list[tuple[bool, str, Any, str]]) -> list[Problem]:
    """The problems among ``(holds, key, value, what is allowed)`` rules: those that do not hold."""
    return [(key, value, allowed) for holds, key, value, allowed in rules if not holds]


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f"; valid keys: {', '.join(options)}"


def _forms(args: tuple[Any, ...]) -> str:
    """What each member of a union looks like in YAML, for the error."""
    def form(a: Any) -> str:
        if dataclasses.is_dataclass(a):
            return "a mapping with " + "/".join(f.name for f in dataclasses.fields(a))
        if typing.get_origin(a) is list:
            return "a list"
        return "an integer" if a is int else f"a {getattr(a, '__name__', a)}"

    return ", ".join(form(a) for a in args)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """``Optional[X]``, or ``X | Y`` chosen by the value's shape (a mapping, a list, a scalar)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
        return None
    if len(args) == 1:
        return _coerce(value, args[0], key)
    shape = dict if isinstance(value, dict) else list if isinstance(value, list) else None
    fits = [a for a in args if (dataclasses.is_dataclass(a) if shape is dict else typing.get_origin(a) is shape)]
    if shape is None:
        fits = [a for a in args if not dataclasses.is_dataclass(a) and typing.get_origin(a) is None]
    if fits and shape is not None:
        return _coerce(value, fits[0], key)
    for tp_ in fits:
        try:
            return _coerce(value, tp_, key)
        except ConfigError:
            pass
    raise ConfigError(f"{key}: {value!r} is none of the allowed forms ({_forms(args)})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    if tp is Any:  # checked later by whoever declares it (a loss's own options)
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, rejecting unknown keys (with the closest valid
    name) and values of the wrong type; nested dataclasses are built recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def parse_value(raw: str) -> Any:
    """A command-line value as a YAML scalar or list (``0.5`` -> float, ``[0.2, 1.0]`` -> list)."""
    if raw == "~":  # YAML's null, but on a command line the home folder (key=~ is a path; the shell leaves it)
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {raw!r}: {exc}") from None


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.5", "train.epochs=10"]`` -> nested dict; values are parsed as YAML scalars."""
    return apply_overrides({}, overrides)


def apply_overrides(base: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``base`` (a recipe's mapping; not changed) with ``overrides`` laid over it in order: a dotted
    key (``optim.lr=0.5``) merges as a section of a recipe does; a key with an index
    (``data.views[1].count=6``, the form our errors name keys in) changes that item of a list the
    recipe gives."""
    import copy

    tree = copy.deepcopy(base)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=0.5")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = parse_value(raw)
        except ConfigError as exc:
            raise ConfigError(f"override {key}: {exc}") from None
        numbered = [part for part in key.split(".") if part.isdigit()]
        if numbered:
            import re

            bracketed = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)
            raise ConfigError(f"override {key}: a list item's index goes in brackets: {bracketed}={raw}")
        if "[" in key:
            _set_indexed(tree, key, value)
        else:
            one: dict[str, Any] = {}
            set_dotted(one, key, value)
            tree = merge(tree, one)
    return tree


def _set_indexed(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree``'s item at ``key`` (``a.b[1].c``) set to ``value``; every list indexed must exist."""
    import re

    if not re.fullmatch(r"\w+(\[\d+\])*(\.\w+(\[\d+\])*)*", key):
        raise ConfigError(f"override {key}: a key is names joined by '.', each with optional [index], "
                          "e.g. data.views[1].count=6")
    steps: list[str | int] = [int(t[1:-1]) if t.startswith("[") else t for t in re.findall(r"\w+|\[\d+\]", key)]
    node: Any = tree
    for n, step in enumerate(steps):
        said = re.sub(r"\.\[", "[", ".".join(f"[{s}]" if isinstance(s, int) else s for s in steps[:n]))
        if isinstance(step, int):
            if not isinstance(node, list) or not node:
                raise ConfigError(f"override {key}: this config gives no {said} list to index (a default is not "
                                  f"written out); give the whole list, e.g. '{said}=[...]'")
            if step >= len(node):
                raise ConfigError(f"override {key}: {said} has {len(node)} item(s) in this config; index one of "
                                  f"0..{len(node) - 1}, or give the whole list, e.g. '{said}=[...]'")
        elif not isinstance(node, dict):
            raise ConfigError(f"override {key}: {said} is not a section")
        if n == len(steps) - 1:
            node[step] = value
        elif isinstance(step, str) and step not in node:
            node[step] = [] if isinstance(steps[n + 1], int) else {}
            node = node[step]
        else:
            node = node[step]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section (neither is changed)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last one silently, so a stale line overrides the intended one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"'{key}' is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ConfigError naming ``what`` and the file otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory, not a YAML file; {hint}")
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; {hint}")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not a text file (binary content); {hint}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read ({exc.strerror}); check its permissions") from None
    except ConfigError as exc:
        raise ConfigError(f"{what} {p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def to_plain_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain nested dict (tuples as lists) for YAML, checkpoints and MLflow."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(obj))


def flatten(tree: dict[str, Any], prefix: str = "", leaves: Container[str] = ()) -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (MLflow params). A key in ``leaves`` (a mapping field,
    such as ``loss.options``) stays one value, whatever it holds."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in leaves:
            out.update(flatten(value, f"{prefix}{key}.", leaves))
        else:
            out[f"{prefix}{key}"] = value
    return out
