"""Named parts chosen by a config key (a loss, a tracking sink): a table, and a decorator that files
a builder in it under its name. One way to register anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def registrar(table: dict[str, T]) -> Callable[[str], Callable[[T], T]]:
    """``register = registrar(TABLE)``; then ``@register("name")`` files the decorated builder."""
    def register(name: str) -> Callable[[T], T]:
        def file(builder: T) -> T:
            table[name] = builder
            return builder

        return file

    return register
