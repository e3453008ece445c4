"""The package reads as the pipeline: each layer imports only from itself and the layers below it.

The layers, lowest first (README, "Layout of the code"): every import in jaxalign/, at module level or
inside a function, is checked against this order.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxalign"
LAYERS = [
    {"errors"},
    {"runtime"},
    {"config"},
    {"data"},
    {"models"},
    {"train"},
    {"checkpoint"},
    {"run"},
    {"plan", "eval"},
    {"export"},
    {"pipeline"},
    {"cli"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit(module: str) -> str:
    """jaxalign.run.loop -> "run"; jaxalign.cli -> "cli"."""
    return module.split(".")[1]


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every jaxalign import in a file; `from jaxalign import x` counts as jaxalign.x."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jaxalign":
                out += [(node.lineno, f"jaxalign.{a.name}") for a in node.names]
            elif node.module.startswith("jaxalign."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("jaxalign.")]
    return out


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if len(parts) > 1:
            yield path, ".".join(parts)


def test_every_module_sits_in_a_layer():
    assert {unit(name) for _, name in modules()} == set(LEVEL)


@pytest.mark.parametrize("path,name", list(modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_no_upward_import(path, name):
    here = LEVEL[unit(name)]
    upward = [f"line {line}: {target} ({unit(target)} sits above {unit(name)})"
              for line, target in imports(path) if LEVEL[unit(target)] > here]
    assert not upward, f"{name}: " + "; ".join(upward)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
