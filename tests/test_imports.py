"""The layers of rednet/, read from the source: every import of the project's own modules points
down (or sideways within a layer), none runs in a circle, and an import inside a function is
left only where it avoids a heavy optional dependency, with its reason on the line."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# From the ground up; README.md, "Development", says the same in words.
LAYERS = [
    ["rednet.errors", "rednet.io", "rednet.commands"],
    ["rednet.ops"],
    ["rednet.models", "rednet.data", "rednet.metrics"],
    ["rednet.viz"],  # draws models' kernels, and the figures the trainer logs
    ["rednet.config"],  # the schema checks data and model names against their registries
    ["rednet.engine"],
    ["rednet.deploy", "rednet.integrations", "rednet.visualize", "rednet.predict"],
    ["rednet.cli"],
    ["rednet"],  # the package's own __init__: the public API
]


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path):
    """(imported module, line number, inside a function) for each import of rednet.* in ``path``."""
    tree = ast.parse(path.read_text())
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: the project imports by absolute name"
            base = node.module or ""
            # `from rednet.data import cifar` imports the submodule rednet.data.cifar
            names = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == "rednet" or name.startswith("rednet."):
                yield name, node.lineno, id(node) in in_function


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def source_files():
    return sorted((ROOT / "rednet").rglob("*.py"))


def graph():
    return {module_name(f): {name for name, _, _ in project_imports(f)} for f in source_files()}


def test_every_import_points_down():
    upward = []
    for f in source_files():
        here = module_name(f)
        for name, line, _ in project_imports(f):
            if layer_of(name) > layer_of(here):
                upward.append(f"{f.relative_to(ROOT)}:{line} ({here}) imports {name}, a higher layer")
    assert upward == []


def test_no_import_circles():
    edges = graph()
    # A package's __init__ re-exports its modules: importing `rednet.data` runs them, so the edge
    # from a module to its own package is not a circle of code that needs the other first.
    def targets(module):
        for name in edges.get(module, ()):
            while name not in edges and "." in name:
                name = name.rpartition(".")[0]
            if name != module and not module.startswith(name + "."):
                yield name

    circles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in targets(module):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_imports_inside_functions_are_few_and_say_why():
    found = []
    for f in source_files():
        lines = f.read_text().splitlines()
        for name, line, inside in project_imports(f):
            if inside:
                found.append((f.relative_to(ROOT), line, name, "#" in lines[line - 1]))
    unexplained = [f"{f}:{line} imports {name} inside a function without a # reason" for f, line, name, why in found
                   if not why]
    assert unexplained == []
    assert len(found) <= 5, found


@pytest.mark.parametrize("module,layer", [("rednet.io", 0), ("rednet.models.resnet", 2), ("rednet.engine.trainer", 5),
                                          ("rednet.cli", 7)])
def test_layer_lookup(module, layer):
    assert layer_of(module) == layer
