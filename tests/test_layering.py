"""The dependency direction of the packages: mmldm_dit -> mmldm_ae -> mmldm_data, and none of them
imports the tools or the tests.

Every import is read from the source with `ast`, at any depth (a function-level import counts as
much as a top-level one) and including `importlib.import_module("...")` / `__import__("...")` with
a literal name, so a lazy import cannot hide a dependency the wrong way.
"""

from __future__ import annotations

import ast

import pytest
from conftest import REPO_ROOT

SOURCES = {
    path.name: path for path in sorted(REPO_ROOT.glob("packages/*/src/*")) if (path / "__init__.py").is_file()
}
# What each package must never import; the tools' and tests' own modules are importable by bare name too.
NOT_TOOLS = {
    "tools",
    "tests",
    *(path.stem for path in (REPO_ROOT / "tools").glob("*.py")),
    *(path.stem for path in (REPO_ROOT / "tests").glob("*.py")),
}
FORBIDDEN = {
    "mmldm_data": {"mmldm_ae", "mmldm_dit"} | NOT_TOOLS,
    "mmldm_ae": {"mmldm_dit"} | NOT_TOOLS,
    "mmldm_dit": NOT_TOOLS,
}
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the source of `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            )
            name = ".".join(part for part in (base, node.module) if part)
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = (
                node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            )
            if function in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(name: str) -> list[str]:
    """`file:line imports module` for each import of package `name` that goes against the layering."""
    root = SOURCES[name]
    bad = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for line, imported in imported_modules(path.read_text(), module, is_package):
            if imported.split(".")[0] in FORBIDDEN[name]:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {imported}")
    return bad


def test_every_package_is_checked():
    assert set(SOURCES) == set(FORBIDDEN)


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_package_imports_only_earlier_stages(name: str):
    bad = violations(name)
    assert not bad, f"{name} imports against dit -> ae -> data, or the tools / tests:\n" + "\n".join(bad)


def test_imports_are_found_at_any_depth_and_by_name():
    source = """
import numpy
from . import sibling
from ..metrics import fad


def lazy():
    import mmldm_ae.pipeline
    from mmldm_dit import generate
    importlib.import_module("mmldm_ae")
    __import__("tools.demo")
    return getattr(numpy, "import_module")("not a module call")
"""
    found = [name for _, name in imported_modules(source, "mmldm_data.evaluation.report", is_package=False)]
    assert sorted(found) == sorted(
        [
            "numpy",
            "mmldm_data.evaluation",
            "mmldm_data.metrics",
            "mmldm_ae.pipeline",
            "mmldm_dit",
            "mmldm_ae",
            "tools.demo",
        ]
    )
