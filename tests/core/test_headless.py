"""unitscale_core never imports Qt (DESIGN.md: the core is headless)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import unitscale_core

QT_MODULES = ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "superqt", "qtpy", "app")


def test_importing_every_core_module_loads_no_qt():
    names = [m.name for m in pkgutil.walk_packages(unitscale_core.__path__, "unitscale_core.")]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {QT_MODULES!r})\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert "unitscale_core.cli" in names and "unitscale_core.model.transformer" in names


def test_no_qt_import_statement_in_core_sources():
    root = Path(unitscale_core.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in QT_MODULES for m in mods), (path, mods)
