"""Mutation testing, by hand: small wrong changes made to the code one at a time, and the
tests that guard that code run against each. A mutant the tests let pass ("survived") is a
behaviour nothing checks.

    python benchmarks/mutation.py [--modules tables uploads ...] [--per-module 25] [--tests-ref REF]

Mutants come from the module's syntax tree: a comparison turned (< and <=, == and !=), `and`
and `or` swapped, `any` and `all` swapped, `+` and `-` swapped, a number moved (an integer by
one, a float doubled), True and False swapped, a `not` dropped. --per-module samples that many
sites per module (seeded, so two runs mutate the same sites). Each mutant runs in a copy of
src/ and tests/ under a temporary folder; --tests-ref takes tests/ from a git revision
instead (the tests before a change), so survivors before and after can be compared on the
same mutants. Slow (a test run per mutant): a hand-run benchmark, not part of the suite.
"""

from __future__ import annotations

import argparse
import ast
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> (its file, the tests that guard it)
MODULES = {
    "tables": ("src/histoscreen/tables.py", ["tests/test_scoring.py", "tests/test_hostile_inputs.py::test_csv_cells_that_a_spreadsheet_would_run_are_neutralised"]),
    "uploads": ("src/histoscreen/serving/uploads.py", ["tests/test_serving.py::test_hostile_uploads_are_refused_and_write_nothing"]),
    "slides": ("src/histoscreen/scoring/slides.py", ["tests/test_scoring.py", "tests/test_slide_safety.py"]),
    "calibration": ("src/histoscreen/scoring/calibration.py", ["tests/test_scoring.py", "tests/test_context.py"]),
    "context": ("src/histoscreen/scoring/context.py", ["tests/test_context.py", "tests/test_slide_safety.py"]),
    "metrics": ("src/histoscreen/scoring/metrics.py", ["tests/test_scoring.py"]),
}

COMPARISONS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}


def mutation_sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every (node, kind) that can be mutated; docstrings and constants in strings are left alone."""
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARISONS:
            sites.append((node, "compare"))
        elif isinstance(node, ast.BoolOp):
            sites.append((node, "boolop"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("any", "all"):
            sites.append((node, "anyall"))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            sites.append((node, "addsub"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            sites.append((node, "number"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            sites.append((node, "bool"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            sites.append((node, "not"))
    return sites


def mutate(node: ast.AST, kind: str) -> str:
    """Change `node` in place; returns what was done."""
    before = ast.unparse(node)
    if kind == "compare":
        node.ops = [COMPARISONS[type(node.ops[0])]()]
    elif kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "anyall":
        node.func.id = "all" if node.func.id == "any" else "any"
    elif kind == "addsub":
        node.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
    elif kind == "number":
        node.value = node.value + 1 if isinstance(node.value, int) else node.value * 2
    elif kind == "bool":
        node.value = not node.value
    elif kind == "not":
        node.operand = ast.UnaryOp(op=ast.Not(), operand=node.operand)  # `not x` -> `not not x`: the negation gone
    return f"{before}  ->  {ast.unparse(node)}"


def mutants(source: str, count: int, seed: int) -> list[tuple[int, str, str]]:
    """(site number, description, mutated source) for `count` sampled sites."""
    sites = len(mutation_sites(ast.parse(source)))
    chosen = sorted(random.Random(seed).sample(range(sites), min(count, sites)))
    found = []
    for number in chosen:
        tree = ast.parse(source)
        node, kind = mutation_sites(tree)[number]
        line = getattr(node, "lineno", 0)
        described = f"line {line}: {mutate(node, kind)}"
        found.append((number, described, ast.unparse(tree)))
    return found


def workspace(tests_ref: str | None) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="histoscreen-mutation-"))
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__"))
    if tests_ref is None:
        shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", tests_ref, "tests"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    for name in ("pyproject.toml",):
        shutil.copy(ROOT / name, folder / name)
    return folder


def tests_pass(folder: Path, tests: list[str], timeout: float) -> bool:
    environment = {"PYTHONPATH": str(folder / "src"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                   "HISTOSCREEN_CACHE": str(folder / "onnx-cache")}  # a mutant's graphs must never reach the user's cache
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=folder, env=environment, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False  # a mutant that hangs the tests is caught, by the clock
    return result.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", default=["tables", "uploads", "slides", "calibration"], choices=sorted(MODULES))
    parser.add_argument("--per-module", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tests-ref", help="take tests/ from this git revision (the tests before a change)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    folder = workspace(args.tests_ref)
    try:
        print(f"mutation run: tests from {args.tests_ref or 'the working tree'}; {args.per_module} sites a module, seed {args.seed}")
        totals = [0, 0]
        for name in args.modules:
            path, tests = MODULES[name]
            original = (ROOT / path).read_text()
            target = folder / path
            if not tests_pass(folder, tests, args.timeout):
                print(f"{name}: the tests fail without any mutant; skipped")
                continue
            survivors = []
            started = time.perf_counter()
            found = mutants(original, args.per_module, args.seed)
            for _, described, mutated in found:
                target.write_text(mutated)
                if tests_pass(folder, tests, args.timeout):
                    survivors.append(described)
            target.write_text(original)
            totals[0] += len(found)
            totals[1] += len(survivors)
            print(f"{name} ({path}): {len(found)} mutants, {len(survivors)} survived ({time.perf_counter() - started:.0f} s)")
            for described in survivors:
                print(f"  survived: {described}")
        print(f"all: {totals[0]} mutants, {totals[1]} survived")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
