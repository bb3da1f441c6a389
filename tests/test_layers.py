"""Imports run one way: cli -> pipelines -> library, never back (README, Development)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders of the repository and the layers above each one, as installed names.
ABOVE = {
    "logitstore": ("logitstore.pipelines", "logitstore.cli", "logitstore.benchmarks"),
    "pipelines": ("logitstore.cli", "logitstore.benchmarks"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, at any depth (function-local imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("folder", sorted(ABOVE))
def test_no_module_imports_a_layer_above_its_own(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no modules found under {folder}/"
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in imported_modules(path)
        if any(name == top or name.startswith(top + ".") for top in ABOVE[folder])
    ]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from logitstore.pipelines._student import x\n")
    assert (2, "logitstore.pipelines._student") in imported_modules(module)
