"""The shape of the code: Ray behind one package, imports that flow one way, light commands.

Read from the source (``ast``), so every import counts, function-level ones included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Each role imports only roles to its left (or itself): the folder tree is the diagram.
LAYERS = ["config", "io", "model", "stages", "demo", "training", "backend", "report",
          "inference", "evaluation", "ops", "cli"]
# Leaves every layer may use: the one door to storage URIs, the model's input/output numbers,
# and the errors that carry the command line's exit status.
FOUNDATION = {"pipeline.io.storage", "pipeline.model.geometry", "pipeline.config.errors"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = _modules()
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name}
         for name, path in MODULES.items()}


def test_the_tree_is_the_architecture():
    flat = [n for n in MODULES if n.count(".") == 1 and n.split(".")[1] not in LAYERS]
    assert not flat, f"modules directly in pipeline/: {flat}"
    assert {n.split(".")[1] for n in MODULES if "." in n} == set(LAYERS)


def test_only_the_backend_imports_ray():
    importers = {name for name, path in MODULES.items()
                 if any(m == "ray" or m.startswith("ray.") for m in _imports(path))}
    assert importers, "no module imports Ray: the check would see nothing"
    assert {n for n in importers if not n.startswith("pipeline.backend.")} == set()


def test_no_import_cycles():
    assert len(GRAPH) > 40 and sum(map(len, GRAPH.values())) > 100  # the scan sees the code
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_imports_flow_one_way():
    def layer(name: str) -> int:
        return LAYERS.index(name.split(".")[1]) if name.count(".") >= 1 else -1

    assert all(GRAPH[m] <= FOUNDATION for m in FOUNDATION), \
        "a foundation module imports the pipeline (beyond another foundation module)"
    upward = [f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
              if layer(b) > layer(a) and b not in FOUNDATION]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


LIGHT = """
import sys
from pipeline.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
heavy = sorted(m for m in ("torch", "torchvision", "ray") if m in sys.modules)
print(f"heavy={heavy}")
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [
    ["ledger", "--output", "{tmp}/out"],  # reads the ledger only
    ["submit", "--help"],
    ["nightly", "--help"],  # a job's parser: its config dataclass, no model
    ["finetune", "--help"],
])
def test_light_commands_do_not_import_torch(tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "heavy=[]"
