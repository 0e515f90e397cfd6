"""No import cycle between kernels/ and engine/: the direction is kernels -> engine.rotation.hadamard only.

The rule (kernels/launch.py's module doc): a kernels module may import one engine module, engine.rotation.hadamard
(the H_K tables, a leaf that imports nothing of ours), and engine imports kernels only inside the functions that
run a kernel, never at module level. Each test below proves one half of it in a fresh interpreter, where an
import hook makes the other side unimportable; the last two read the source, so that an import hidden inside a
function or behind importlib.import_module("...") cannot slip past either.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_MODULES = sorted(f"kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")
ENGINE_ALLOWED = ("engine", "engine.rotation", "engine.rotation.hadamard")  # the packages and the leaf module
# The bare `kernels` package (an empty __init__.py) may be imported by engine's imports: transformers probes for
# Hugging Face's own `kernels` package by that name at import time and, where ours has no install metadata (a plain
# checkout on PYTHONPATH, as on the GPU machine), imports ours to read its version. Importing it runs nothing.
KERNELS_ALLOWED = ("kernels",)

# Each probe runs in a fresh process: a child forked from one interpreter that has imported the heavy third-party
# packages (torch, transformers, triton: seconds each on 2 cores; what they pulled in of ours, if anything, is
# dropped before the first fork, so a child starts with no module of ours). The child makes every module under
# `prefix` except `allowed` fail to import (it is still found, as a probe such as importlib.util.find_spec sees it,
# but executing it raises ImportError and is recorded), imports `target`, and reports the modules under `prefix`
# that were imported and the blocked ones that something tried to.
PROBE = """
import importlib, importlib.abc, json, os, sys
for heavy in ("torch", "transformers", "triton"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
for name in [m for m in sys.modules if m.split(".")[0] in ("engine", "kernels", "app")]:
    del sys.modules[name]

class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, prefix, allowed):
        self.prefix, self.allowed, self.attempts = prefix, allowed, []

    def find_spec(self, name, path=None, target=None):
        if not (name == self.prefix or name.startswith(self.prefix + ".")) or name in self.allowed:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.attempts.append(module.__name__)
        raise ImportError(f"{module.__name__} is blocked by tests/kernels/test_imports.py")

results = []
for target, prefix, allowed in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one probe, then gone
        os.close(read)
        try:
            block = Block(prefix, set(allowed))
            sys.meta_path.insert(0, block)
            importlib.import_module(target)
            loaded = sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))
            out = {"loaded": loaded, "attempts": block.attempts}
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    results.append(json.loads(b"".join(chunks)))
print(json.dumps(results))
"""

pytestmark = pytest.mark.slow  # a process that imports torch and transformers, and a fork per probe


def _engine_modules_naming_kernels() -> list[str]:
    found = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        if "kernels" in path.read_text():
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
    return found


# (target, prefix blocked, allowed): every probe the tests below make, run together by the `probes` fixture
PROBES = (
    [(m, "engine", ENGINE_ALLOWED) for m in KERNEL_MODULES]
    + [("engine.rotation.hadamard", "kernels", ())]
    + [(m, "kernels", KERNELS_ALLOWED) for m in _engine_modules_naming_kernels()]
)


@pytest.fixture(scope="module")
def probes() -> dict:
    """{(target, prefix): probe result} of every PROBES entry, from one process that forks a child per probe."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([[t, p, list(a)] for t, p, a in PROBES])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"the import probes failed:\n{done.stderr[-3000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {(t, p): r for (t, p, _), r in zip(PROBES, results, strict=True)}


def _import_with_blocked(probes: dict, target: str, prefix: str) -> list[str]:
    """The modules under prefix that importing target imports; fails if it tried to import a blocked one."""
    result = probes[target, prefix]
    assert "error" not in result, f"importing {target} with {prefix} blocked failed: {result['error']}"
    assert result["attempts"] == [], f"importing {target} tried to import {result['attempts']} (caught or not)"
    return result["loaded"]


def test_the_module_lists_are_not_empty():
    assert {"kernels.launch", "kernels.blockdiag", "kernels.rotate_quant", "kernels.hadamard"} <= set(KERNEL_MODULES)
    assert _engine_modules_naming_kernels(), "no engine module imports kernels: update this test's premise"


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_module_imports_no_engine_module_but_the_hadamard_tables(probes, module):
    loaded = _import_with_blocked(probes, module, "engine")
    assert set(loaded) <= set(ENGINE_ALLOWED), loaded


def test_the_allowed_engine_module_imports_no_kernels(probes):
    # the one edge kernels -> engine ends at a leaf: importing it never comes back to kernels
    assert _import_with_blocked(probes, "engine.rotation.hadamard", "kernels") == []


@pytest.mark.parametrize("module", _engine_modules_naming_kernels())
def test_engine_module_imports_no_kernels_at_import_time(probes, module):
    assert set(_import_with_blocked(probes, module, "kernels")) <= set(KERNELS_ALLOWED)


def test_the_kernels_package_itself_imports_nothing():
    # what makes KERNELS_ALLOWED safe: importing the bare package cannot pull in a kernel module (or engine)
    assert _imports(ROOT / "kernels" / "__init__.py") == []


def _imports(path: Path):
    """(module name, runs at import time) for each import statement and import_module("...") call in the file;
    an import inside a def or lambda runs when it is called, one anywhere else (module, class or if body) at import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        found.extend((name, not in_function) for name in names)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def test_kernels_source_names_no_other_engine_module_even_lazily():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for name, _at_import_time in _imports(path):
            if name == "engine" or name.startswith("engine."):
                assert name in ENGINE_ALLOWED or name.startswith("engine.rotation.hadamard."), (
                    f"{path.relative_to(ROOT)} imports {name}; kernels may import only engine.rotation.hadamard"
                )


def test_engine_imports_kernels_only_inside_functions():
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for name, at_import_time in _imports(path):
            if name == "kernels" or name.startswith("kernels."):
                assert not at_import_time, (
                    f"{path.relative_to(ROOT)} imports {name} at module level; import it "
                    "inside the function that runs the kernel"
                )
