"""The layering (docs/architecture.md) holds: import-linter's contracts in pyproject.toml,
module-level imports only, and scripts that are the `memtrain` command (benchmarks included:
`memtrain bench ...`; the smoke harness lives in tools/, outside the package)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"  # import-linter's command, from the dev extra
    proc = subprocess.run([str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"Contracts: 2 kept, 0 broken", proc.stdout)


def _function_level_memtrain_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("memtrain"):
                    found.append(f"{path.relative_to(REPO)}:{inner.lineno} {inner.module}")
    return found


def test_memtrain_imports_are_at_module_level():
    files = [f for folder in ("memtrain", "scripts", "tools") for f in sorted((REPO / folder).rglob("*.py"))]
    hidden = [hit for f in files for hit in _function_level_memtrain_imports(f)]
    assert hidden == []


def _memtrain_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m for m in modules if m == "memtrain" or m.startswith("memtrain.")}


def test_scripts_are_the_memtrain_command():
    """Every script is `memtrain <command>` (it imports memtrain.commands only); the prepared GPU
    check is the one script of its own: its Command (memtrain.commands.bench.GPU_CHECK), standalone."""
    for script in sorted((REPO / "scripts").glob("*.py")):
        modules = _memtrain_imports(script)
        allowed = {"memtrain.commands"}
        if script.name == "gpu_check.py":  # the check's own Command, run standalone
            allowed = {"memtrain.commands", "memtrain.commands.bench"}
        assert modules <= allowed, (script.name, modules - allowed)


def test_scripts_and_modules_stay_short():
    for script in (REPO / "scripts").glob("*.py"):
        assert len(script.read_text().splitlines()) <= 50, script.name
    for module in (REPO / "memtrain").rglob("*.py"):
        lines = module.read_text().splitlines()
        # a longer module says why at its top
        assert len(lines) <= 400 or "Longer than" in "\n".join(lines[:30]), (module, len(lines))
