"""The package's architecture, held against its code: imports run one way, from the command line
down to the ground, with no circle; and every function is short enough to hold in one's head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ftcli"

# Lowest first. A module may import modules of its own layer or of lower ones, never of higher ones.
LAYERS = [
    ("ground", ["errors", "fileio", "runtime", "hub", "extras", "formats", "tasks", "metrics"]),
    ("schema", ["config"]),
    ("data and models", ["data", "modeling", "lora", "students"]),
    ("objective and run directories", ["objective", "runs"]),
    ("forward passes and reading runs", ["inference", "onnx_predict", "reporting"]),
    ("training", ["training"]),
    ("commands", ["commands", "serving"]),
    ("terminal", ["ui", "launch"]),
    ("command line", ["cli", "__main__"]),
]
MAX_FUNCTION_LINES = 70


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")


def imports_of(path: Path) -> set[str]:
    """Every ftcli module the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftcli"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).exists()}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ftcli")}
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if module_name(path) != "ftcli"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    own = layer_of(module)
    higher = [name for name in imports_of(MODULES[module]) if name != "ftcli" and layer_of(name) > own]
    assert not higher, f"{module} ({LAYERS[own][0]}) imports {higher} from a higher layer"


def test_the_import_graph_has_no_circle():
    graph = {module: {name for name in imports_of(path) if name in MODULES} for module, path in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(module):] + [module]))
        if module in done:
            return
        for name in graph[module]:
            visit(name, trail + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_the_layers_are_not_vacuous():
    """The checks above would pass on an empty package: they must see the imports that exist."""
    assert "ftcli.training.job" in imports_of(MODULES["ftcli.training.recipe"])
    assert len(MODULES) > 40


def test_no_function_is_longer_than_seventy_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in MODULES.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long
