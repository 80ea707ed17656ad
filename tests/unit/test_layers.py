"""The code's shape, checked: no module imports another module's private name (the
layers themselves are import-linter's contract in pyproject.toml, run by `make lint`)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "embedfill"


def _private_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if not node.level and not (node.module or "").startswith("embedfill"):
                continue  # another package's names are its own business
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
                    found.append(f"{where} imports {alias.name} from {node.module or '.'}")
    return found


def test_no_module_imports_another_modules_private_name() -> None:
    assert _private_imports() == []
