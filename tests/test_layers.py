"""The package's layers import only downward (the import-linter contract in pyproject.toml), and every module of
the package has its place in that contract."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ernie_lab.config import PROJECT_ROOT


def test_import_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(PROJECT_ROOT / "pyproject.toml")], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_module_of_the_package_is_in_a_layer():
    text = (PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    layered = set(re.findall(r"ernie_lab\.(\w+)", text.split("[tool.importlinter]", 1)[1]))
    package = PROJECT_ROOT / "ernie_lab"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    assert modules - layered == set(), "add these modules to a layer of [tool.importlinter] in pyproject.toml"
