"""The engine is a house of floors: a module imports only from its own package and from the floors below it.

A unit is a subpackage (engine/rotation/) or a top-level module (engine/evaluate.py). FLOORS below lists them from
the ground up; a unit may import a unit on a lower floor, never one on its own floor or above. Every import
statement counts, also one inside a function (a lazy import still makes the lower floor depend on the upper one)
and importlib.import_module("..."). The source is read, nothing is imported. Also: the engine never imports the
app or streamlit (pages sit on top of the engine, and the CLI and the tests run it without a browser), and the
kernels never import the app either (tests/kernels/test_imports.py keeps kernels and engine apart).
"""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"

FLOORS = (
    ("store", "events", "assets"),  # the cache, the job events, files inside installed packages: import no engine
    ("model", "data"),  # architectures, loading, dispatch; corpora and zero-shot tasks
    ("rotation",),  # Hadamard matrices, orthogonal modules, fusion, rotation files
    ("quant",),  # formats, quantizers, GPTQ, applying them; recipes name rotations
    ("observe",),  # capture and statistics (the SQNR of a quantizer), before/after a rotation
    ("evaluate", "memory"),  # build a rotated, quantized model and measure it; what each job holds
    ("learn", "matrix"),  # training rotations (measured by evaluate), the format x rotation matrix
    ("export",),  # checkpoints of evaluated recipes
    ("__main__",),  # the CLI
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}

# Imports that climb a floor today and are being moved by work in flight; each names who removes it. A test below
# fails once an exception is no longer needed, so that it is deleted here too.
PENDING: set[tuple[str, str]] = set()


def _unit(path: Path) -> str:
    """engine/rotation/files.py -> 'rotation'; engine/evaluate.py -> 'evaluate'."""
    parts = path.relative_to(ENGINE).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def _imported_modules(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, at any depth, and every import_module("...")."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..model import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from engine import store` imports the module engine.store; `from engine.x import name` the module x
            found += [
                (f"{base}.{alias.name}" if base in ("engine", "app") else base, node.lineno) for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, node.lineno))
    return found


def _engine_files() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if p != ENGINE / "__init__.py")


@functools.lru_cache(maxsize=1)
def _climbs() -> list[tuple[str, str, str, int]]:
    """(file, its unit, the engine unit it imports, line) for every import of a unit on the same floor or above."""
    out = []
    for path in _engine_files():
        unit = _unit(path)
        for name, line in _imported_modules(path):
            parts = name.split(".")
            if parts[0] != "engine" or len(parts) < 2:
                continue
            target = parts[1]
            climb = (str(path.relative_to(ROOT)), unit, target, line)
            if target != unit and FLOOR.get(target, -1) >= FLOOR[unit] and climb not in out:
                out.append(climb)
    return out


def test_every_engine_unit_has_a_floor_and_every_floor_names_a_unit():
    units = {_unit(p) for p in _engine_files()}
    assert units - set(FLOOR) == set(), "a new engine package or module: give it its floor in FLOORS"
    assert set(FLOOR) - units == set(), "FLOORS names a unit that no longer exists"


def test_the_premise_holds_the_check_sees_imports_inside_functions():
    # engine/__main__.py imports its verbs' modules inside the functions that run them; the check must see those
    lazy = [(name, line) for name, line in _imported_modules(ENGINE / "__main__.py") if name == "engine.evaluate"]
    assert lazy, "engine/__main__.py imports engine.evaluate nowhere: update this test's premise"
    assert {_unit(ENGINE / "quant" / "apply.py"), _unit(ENGINE / "evaluate.py")} == {"quant", "evaluate"}


def test_no_engine_module_imports_a_unit_on_its_own_floor_or_above():
    climbing = [c for c in _climbs() if (c[0], c[2]) not in PENDING]
    assert climbing == [], "\n".join(
        f"{f}:{line}: {u} (floor {FLOOR[u]}) imports engine.{t} (floor {FLOOR[t]})" for f, u, t, line in climbing
    )


@pytest.mark.parametrize("exception", sorted(PENDING))
def test_each_pending_exception_is_still_needed(exception):
    assert exception in {(f, t) for f, _, t, _ in _climbs()}, (
        f"{exception[0]} no longer imports engine.{exception[1]}: delete its line from PENDING"
    )


@pytest.mark.parametrize("folder", ["engine", "kernels"])
def test_the_engine_and_the_kernels_never_import_the_app_or_streamlit(folder):
    found = [
        (str(p.relative_to(ROOT)), name, line)
        for p in sorted((ROOT / folder).rglob("*.py"))
        for name, line in _imported_modules(p)
        if name.split(".")[0] in ("app", "streamlit")
    ]
    assert found == []
