"""The map stays true: every package's docstring names each of its modules and subpackages, and every
folder of Python code under our import packages is a package (docs/architecture.md points readers there)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP = ("sglang_pd", "router", "transfer", "pd_kernels", "pd_common")


def _packages() -> list[Path]:
    return sorted(
        d
        for top in TOP
        for d in [REPO / top, *(REPO / top).rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    )


@pytest.mark.parametrize("pkg", _packages(), ids=lambda p: str(p.relative_to(REPO)))
def test_package_docstring_maps_its_modules(pkg: Path):
    init = pkg / "__init__.py"
    assert init.exists(), f"{pkg.relative_to(REPO)} holds Python modules but is not a package"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    names = [m.stem for m in pkg.glob("*.py") if m.stem != "__init__"]
    names += [d.name for d in pkg.iterdir() if (d / "__init__.py").exists()]
    missing = sorted(n for n in names if n not in doc)
    assert not missing, f"{init.relative_to(REPO)} does not mention: {', '.join(missing)}"


def test_architecture_map_exists_and_names_every_package():
    text = (REPO / "docs" / "architecture.md").read_text()
    for top in TOP:
        assert f"{top}/" in text, top
