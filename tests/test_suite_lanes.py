"""The fast lane stays fast: every test that starts a process (a CLI, a launcher, a training run) is marked
`slow`, directly or through its module, so `pytest -m "not slow"` runs none of them (README, Development).

Read from the tests' syntax trees: a test launches when its body, a helper function of its module that it
calls, or a fixture it requests (from its module or conftest.py) calls `run_module`, `accelerate_launch`,
`launch_cmd` or anything in `subprocess`.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LAUNCHERS = {"run_module", "accelerate_launch", "launch_cmd"}


def _launches_directly(fn: ast.FunctionDef) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if name in LAUNCHERS or owner == "subprocess":
                return True
    return False


def _called_names(fn: ast.FunctionDef) -> set[str]:
    return {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _is_slow(decorators: list[ast.expr]) -> bool:
    return any("mark.slow" in ast.unparse(d) for d in decorators)


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _launchers(functions: dict[str, ast.FunctionDef]) -> set[str]:
    """Names of the functions that launch, directly or through other functions in `functions`."""
    found = {name for name, fn in functions.items() if _launches_directly(fn)}
    while True:
        more = {name for name, fn in functions.items() if name not in found and _called_names(fn) & found}
        if not more:
            return found
        found |= more


def unmarked_launching_tests() -> list[str]:
    conftest = _functions(ast.parse((TESTS / "conftest.py").read_text()))
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_slow = any(
            isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
            and "slow" in ast.unparse(n.value)
            for n in tree.body
        )
        if module_slow:
            continue
        functions = {**conftest, **_functions(tree)}
        launching = _launchers(functions)
        for name, fn in _functions(tree).items():
            if not name.startswith("test_") or _is_slow(fn.decorator_list):
                continue
            fixtures = {a.arg for a in fn.args.args}
            if name in launching or fixtures & launching:
                offenders.append(f"{path.name}::{name}")
    return offenders


def test_every_test_that_starts_a_process_is_marked_slow():
    assert unmarked_launching_tests() == []


def test_the_audit_sees_launches_through_helpers_and_fixtures():
    source = (
        "import subprocess\n"
        "def helper():\n    subprocess.run(['true'])\n"
        "def test_direct():\n    run_module('x')\n"
        "def test_through_helper():\n    helper()\n"
        "def test_plain():\n    assert 1\n"
    )
    functions = _functions(ast.parse(source))
    assert _launchers(functions) == {"helper", "test_direct", "test_through_helper"}
