"""The package's parts depend on each other in one direction only, and import what they need.

Read from the source with ``ast`` (nothing imported), so a new import that crosses a part's
boundary upward fails here, with the file and the import named.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tamp_modifier"

# What each part may import from the package besides itself. The shared modules at the top
# (validation, text_decoder, calibration_data) need nothing of the package.
ALLOWED = {
    "validation": set(),
    "text_decoder": set(),
    "calibration_data": set(),
    "plugin": set(),
    "pruning": {"validation"},
    "report": {"validation", "pruning"},
    "token_pruning": {"validation"},
    "deploy": {"validation", "pruning", "report", "text_decoder"},
    "modifiers": {"validation", "pruning", "report", "deploy", "text_decoder"},
    "testing": {"validation", "pruning", "modifiers", "text_decoder", "calibration_data"},
    "demo": {"validation", "deploy", "testing", "text_decoder"},
    "cli": {"validation", "pruning", "report", "deploy", "text_decoder", "calibration_data", "demo",
            "modifiers"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, part) for every ``tamp_modifier.X`` import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "tamp_modifier" and len(pieces) > 1:
                found.append((node.lineno, pieces[1]))
    return found


def test_every_module_belongs_to_a_known_part():
    parts = {_part(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert parts <= set(ALLOWED), f"parts without a rule here: {sorted(parts - set(ALLOWED))}"


def test_parts_import_only_downward():
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue  # the package's front names the public functions of every part
        part = _part(path)
        for line, other in _imported_parts(path):
            if other != part and other not in ALLOWED[part]:
                crossings.append(f"{path.relative_to(PACKAGE)}:{line} imports tamp_modifier.{other}")
    assert not crossings, "\n".join(crossings)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("module", ["tamp_modifier", "tamp_modifier.token_pruning",
                                    "tamp_modifier.pruning.diversity", "tamp_modifier.report.saved"])
def test_importing_a_part_that_needs_no_llm_compressor_does_not_load_it(module):
    run = _python(f"import sys, {module}; print('llmcompressor' in sys.modules)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


@pytest.mark.parametrize("order", ["tamp_modifier first", "llmcompressor first"])
def test_recipes_can_name_our_modifiers_whichever_is_imported_first(order):
    first, second = ("tamp_modifier", "llmcompressor") if order == "tamp_modifier first" else (
        "llmcompressor", "tamp_modifier")
    run = _python(
        f"import {first}, {second}\n"
        "from llmcompressor.modifiers import ModifierFactory\n"
        "m = ModifierFactory.create('DiversityAwareSparsity', allow_registered=True,"
        " allow_experimental=False, sparsity=0.5)\n"
        "print(type(m).__module__)"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "tamp_modifier.modifiers.diversity_aware_sparsity"
