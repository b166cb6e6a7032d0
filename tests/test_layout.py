"""The layout a newcomer reads the architecture from (issue 20): subpackages by concept, no import
cycle, modules small enough to hold in one's head, and tests that mirror the packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "broker"

#: Past this a module is split, unless it is one table of definitions (none is, today).
MAX_LINES = 600
TABLES: dict[str, str] = {}
#: The only modules outside a subpackage: what every part reads, and the entry points.
TOP_LEVEL = {"__init__.py", "__main__.py", "config.py", "config_check.py", "logs.py"}
#: Test folders that are not a package's mirror: drivers of the whole product, the emulated network, data,
#: and the mirror of the top-level extension/ folder (the browser extension is not a Python package).
TEST_ONLY = {"browser", "data", "extension", "netem", "vectors"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The broker modules ``name`` imports when it runs (imports under ``if TYPE_CHECKING:`` are
    for the type checker only and cannot form a cycle at run time); a function's own imports
    count, since they run too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(inner) for inner in ast.walk(node))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                base = ".".join(base_parts)
            else:
                base = node.module or ""
            if base in known:
                found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    # Importing broker.x.y runs broker/x/__init__.py first; that is not an edge of the graph.
    return {m for m in found if m != name and not name.startswith(m + ".")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: runtime_imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_cycle_finder_finds_a_cycle_and_ignores_a_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_module_of_the_broker_imports_itself_round_a_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40, "the scan found too few modules to be looking at the package"
    assert any("broker.signaling.session" in edges for edges in graph.values())
    found = cycles(graph)
    assert found == [], "import cycles (break them by moving the shared part down, not by a lazy import): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_every_module_is_one_concept_a_reader_can_hold() -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
        and str(path.relative_to(ROOT)) not in TABLES
    }
    assert long == {}, f"modules past {MAX_LINES} lines: split them by concept"


def test_modules_live_in_subpackages_that_say_what_they_hold() -> None:
    loose = {p.name for p in PACKAGE.glob("*.py")} - TOP_LEVEL
    assert loose == set(), "put these in the subpackage of their concept"
    for package in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name not in ("web", "__pycache__")):
        init = package / "__init__.py"
        assert init.is_file(), f"{package.name} is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc, f"broker/{package.name}/__init__.py has no docstring saying what the package holds"
        for module in package.glob("*.py"):
            if module.name != "__init__.py":
                assert ast.get_docstring(ast.parse(module.read_text(encoding="utf-8"))), f"{module} has no docstring"


def test_the_tests_mirror_the_packages() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    test_dirs = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"} - TEST_ONLY
    assert test_dirs <= packages, f"test folders with no package of that name: {sorted(test_dirs - packages)}"
    assert packages <= test_dirs, f"packages with no tests/<package>/: {sorted(packages - test_dirs)}"
    for name in test_dirs:
        assert (ROOT / "tests" / name / "__init__.py").is_file()
        assert list((ROOT / "tests" / name).glob("test_*.py")), f"tests/{name}/ holds no tests"
