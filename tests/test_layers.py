"""The import floors: each package imports only the floors below it, and no module reaches itself through imports.

Floors, lowest first (docs/architecture.md): kernels -> uhap_jax/geometry -> data_pipelines -> uhap_jax/models ->
uhap_jax/artifacts -> uhap_jax/inference -> uhap_jax/eval -> uhap_jax/train -> configs -> the entry points
(uhap_jax/demo.py, uhap_jax/report.py, uhap_jax/commands, uhap_jax/cli.py). Every import counts, lazy ones inside
functions too; only `if TYPE_CHECKING:` blocks are skipped (they never run). Modules that import nothing of the
project (the `uhap_jax` package itself, `uhap_jax/config_utils.py`) sit on the lowest floor.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "data_pipelines", "configs", "uhap_jax")

# (module prefix, floor); the longest matching prefix wins.
FLOORS: tuple[tuple[str, int], ...] = (
    ("kernels", 0),
    ("uhap_jax", 0),
    ("uhap_jax.config_utils", 0),
    ("uhap_jax.geometry", 1),
    ("data_pipelines", 2),
    ("uhap_jax.models", 3),
    ("uhap_jax.artifacts", 4),
    ("uhap_jax.inference", 5),
    ("uhap_jax.eval", 6),
    ("uhap_jax.train", 7),
    ("configs", 8),
    ("uhap_jax.demo", 9),
    ("uhap_jax.report", 9),
    ("uhap_jax.commands", 9),
    ("uhap_jax.cli", 9),
)
FLOOR_NAMES = {
    0: "kernels",
    1: "geometry",
    2: "data_pipelines",
    3: "models",
    4: "artifacts",
    5: "inference",
    6: "eval",
    7: "train",
    8: "configs",
    9: "entry points",
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> int | None:
    best = None
    for prefix, floor in FLOORS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, floor)
    if best is None or (best[0] == "uhap_jax" and module != "uhap_jax"):
        return None  # a uhap_jax module outside every listed floor: the test below asks for one
    return best[1]


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(tree: ast.AST):
    """ast.walk without the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path = REPO) -> list[Edge]:
    """The project modules `module` imports: `from a import b` names a.b when that is a module, else a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = []
    rel = str(path.relative_to(root))
    for node in _walk_runtime(ast.parse(path.read_text(), filename=rel)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a module; drop trailing attributes
                target = target.rpartition(".")[0]
            edge = Edge(module, target, rel, node.lineno)
            if target and target != module and edge not in edges:
                edges.append(edge)
    return edges


def all_edges() -> list[Edge]:
    modules = project_modules()
    return [edge for module, path in modules.items() for edge in imports_of(module, path, modules)]


def floor_violations(edges: list[Edge]) -> list[str]:
    problems = []
    for edge in edges:
        source, target = floor_of(edge.source), floor_of(edge.target)
        if source is None or target is None:
            continue  # reported by test_every_module_has_a_floor
        if target > source:
            problems.append(
                f"{edge.file}:{edge.line}: {edge.source} (floor {FLOOR_NAMES[source]}) imports {edge.target} "
                f"(floor {FLOOR_NAMES[target]}, above it)"
            )
    return problems


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """Strongly connected components with more than one module (Tarjan), each as the edges inside it."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [[e for e in edges if e.source in c and e.target in c] for c in components]


def test_every_module_has_a_floor():
    missing = [f"{path.relative_to(REPO)}" for module, path in project_modules().items() if floor_of(module) is None]
    assert not missing, "modules on no floor (add them to FLOORS in tests/test_layers.py): " + ", ".join(missing)


def test_no_import_reaches_a_higher_floor():
    problems = floor_violations(all_edges())
    assert not problems, "imports against the floors:\n" + "\n".join(problems)


def test_no_import_circles():
    found = cycles(all_edges())
    lines = []
    for component in found:
        lines.append("circle: " + "; ".join(f"{e.file}:{e.line} {e.source} -> {e.target}" for e in component))
    assert not found, "\n".join(lines)


def test_lowest_floor_utilities_import_nothing_of_the_project():
    edges = [e for e in all_edges() if e.source in ("uhap_jax", "uhap_jax.config_utils")]
    assert not edges, [f"{e.file}:{e.line} -> {e.target}" for e in edges]


# --- the checker itself can fail ----------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    modules = {}
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__")] = path
    return modules


def _edges_in(root: Path, modules: dict[str, Path]) -> list[Edge]:
    return [edge for module, path in modules.items() for edge in imports_of(module, path, modules, root)]


def test_checker_finds_an_upward_lazy_import_and_names_the_line(tmp_path):
    modules = _write(
        tmp_path,
        {
            "uhap_jax/__init__.py": "",
            "uhap_jax/models/__init__.py": "",
            "uhap_jax/models/losses.py": "import numpy\n\ndef f():\n    from uhap_jax.eval import image_metrics\n",
            "uhap_jax/eval/__init__.py": "",
            "uhap_jax/eval/image_metrics.py": "from ..models import losses\n",
        },
    )
    edges = _edges_in(tmp_path, modules)
    problems = floor_violations(edges)
    assert problems == [
        "uhap_jax/models/losses.py:4: uhap_jax.models.losses (floor models) imports uhap_jax.eval.image_metrics "
        "(floor eval, above it)"
    ]
    assert [sorted({e.source for e in c}) for c in cycles(edges)] == [
        ["uhap_jax.eval.image_metrics", "uhap_jax.models.losses"]
    ]


@pytest.mark.parametrize("guard", ["TYPE_CHECKING", "typing.TYPE_CHECKING"])
def test_checker_skips_type_checking_blocks_only(tmp_path, guard):
    modules = _write(
        tmp_path,
        {
            "kernels/__init__.py": "",
            "kernels/a.py": f"import typing\nif {guard}:\n    import uhap_jax.train.loop\nelse:\n    import kernels.b",
            "kernels/b.py": "",
            "uhap_jax/__init__.py": "",
            "uhap_jax/train/__init__.py": "",
            "uhap_jax/train/loop.py": "",
        },
    )
    targets = [e.target for e in _edges_in(tmp_path, modules) if e.source == "kernels.a"]
    assert targets == ["kernels.b"]
