"""The layering ARCHITECTURE.md describes: imports go one way, the core names no adapter, modules stay small."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "polydiff"
# The command line sits above the core: it may run the benchmark suite (polydiff bench).
COMMAND_LINE = {"polydiff.cli", "polydiff.cli_common", "polydiff.cli_train", "polydiff.cli_sample", "polydiff.bench"}
ADAPTERS = ("domains", "benchmarks", "examples")


def _module(path: Path) -> str:
    return "polydiff" if path.stem == "__init__" else f"polydiff.{path.stem}"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top, inside functions and under ``if TYPE_CHECKING`` alike."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within polydiff (a flat package)
                base = f"polydiff.{node.module}" if node.module else "polydiff"
                names.add(base)
                if not node.module:  # from . import x: x may be a module
                    names.update(f"polydiff.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in CORE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # polydiff.x.y -> polydiff.x
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_core():
    graph = _graph()
    assert len(graph) > 20  # every module was read
    assert _cycles(graph) == []


def test_below_the_command_line_nothing_imports_an_adapter():
    offending = {
        _module(path): sorted(n for n in _imports(path) if n.split(".")[0] in ADAPTERS)
        for path in CORE.glob("*.py")
        if _module(path) not in COMMAND_LINE
    }
    assert {k: v for k, v in offending.items() if v} == {}


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_modules_stay_small(path):
    limit = 350 if path.name == "trainer.py" else 400
    assert len(path.read_text().splitlines()) <= limit


def test_the_worked_example_stays_short():
    assert len((ROOT / "examples" / "points.py").read_text().splitlines()) <= 60


def _layers() -> dict[str, int]:
    """ARCHITECTURE.md's layer table: module -> layer number."""
    layers = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1][:1].isdigit() and cells[1][1:2] == ".":
            for name in cells[2].split(","):
                layers[f"polydiff.{name.strip().strip('`')}"] = int(cells[1][0])
    return layers


def test_imports_go_downwards_through_the_documented_layers():
    layers, graph = _layers(), _graph()
    assert sorted(set(graph) - {"polydiff"} - set(layers)) == []  # every module has its layer
    upwards = sorted(
        f"{a} -> {b}" for a, edges in graph.items() if a in layers for b in edges if layers.get(b, 0) > layers[a]
    )
    assert upwards == []


def test_every_mutant_of_the_mutation_check_still_finds_its_line(monkeypatch):
    """tests/mutation.py names lines of the core: a change that rewords one must update the mutant."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("polydiff_mutation", ROOT / "tests" / "mutation.py")
    mutation = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "polydiff_mutation", mutation)  # its dataclass looks its module up there
    spec.loader.exec_module(mutation)
    stale = [m.name for m in mutation.MUTANTS if (ROOT / m.path).read_text().count(m.old) != 1]
    assert stale == [] and len(mutation.MUTANTS) >= 15
