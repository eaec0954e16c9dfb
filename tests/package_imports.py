"""The emlab package's imports, read from its syntax trees (no module is imported): which modules and third-party
packages a module, or a function of it, imports. Used by the tests of rule envs and of import circles."""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "workflow" / "emlab"


def modules() -> list[str]:
    """Every module of the package, dotted (``emlab.sae.topk``; a package as its own name)."""
    out = []
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def module_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    pkg = PKG / rel / "__init__.py"
    return pkg if pkg.exists() else PKG / rel.with_suffix(".py")


@lru_cache(maxsize=None)
def tree(module: str) -> ast.Module:
    return ast.parse(module_path(module).read_text(encoding="utf-8"))


def _optional(node: ast.Try) -> bool:
    """A try whose handler catches ImportError: the import is optional by design."""
    names = {getattr(h.type, "id", None) for h in node.handlers}
    names |= {getattr(e, "id", None) for h in node.handlers if isinstance(h.type, ast.Tuple) for e in h.type.elts}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def imports_in(body: list[ast.stmt], module: str, *, deep: bool) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of the import statements in ``body``; ``deep`` also enters function
    bodies (a function's own imports), otherwise only what runs at import time."""
    found = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Try) and _optional(node):
                continue
            if isinstance(node, ast.Import):
                found.extend((a.name, []) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = module.split(".")
                    is_pkg = module_path(module).name == "__init__.py"
                    base = parts if is_pkg else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                found.append((target, [a.name for a in node.names]))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not deep:
                continue
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            visit([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)])

    visit(body)
    return found


def function(module: str, name: str) -> ast.FunctionDef | None:
    for node in tree(module).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def third_party(module: str, names: list[str], seen: set) -> set[str]:
    """Third-party packages that importing ``names`` from ``module`` (and calling the functions) imports."""
    top = module.split(".")[0]
    if top != "emlab":
        return set() if top in sys.stdlib_module_names or top == "__future__" else {top}
    out: set[str] = set()
    # importing emlab.a.b runs emlab/__init__, emlab/a/__init__, then emlab/a/b
    parts = module.split(".")
    for i in range(2, len(parts) + 1):
        m = ".".join(parts[:i])
        if (m, None) not in seen:
            seen.add((m, None))
            # names a module imports at its top are bound, not called: only their modules' top levels run
            for target, _ in imports_in(tree(m).body, m, deep=False):
                out |= third_party(target, [], seen)
    for name in names:
        submodule = f"{module}.{name}"
        if module_path(submodule).exists() and submodule not in {m for m, _ in seen}:
            out |= third_party(submodule, [], seen)
            continue
        fn = function(module, name)
        if fn is not None and (module, name) not in seen:
            seen.add((module, name))
            for target, imported in imports_in(fn.body, module, deep=True):
                out |= third_party(target, imported, seen)
            # what the function calls: the module's own functions and the names the module imported
            bound = top_level_names(module)
            for used in {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}:
                if used in bound:
                    out |= third_party(bound[used][0], [bound[used][1]], seen)
                elif function(module, used) is not None:
                    out |= third_party(module, [used], seen)
    return out


@lru_cache(maxsize=None)
def top_level_names(module: str) -> dict[str, tuple[str, str]]:
    """name -> (emlab module, name there) for the ``from emlab... import name`` lines of a module's top."""
    out = {}
    for node in tree(module).body:
        if isinstance(node, ast.ImportFrom):
            target = imports_in([node], module, deep=False)[0][0]
            if target.startswith("emlab"):
                out.update({a.asname or a.name: (target, a.name) for a in node.names})
    return out




def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (at its top or inside a function);
    a package's imports of its own submodules, and a submodule's of its package, are not circles."""
    names = set(modules())
    graph = {}
    for m in names:
        deps = set()
        for target, imported in imports_in(tree(m).body, m, deep=True):
            deps |= {f"{target}.{n}" for n in imported if f"{target}.{n}" in names}
            if target in names:
                deps.add(target)
        graph[m] = {d for d in deps if d != m and not d.startswith(m + ".") and not m.startswith(d + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found
