"""The import contract of pyproject.toml's ``[tool.importlinter]``: sppcli above stages, stages.core below every stage
module, stage modules independent of each other (they share only artifacts, whose formats live in stages.core).
Run here, so that ``make test`` enforces it; and shown to fail on a copy of the tree with a planted violation."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the tree at ``root``: its pyproject.toml, its packages (the working directory goes first
    on sys.path), no cache directory left behind."""
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: install requirements.lock (import-linter)"
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=120)


def copy_tree(dest: Path) -> Path:
    for package in ("sppcli", "stages"):
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_every_stage_module_is_in_the_independence_contract():
    """The layers contract is exhaustive (import-linter checks it); the independence one is checked here."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independence = next(c for c in contracts if c["type"] == "independence")
    stages = REPO / "stages"
    on_disk = ({f"stages.{p.stem}" for p in stages.glob("*.py") if p.stem != "__init__"}
               | {f"stages.{p.parent.name}" for p in stages.glob("*/__init__.py")}) - {"stages.core"}
    assert sorted(independence["modules"]) == sorted(on_disk)


@pytest.mark.parametrize("path, line, broken, chain", [
    # The store once lived in the proposals stage and roidb imported it from there.
    ("stages/core/roidb.py", "from stages.proposals import ProposalStore", "stages.core sits below",
     "stages.core.roidb -> stages.proposals"),
    # train-bbox once took training_images from train-svm.
    ("stages/train_bbox.py", "from .train_svm import training_images", "Stage modules are independent",
     "stages.train_bbox -> stages.train_svm"),
    ("stages/core/errors.py", "import sppcli.cli", "The CLI sits above the stages", "stages.core.errors -> sppcli.cli"),
    # A new stage module not listed in the exhaustive layers contract.
    ("stages/new_stage.py", "from .core.errors import SppError", "stages.core sits below", "stages.new_stage"),
])
def test_a_violating_import_breaks_the_contract(tmp_path, path, line, broken, chain):
    root = copy_tree(tmp_path)
    target = root / path
    text = target.read_text() if target.exists() else ""
    target.write_text(f"{text}\n{line}  # planted by test_layers\n")
    result = lint_imports(root)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert any(broken in row and "BROKEN" in row for row in output.splitlines()), output
    assert chain in output  # the report names the planted import, so the copy, not the repo, was checked
