"""The dependency direction DESIGN.md draws, checked on every import statement of the package.

    CLI -> simulation -> server | client -> deploy -> kernel;  server -> strategies -> kernel

The server never imports the client or the simulation (and the reverse), nothing but the
CLI imports the simulation, the kernel imports no role, its pure math (compression/,
privacy/, secagg/, aggregation, rng) imports neither Flower nor a role, and the
coordination server runs without matplotlib.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Role folder -> the fedge subpackage it is installed as.
ROLES = {"server": "fedge.server", "client": "fedge.client", "strategies": "fedge.strategies"}
ROLES.update({"simulation": "fedge.simulation", "deploy": "fedge.deploy"})
# What each role may import of the other roles.
ALLOWED = {
    "fedge.server": {"fedge.strategies", "fedge.deploy"},
    "fedge.client": {"fedge.deploy"},
    "fedge.strategies": set(),
    "fedge.deploy": set(),
    "fedge.simulation": {"fedge.server", "fedge.client", "fedge.strategies", "fedge.deploy"},
    "fedge": set(),  # the kernel (fedge/cli.py, which sees every role, is exempt)
}
PURE_MATH = ("fedge/compression/", "fedge/privacy/", "fedge/secagg/", "fedge/aggregation.py", "fedge/rng.py")


def _modules() -> list[tuple[Path, str]]:
    out = []
    for folder, package in [("fedge", "fedge"), *ROLES.items()]:
        for path in sorted((REPO / folder).rglob("*.py")):
            out.append((path, package))
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by ``path`` (function-level imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.module, node.lineno))
    return names


def _role_of(module: str) -> str | None:
    for role in ROLES.values():
        if module == role or module.startswith(role + "."):
            return role
    return None


@pytest.mark.parametrize(("path", "package"), _modules(), ids=lambda v: str(v).replace(str(REPO) + "/", ""))
def test_dependencies_run_one_way(path: Path, package: str) -> None:
    rel = path.relative_to(REPO).as_posix()
    if rel == "fedge/cli.py":
        return
    for module, line in _imports(path):
        target = _role_of(module)
        if target is not None and target != package:
            assert target in ALLOWED[package], (
                f"{rel}:{line} imports {module}: {package} may not import {target}"
            )
        if rel.startswith(PURE_MATH):
            assert not module.startswith("flwr") and _role_of(module) is None, (
                f"{rel}:{line} imports {module}: pure math imports neither Flower nor a role"
            )
        if package == "fedge.server":
            assert not module.startswith("matplotlib"), (
                f"{rel}:{line}: the server must run without matplotlib"
            )


def test_the_check_sees_the_package() -> None:
    # Guards against the test passing vacuously on an empty or moved tree.
    rels = {p.relative_to(REPO).as_posix() for p, _ in _modules()}
    assert {"server/loop.py", "client/app.py", "simulation/grid.py", "fedge/rng.py"} <= rels
    assert ("fedge.strategies", 0) not in _imports(REPO / "server/loop.py")
    assert any(m == "fedge.strategies" for m, _ in _imports(REPO / "server/loop.py"))
