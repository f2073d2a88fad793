"""The layers of shared/ARCHITECTURE.md, read from the source: who may import whom, no import cycle, and
no module over its size. Every import counts, a function-local one included (only imports under
`if TYPE_CHECKING:` are left out: they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "ml", "worker")
# What app/ may import of ml/: what is served (output modes, policy, monitor, enforcement), what a job may
# ask for, model loading, the audit result type and its findings, evidence, and the charts.
ML_ENTRY_POINTS = {"ml.served", "ml.catalog", "ml.loading", "ml.audit", "ml.evidence", "ml.charts"}
MAX_LINES = {"app": 400, "worker": 400, "ml": 600}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, *, submodules: bool = True) -> set[str]:
    """Every module of ours that `name` imports: `import x` names x, `from x import y` names x (and x.y
    when `submodules`: y may be a module, which then runs)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _type_checking(node)
        for n in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            if submodules:
                found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m in _imports(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _owner(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "app" else parts[0]


def test_each_layer_imports_only_what_it_may():
    modules = _modules()
    graph = {n: {m for m in _imports(n, p, submodules=False) if m in modules} for n, p in modules.items()}
    wrong = []
    for name, deps in graph.items():
        layer = _owner(name)
        for dep in deps:
            target = _owner(dep)
            if layer == "ml" and target != "ml":
                wrong.append(f"{name} -> {dep}: ml/ imports nothing of the service")
            elif name.startswith("app") and target == "worker":
                wrong.append(f"{name} -> {dep}: app/ never imports worker/")
            elif layer == "app.core" and target not in ("app.core", "ml"):
                wrong.append(f"{name} -> {dep}: app/core imports nothing of the layers above it")
            elif layer == "app.services" and target in ("app.api", "app.web"):
                wrong.append(f"{name} -> {dep}: the service layer is under the API and the dashboard")
            elif {layer, target} == {"app.api", "app.web"}:
                wrong.append(f"{name} -> {dep}: routes and pages never call each other")
            elif name.startswith("app") and target == "ml" and dep not in ML_ENTRY_POINTS:
                wrong.append(f"{name} -> {dep}: app/ imports ml only through its entry points")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    """No strongly connected set of modules, leaving out a module's import of its own package (`from
    ml.audit import x` inside ml.audit's modules: the package re-exports them)."""
    graph = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                connect(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_its_size():
    big = [
        f"{name}: {n} lines (at most {MAX_LINES[name.split('.')[0]]})"
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES[name.split(".")[0]]
    ]
    assert not big, "\n".join(big)
