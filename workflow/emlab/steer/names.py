"""Names of steering directions and steered models: they end up in condition ids (``<target>+<direction>@<alpha>``)
and file names. Torch-free, so that the steering tables (screen, sweep) import without a model stack."""

from __future__ import annotations

import re
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class DirectionError(ValueError):
    """A bad direction input; the message names the file, key or direction."""


def check_name(name: Any, what: str = "direction name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name == "none":
        raise DirectionError(f"{what} {name!r} must be letters, digits, '_', '.' or '-' (and not 'none')")
    return name
