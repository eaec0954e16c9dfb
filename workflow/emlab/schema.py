"""The config schema (``workflow/schemas/config.schema.yaml``) and :class:`ConfigError`, the error of every config
check. A leaf module: :mod:`emlab.config` validates a config against the schema and calls the checks of the
modules that own a section (imports, questions, synthesis, the plan), and those raise :class:`ConfigError`
from here, so no module imports back into :mod:`emlab.config`."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from .io import parse_yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key (and the file, where there is one).
    Sections checked by their own module raise subclasses (e.g. the SAE's, the judges', the monitors')."""


def load_schema() -> dict[str, Any]:
    """A fresh copy of the schema (callers may fill it in); the file is parsed once per process."""
    return copy.deepcopy(_parsed_schema())


@functools.cache
def _parsed_schema() -> dict[str, Any]:
    return parse_yaml(SCHEMA_PATH.read_text())


def schema_section(*path: str) -> dict[str, Any]:
    """The schema of the object section at ``path`` (e.g. ``("sae", "train")``): for a library class whose keys,
    types and defaults are the workflow's, so that both read them from the one place."""
    node = load_schema()
    for key in path:
        node = node["properties"][key]
    return node


def option(cfg: dict[str, Any], key: str, default: Any = ..., *, where: str, error: type[Exception] = ConfigError,
           kind: type | tuple[type, ...] | None = None, minimum: float | None = None) -> Any:
    """``cfg[key]`` checked against ``kind`` and ``minimum``; ``default`` when absent or null (no default: the
    key is required). Errors are ``error`` and read ``<where>.<key>: ...``."""
    name = f"{where}.{key}"
    value = cfg.get(key)
    if value is None:
        if default is ...:
            raise error(f"{name} is required")
        return default
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass; `concurrency: true` is a typo, not 1
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise error(f"{name} must be {names}, got {value!r}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value!r}")
    return value
