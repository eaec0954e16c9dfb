"""No loader in emlab can run code from a file: tensors come from safetensors, or from torch.load with
weights_only=True; nothing unpickles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "emlab"
UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load"), ("cloudpickle", "load")}


def _calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name):
                yield path, node, (node.func.value.id, node.func.attr)


def test_every_torch_load_is_weights_only():
    calls = list(_calls())
    assert sum(name[0] == "torch" for _, _, name in calls) > 50, "the search no longer sees the package's torch calls"
    loads = [(p, n) for p, n, name in calls if name == ("torch", "load")]
    for path, node in loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: torch.load without weights_only=True"


def test_nothing_unpickles():
    found = [f"{p.relative_to(PACKAGE.parent)}:{n.lineno}" for p, n, name in _calls() if name in UNSAFE_CALLS]
    found += [f"{p.relative_to(PACKAGE.parent)}:{n.lineno}" for p, n, name in _calls()
              if name[1] == "load" and name[0] in ("np", "numpy")
              and any(k.arg == "allow_pickle" and getattr(k.value, "value", False) is True for k in n.keywords)]
    assert not found, found
