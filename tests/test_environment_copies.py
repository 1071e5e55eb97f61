"""Code the two locked environments must each carry (the drift transformer cannot import the core
packages): the copies stay identical apart from their module docstrings and package names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COPIES = [
    ("predictor/auth.py", "drift_transformer/drift_transformer/auth.py"),
    ("predictor/edge.py", "drift_transformer/drift_transformer/edge.py"),
    ("predictor/asgi.py", "drift_transformer/drift_transformer/asgi.py"),
]


def _code(path: Path) -> str:
    """The module's AST without its docstring, with the package name normalised."""
    tree = ast.parse(path.read_text().replace("drift_transformer.", "predictor."))
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return ast.dump(ast.Module(body=body, type_ignores=[]))


@pytest.mark.parametrize(("core", "drift"), COPIES)
def test_the_copies_in_both_environments_are_the_same_code(core, drift):
    assert _code(ROOT / core) == _code(ROOT / drift), f"{core} and {drift} have drifted apart: make them equal"


def test_the_check_sees_a_difference(tmp_path):
    changed = tmp_path / "auth.py"
    changed.write_text((ROOT / COPIES[0][1]).read_text().replace("401", "402", 1))
    assert _code(changed) != _code(ROOT / COPIES[0][0])
