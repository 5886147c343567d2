"""The import layers of DESIGN.md hold: each package imports only what sits below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package -> prefixes it must never import (directly or lazily inside a function).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "streamrec/serving": ("streamrec.pipeline", "deployments", "ray.serve"),
    "streamrec/service": ("streamrec.pipeline", "deployments", "ray.serve"),
    "streamrec/pipeline": ("streamrec.serving", "streamrec.service", "deployments"),
    "streamrec/funnel": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "deployments"),
    "streamrec/retrieval": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "streamrec.funnel"),
    "streamrec/ranking": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "streamrec.funnel"),
    "streamrec/reranking": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "streamrec.funnel"),
    "streamrec/data": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "streamrec.funnel"),
    "streamrec/features": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "streamrec.funnel"),
    "streamrec/models": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "streamrec.funnel"),
    "streamrec/experiments": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "deployments", "ray.serve"),
    "streamrec/evaluation": ("streamrec.serving", "streamrec.service", "streamrec.pipeline", "streamrec.funnel"),
}


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    bad = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(p)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, "layer violations (DESIGN.md, 'Layers'):\n" + "\n".join(bad)


def test_deployments_hold_only_serve_wrappers() -> None:
    names = sorted(p.name for p in (ROOT / "deployments").glob("*.py"))
    assert names == ["__init__.py", "app.py", "config.py"], names
