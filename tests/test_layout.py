"""The import map of the ``itune`` package, read from the source (every import statement,
function-local ones included), so that a layer never reaches up into one built on it:

    itune.model, itune.data   the model and the input pipeline
    itune.convert             model formats in and out (itune, Hugging Face, GGUF, workdirs)
    itune.evaluation          scoring and generation
    itune.training            the train step and loop
    itune.cli                 the commands, which nothing else imports

The top-level modules (``itune.sharding``, ``itune.configlib``...) are nodes of their own.
"""

import ast
import pathlib

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "itune"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: pathlib.Path) -> set[str]:
    """The ``itune`` modules that the file at ``path`` imports, anywhere in it.

    ``from itune.x import y`` counts as ``itune.x.y`` when ``y`` is a module, else as ``itune.x``.
    """
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # Relative: from the package, up level - 1 packages.
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                out.add(name if _is_module(name) else base)
    return {m for m in out if m == "itune" or m.startswith("itune.")}


def node_of(module: str) -> str:
    """The node of the package graph a module belongs to: ``itune.<subpackage>``, or the
    top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _graph() -> dict[str, set[str]]:
    """{module: {imported module: ...}} for every module of the package."""
    return {
        _module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))
    }


GRAPH = _graph()
NODES = sorted({node_of(m) for m in GRAPH})


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if node_of(module) in importers
        for target in targets
        if node_of(target) in forbidden
    )


# name: (the packages, the packages they must never import)
RULES = {
    "convert_below_training": (("itune.convert",), ("itune.training", "itune.cli")),
    "model_and_data_at_the_bottom": (
        ("itune.model", "itune.data"),
        ("itune.training", "itune.convert", "itune.cli", "itune.evaluation"),
    ),
    "commands_at_the_top": (tuple(n for n in NODES if n != "itune.cli"), ("itune.cli",)),
}


def test_the_import_map_reads_every_module():
    assert {"itune.cli", "itune.convert", "itune.data", "itune.model", "itune.training"} <= {
        node_of(m) for m in GRAPH
    }
    assert "itune.convert.weights" in GRAPH["itune.convert.model_dir"]
    # Function-local imports count: the preflight imports the AOT compiler inside a function.
    assert "itune.training.aot" in GRAPH["itune.cli.preflight"]


@pytest.mark.parametrize("rule", RULES)
def test_no_layer_imports_one_above_it(rule):
    assert _violations(*RULES[rule]) == []


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """A cycle of ``edges`` (as a path whose last node is its first), or [] when it has none."""
    done: set[str] = set()

    def visit(node, path):
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return []
        for target in sorted(edges.get(node, ())):
            found = visit(target, path + [node])
            if found:
                return found
        done.add(node)
        return []

    for node in sorted(edges):
        found = visit(node, [])
        if found:
            return found
    return []


def test_cycle_finder():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        source = node_of(module)
        edges.setdefault(source, set()).update(
            node_of(t) for t in targets if node_of(t) != source and t != "itune"
        )
    cycle = _cycle(edges)
    if cycle:
        # Name the imports that make each edge of the cycle.
        links = [
            f"{module} -> {target}"
            for a, b in zip(cycle, cycle[1:])
            for module, targets in GRAPH.items()
            if node_of(module) == a
            for target in sorted(targets)
            if node_of(target) == b
        ]
        pytest.fail(f"package cycle {' -> '.join(cycle)}: {links}")
