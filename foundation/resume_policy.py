"""What a resume may do with each config field, said on the field itself.

Every leaf field of the run's config is declared with one of ``fixed``, ``setting`` or ``hyper``
(``tests/test_config.py`` fails on a field that says nothing, so a new key is never silently a
hyper-parameter):

- ``fixed``: shapes the weights or the data position; a checkpoint with another value cannot go on.
- ``setting``: how the run executes, not what it learns; a resume may change it (recorded).
- ``hyper``: what the run learns; changed on resume only with ``checkpoint.allow_changes=true``.

It lives in the lowest layer because the data sections declare their fields too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Policy = Literal["fixed", "setting", "hyper"]
KEY = "resume"  # the field metadata's key


def _field(policy: Policy, default: Any, factory: Any) -> Any:
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={KEY: policy})
    return dataclasses.field(default=default, metadata={KEY: policy})


def fixed(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field a resume cannot change (the model's shape, the global batch)."""
    return _field("fixed", default, factory)


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field a resume may change freely (paths, workers, logging, tracking)."""
    return _field("setting", default, factory)


def hyper(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A hyper-parameter: changed on resume only when the user allows changes."""
    return _field("hyper", default, factory)


def _is_section(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def resume_policies(cls: type, prefix: str = "") -> dict[str, Policy | None]:
    """Every leaf field of the config dataclass ``cls`` by dotted key, with its policy (None: undeclared)."""
    policies: dict[str, Policy | None] = {}
    for f in dataclasses.fields(cls):
        if _is_section(f):
            policies.update(resume_policies(f.default_factory, f"{prefix}{f.name}."))
        else:
            policies[f"{prefix}{f.name}"] = f.metadata.get(KEY)
    return policies
