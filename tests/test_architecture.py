"""Rules of the codebase that are checked, not just written down."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "kvstudio" / "core"
QT_MODULES = ("PySide6", "pyqtgraph", "shiboken6", "PyQt5", "PyQt6")


def test_core_source_never_imports_qt():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in QT_MODULES]
    assert not offenders


def test_running_the_core_loads_no_qt():
    code = (
        "import sys\n"
        "from kvstudio.core.runtime.engine import Engine, GenerationSettings\n"
        "from kvstudio.core.models.loading import load_model\n"
        "from kvstudio.core.spec import create_policy\n"
        "Engine(load_model('tiny-llama')).generate([1, 2, 3], create_policy('window', budget=2),"
        " GenerationSettings(max_new_tokens=3))\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {QT_MODULES!r}])\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_import_contracts_hold():
    """The layers in pyproject.toml's [tool.importlinter] (docs/architecture.md): a cycle or an import
    against the direction fails here, with lint-imports' report of the offending chain."""
    root = Path(__file__).resolve().parents[1]
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), str(root / "pyproject.toml")], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Function-level imports of kvstudio's own modules that defer something heavy or break a real cycle.
DEFERRED_IMPORTS = {
    "kvstudio/core/storage/base.py": "kvstudio.core.storage (the package imports this module: a real cycle)",
    "kvstudio/gui/app.py": "the main window and model loading, after Qt's application object exists",
}


def test_core_and_studio_import_their_own_modules_at_the_top():
    """The CLI defers its imports (`kvstudio --help` must not wait for torch); core and the studio
    import torch anyway, so an import inside one of their functions only hides a dependency."""
    package = Path(__file__).resolve().parent.parent / "kvstudio"
    inside = []
    for path in sorted([*package.glob("core/**/*.py"), *package.glob("gui/**/*.py")]):
        relative = str(path.relative_to(package.parent))
        if relative in DEFERRED_IMPORTS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{relative}:{sub.lineno} {sub.module}" for sub in ast.walk(node)
                           if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("kvstudio")]
    assert inside == []
