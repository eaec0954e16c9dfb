"""The config schema (``workflow/schemas/config.schema.yaml``) and :class:`ConfigError`, the error of every config
check. A leaf module: :mod:`emlab.config` validates a config against the schema and calls the checks of the
modules that own a section (imports, questions, synthesis, the plan), and those raise :class:`ConfigError`
from here, so no module imports back into :mod:`emlab.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key (and the file, where there is one).
    Sections checked by their own module raise subclasses (e.g. the SAE's, the judges', the monitors')."""


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())
