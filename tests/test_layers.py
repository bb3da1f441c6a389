"""Imports run one way: cli -> pipelines -> library, never back (README, Development)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each folder of the repository, the installed package it becomes, and the layers above it.
INSTALLED = {"logitstore": "logitstore", "pipelines": "logitstore.pipelines"}
ABOVE = {
    "logitstore": ("logitstore.pipelines", "logitstore.cli", "logitstore.benchmarks"),
    "pipelines": ("logitstore.cli", "logitstore.benchmarks"),
}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-local imports too), as absolute
    names: ``from X import name`` also counts as ``X.name`` (it may be a module), and a
    relative import is resolved against ``package``, the file's own package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def package_of(path: Path, folder: str) -> str:
    inner = path.relative_to(ROOT / folder).parent.parts
    return ".".join((INSTALLED[folder], *inner))


@pytest.mark.parametrize("folder", sorted(ABOVE))
def test_no_module_imports_a_layer_above_its_own(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no modules found under {folder}/"
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in imported_modules(path, package_of(path, folder))
        if any(name == top or name.startswith(top + ".") for top in ABOVE[folder])
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("def f():\n    from logitstore.pipelines._student import x\n", "logitstore",
         "logitstore.pipelines._student"),
        ("from logitstore import pipelines\n", "logitstore", "logitstore.pipelines"),
        ("from .pipelines import train\n", "logitstore", "logitstore.pipelines"),
        ("from ..cli import main\n", "logitstore.pipelines", "logitstore.cli"),
        ("import logitstore.cli as c\n", "logitstore", "logitstore.cli"),
    ],
)  # fmt: skip
def test_the_check_sees_every_form_of_import(tmp_path, source, package, expected):
    module = tmp_path / "m.py"
    module.write_text(source)
    assert expected in [name for _, name in imported_modules(module, package)]
