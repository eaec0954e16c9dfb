"""docs/architecture.md stays true: its rule graph and rule table are what scripts/architecture.py writes from
the rules and the package today, and every module, rule and file it names exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _script():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_generated_parts_are_current(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch = _script()
    text = DOC.read_text()
    assert arch.splice(text, arch.generated()) == text, \
        "docs/architecture.md is out of date: run .venv/bin/python scripts/architecture.py"


def test_the_table_has_every_rule_and_names_real_functions():
    arch = _script()
    text = DOC.read_text()
    rules = {name for _, name, _ in arch.rule_blocks()}
    assert len(rules) >= 35
    for name in rules:
        assert f"| `{name}` |" in text
    for module, functions in re.findall(r"\| `(emlab(?:\.\w+)+)`: ((?:`\w+`(?:, )?)+) \|", text):
        path = ROOT / "workflow" / Path(*module.split("."))
        source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
        for fn in re.findall(r"`(\w+)`", functions):
            assert re.search(rf"^(def|class) {fn}\b", source, flags=re.M), f"{module}.{fn} named in the table does not exist"


def test_every_path_the_page_names_exists():
    text = DOC.read_text()
    named = set(re.findall(r"`((?:workflow|rules|resources|envs|scripts|tests|configs|docs)/[\w./-]+?)`", text))
    named |= {f"workflow/emlab/{m}" for m in re.findall(r"^\s+- `([\w/]+(?:\.py)?)` ", text, flags=re.M)}
    assert len(named) >= 20, named
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists() and "<" not in p and "*" not in p)
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_package_has_no_import_circles():
    """No two modules import each other, directly or around a loop, counting the imports inside functions too
    (a lazy import hides a circle from Python, not from a reader)."""
    from package_imports import circles, import_graph

    graph = import_graph()
    assert len(graph) > 50 and graph["emlab.plan"] >= {"emlab.schema", "emlab.datasets"}
    assert circles(graph) == []


def test_the_circle_check_finds_a_circle():
    from package_imports import circles

    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
