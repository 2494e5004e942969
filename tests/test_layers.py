"""The package's shape: every module imports only its own stage or earlier ones (data,
scoring, models, runtime, training, tasks, report, serving, cli), and no two modules import
each other, directly or round a circle, at the top or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "histoscreen"
# scoring before models: it works on logits and needs no network, and a model bundle stores
# its scoring settings (scoring/settings.py) in its JSON
STAGES = ["data", "scoring", "models", "runtime", "training", "tasks", "report", "serving", "cli"]
SHARED = {"__init__", "atomic", "checks", "constants", "errors", "jsontext", "lazy", "problems", "progress", "tables"}
# A registry imports the architectures it lists when first asked, and each registers itself with it.
REGISTRATION = {("histoscreen.models.registry", "histoscreen.models.compact"), ("histoscreen.models.registry", "histoscreen.models.residual"),
                ("histoscreen.models.registry", "histoscreen.models.resnet")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("histoscreen"):
                for alias in node.names:  # `from histoscreen.data import views` names a module
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("histoscreen")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def stage(module: str) -> int | None:
    parts = module.split(".")[1:] or ["__init__"]
    if parts[0] in SHARED or parts[0] == "__init__":
        return None
    return STAGES.index(parts[0])


def test_every_module_imports_only_its_own_stage_or_earlier_ones():
    wrong = [f"{a} imports {b}" for a, targets in imports().items() for b in targets
             if stage(a) is not None and stage(b) is not None and stage(b) > stage(a)]
    wrong += [f"{a} (shared) imports {b}" for a, targets in imports().items() for b in targets
              if stage(a) is None and a != "histoscreen" and stage(b) is not None and not a.endswith(".lazy")]
    assert wrong == []


def test_no_import_circles():
    graph = {a: {b for b in targets if (a, b) not in REGISTRATION} for a, targets in imports().items()}
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph[node]):
            if target in packages:
                continue  # a package's __init__ re-exports its modules: not a dependency of them
            if target in path:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif len(path) < 12:
                visit(target, path + [target])

    for start in sorted(graph):
        visit(start, [start])
    assert sorted(set(circles)) == []
