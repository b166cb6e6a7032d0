"""The broker uses only the public APIs of its dependencies (docs/security.md, 3.6).

A security release of aiohttp, redis-py, aiortc, msgspec or cryptography must go in the
day it ships. Code that reaches into a library's private names (a leading underscore) may
break, or silently lose a defence, on any such release. This test reads every module of
``broker/`` with ``ast`` and refuses:

- an import of a private module or name of another package (``from aiohttp._websocket
  import ...``, ``import redis._parsers``, ``from aiohttp.web import _x``);
- an attribute access (or ``getattr``/``hasattr``/``setattr`` with a constant name) of a
  private name on a module of another package, or on an object the code says is of a type
  from another package (a parameter, variable or ``self`` attribute annotated so, or made
  by calling such a type);
- an attribute access of a private name that no module of ``broker/`` defines: it can only
  be another package's;
- in a class derived from another package's class, a private name of that class (or of
  its bases) defined again (an override of the library's internals), or read on ``self``
  or ``super()``.

Objects are followed through local names: ``writer = self.ws._writer`` makes ``writer``
another package's object, so ``writer._closing`` is refused even though the broker has
a ``_closing`` of its own elsewhere.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "broker"
OWN_PACKAGE = "broker"
#: Annotations from these modules say nothing about whose object a name holds (``Any``, ``Callable``).
TYPING_MODULES = frozenset({"typing", "typing_extensions", "collections.abc"})
ATTRIBUTE_FUNCTIONS = frozenset({"getattr", "hasattr", "setattr", "delattr"})


def is_private(name: str) -> bool:
    """A leading single underscore: private by Python's convention. Dunders are the language's."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name != "_"


def is_foreign(module: str) -> bool:
    return module.split(".")[0] != OWN_PACKAGE


@dataclass
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def defined_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every name the broker's own code defines: functions, classes, variables, attributes,
    parameters, slots, keyword arguments of its own classes."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                for const in ast.walk(node.value):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        names.add(const.value)
            elif isinstance(node, ast.Call) and _attribute_function(node) == "setattr":
                name = _constant_name(node)
                if name is not None:
                    names.add(name)
    return names


def _attribute_function(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name) and func.id in ATTRIBUTE_FUNCTIONS:
        return func.id
    return None


def _constant_name(call: ast.Call) -> str | None:
    if len(call.args) >= 2 and isinstance(call.args[1], ast.Constant) and isinstance(call.args[1].value, str):
        return call.args[1].value
    return None


@dataclass
class ModuleScan:
    """One module of ``broker/``: what its names stand for, and what it does with private ones."""

    path: str
    tree: ast.Module
    own: set[str]
    #: Local name -> the foreign module it is (``web`` -> ``aiohttp.web``).
    modules: dict[str, str] = field(default_factory=dict)
    #: Local name -> the foreign module it was imported from (``WSMsgType`` -> ``aiohttp``).
    imported: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def run(self) -> list[Finding]:
        self._imports()
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._function(node, foreign_attributes=set())
            elif isinstance(node, ast.ClassDef):
                self._class(node)
        self._attributes()
        return self.findings

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), what))

    # -------------------------------------------------------------- imports

    def _imports(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not is_foreign(alias.name):
                        continue
                    if any(is_private(part) for part in alias.name.split(".")):
                        self.flag(node, f"imports the private module {alias.name}")
                    local = alias.asname or alias.name.split(".")[0]
                    self.modules[local] = alias.name if alias.asname else alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and is_foreign(node.module):
                if any(is_private(part) for part in node.module.split(".")):
                    self.flag(node, f"imports from the private module {node.module}")
                for alias in node.names:
                    if is_private(alias.name):
                        self.flag(node, f"imports the private name {alias.name} from {node.module}")
                    # A submodule or a name: either way it belongs to the foreign package.
                    self.imported[alias.asname or alias.name] = node.module
                    self.modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def foreign(self, expr: ast.expr | None) -> str | None:
        """The foreign module or type an expression names (``web.WebSocketResponse``,
        ``aioredis.Redis``, ``"asyncio.StreamWriter"``), else None."""
        if expr is None:
            return None
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            try:
                expr = ast.parse(expr.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(expr, ast.Subscript):  # list[X], Optional[X]: not an X
            return None
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):  # X | None
            return self.foreign(expr.left) or self.foreign(expr.right)
        parts: list[str] = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name) and expr.id in self.modules:
            dotted = ".".join([self.modules[expr.id], *reversed(parts)])
            if dotted.rpartition(".")[0] not in TYPING_MODULES:
                return dotted
        return None

    # -------------------------------------------------------------- attributes

    def _attributes(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                owner = self.foreign(node.value)
                if owner is not None:
                    self.flag(node, f"reads the private name {node.attr} of {owner}")
                elif node.attr not in self.own:
                    self.flag(node, f"reads {node.attr}, which the broker does not define: another package's")
            elif isinstance(node, ast.Call) and _attribute_function(node) is not None:
                name = _constant_name(node)
                if name is None or not is_private(name):
                    continue
                owner = self.foreign(node.args[0])
                if owner is not None:
                    self.flag(node, f"{_attribute_function(node)}s the private name {name} of {owner}")
                elif name not in self.own:
                    self.flag(node, f"{_attribute_function(node)}s {name}, which the broker does not define")

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, foreign_attributes: set[str]) -> None:
        """Private names read on objects the function says, or shows, are another package's."""
        typed: dict[str, str] = {}
        arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        for arg in arguments:
            kind = self.foreign(arg.annotation)
            if kind is not None:
                typed[arg.arg] = kind

        def origin(expr: ast.expr | None) -> str | None:
            """Whose object an expression yields: a foreign module's, a typed name's, or None."""
            if expr is None:
                return None
            kind = self.foreign(expr)
            if kind is not None:
                return kind
            while isinstance(expr, (ast.Attribute, ast.Call, ast.Subscript, ast.Await)):
                if (
                    isinstance(expr, ast.Attribute)
                    and isinstance(expr.value, ast.Name)
                    and expr.value.id == "self"
                    and expr.attr in foreign_attributes
                ):
                    return f"self.{expr.attr}"
                inner = expr.func if isinstance(expr, ast.Call) else expr.value
                if isinstance(expr, ast.Call) and isinstance(inner, ast.Name) and inner.id in ATTRIBUTE_FUNCTIONS:
                    inner = expr.args[0] if expr.args else inner
                expr = inner
            if isinstance(expr, ast.Name):
                return typed.get(expr.id) or (self.modules.get(expr.id) if expr.id in self.modules else None)
            return None

        for _ in range(3):  # names made from names made from ...: a few rounds settle them
            for inner in ast.walk(node):
                if isinstance(inner, ast.AnnAssign) and isinstance(inner.target, ast.Name):
                    kind = self.foreign(inner.annotation) or origin(inner.value)
                    if kind is not None:
                        typed[inner.target.id] = kind
                elif isinstance(inner, ast.Assign):
                    kind = origin(inner.value)
                    if kind is not None:
                        for target in inner.targets:
                            if isinstance(target, ast.Name):
                                typed[target.id] = kind
                elif isinstance(inner, (ast.With, ast.AsyncWith)):
                    for item in inner.items:
                        kind = origin(item.context_expr)
                        if kind is not None and isinstance(item.optional_vars, ast.Name):
                            typed[item.optional_vars.id] = kind
        for inner in ast.walk(node):
            if isinstance(inner, ast.Attribute) and is_private(inner.attr):
                kind = origin(inner.value)
                if kind is not None:
                    self.flag(inner, f"reads the private name {inner.attr} of {kind}'s object")
            elif isinstance(inner, ast.Call) and _attribute_function(inner) is not None and inner.args:
                name = _constant_name(inner)
                kind = origin(inner.args[0])
                if name is not None and is_private(name) and kind is not None:
                    self.flag(inner, f"{_attribute_function(inner)}s the private name {name} of {kind}'s object")

    # -------------------------------------------------------------- classes

    def _class(self, node: ast.ClassDef) -> None:
        attributes = self._foreign_attributes(node)
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._function(item, attributes)
        foreign_bases = [b for b in (self.foreign(base) for base in node.bases) if b is not None]
        if not foreign_bases:
            return
        # Derived from another package's class: the private names it has are its internals.
        theirs: set[str] = set()
        for base in foreign_bases:
            theirs |= private_names_of(base)
        bases = ", ".join(foreign_bases)
        for item in ast.walk(node):
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item in node.body:
                if item.name in theirs:
                    self.flag(item, f"overrides {item.name} of {bases}")
            elif isinstance(item, (ast.Attribute, ast.Name)) and isinstance(item.ctx, ast.Store):
                name = item.attr if isinstance(item, ast.Attribute) else item.id
                if name in theirs:
                    self.flag(item, f"sets {name}, which {bases} has")
            elif isinstance(item, ast.Attribute) and item.attr in theirs:
                value = item.value
                on_self = isinstance(value, ast.Name) and value.id == "self"
                on_super = isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"
                if on_self or on_super:
                    self.flag(item, f"reads {item.attr} of its base {bases}")

    def _foreign_attributes(self, node: ast.ClassDef) -> set[str]:
        """Attributes of the class that hold another package's objects: so annotated, made by
        calling another package, or given a parameter annotated so."""
        held: set[str] = set()
        parameters: set[str] = set()
        for item in ast.walk(node):
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in [*item.args.posonlyargs, *item.args.args, *item.args.kwonlyargs]:
                    if self.foreign(arg.annotation) is not None:
                        parameters.add(arg.arg)
        for item in ast.walk(node):
            if isinstance(item, ast.AnnAssign):
                target = item.target
                name = (
                    target.id
                    if isinstance(target, ast.Name)
                    else (target.attr if isinstance(target, ast.Attribute) else None)
                )
                if name is not None and self.foreign(item.annotation) is not None:
                    held.add(name)
            elif isinstance(item, ast.Assign):
                value = item.value
                made = isinstance(value, ast.Call) and self.foreign(value.func) is not None
                given = isinstance(value, ast.Name) and value.id in parameters
                if made or given:
                    held.update(t.attr for t in item.targets if isinstance(t, ast.Attribute))
        return held


def resolve(dotted: str) -> Any:
    """The object a dotted name stands for (``aiohttp.web.WebSocketResponse``), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                found = getattr(found, part)
        except AttributeError:
            return None
        return found
    return None


def private_names_of(dotted: str) -> set[str]:
    """The private names a class of another package (and its bases) has: its own attributes,
    and what its methods set on ``self``. A class that cannot be found counts as having every
    private name (``ALL``)."""
    cls = resolve(dotted)
    if not isinstance(cls, type):
        return ALL
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        names.update(n for n in vars(klass) if is_private(n))
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and is_private(node.attr):
                names.add(node.attr)
    return names


class _Everything(set[str]):
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and is_private(name)


ALL: set[str] = _Everything()


def parse(path: Path) -> ast.Module:
    """``ast.parse``, once more after CPython 3.11's "AST constructor recursion depth mismatch"
    (a SystemError of the interpreter, gh-106905, fixed in 3.12 and later 3.11 releases: seen once
    in a CI rehearsal on 3.11.7, in a worker whose earlier tests had recursed deeply): the again is
    on a new thread, whose recursion count starts afresh. A source that does not parse still fails."""
    source = path.read_text(encoding="utf-8")
    try:
        return ast.parse(source, filename=str(path))
    except SystemError:
        with ThreadPoolExecutor(max_workers=1) as fresh:
            return fresh.submit(ast.parse, source, str(path)).result()


def scan(root: Path = BROKER) -> list[Finding]:
    trees = {str(path.relative_to(ROOT)): parse(path) for path in sorted(root.rglob("*.py"))}
    own = defined_names(trees)
    findings: list[Finding] = []
    for path, tree in trees.items():
        findings.extend(ModuleScan(path, tree, own).run())
    return findings


def test_the_broker_uses_only_public_names_of_other_packages() -> None:
    findings = scan()
    assert not findings, "private names of other packages:\n" + "\n".join(str(f) for f in findings)


# ------------------------------------------------------------------ the scan itself


def _scan_source(source: str) -> list[str]:
    """What the scan finds in ``source`` as if it were the only module of ``broker/``."""
    tree = ast.parse(source)
    return [f.what for f in ModuleScan("broker/mod.py", tree, defined_names({"broker/mod.py": tree})).run()]


def test_the_scan_sees_each_kind_of_private_use() -> None:
    """Each way the broker once reached into a library (aiohttp 3.14, redis-py) is caught."""
    cases = {
        "from aiohttp._websocket.reader import WebSocketReader\n": "private module",
        "import redis._parsers\n": "private module",
        "from aiohttp.helpers import _noop\n": "private name",
        "from aiohttp import web\nclass S(web.WebSocketResponse):\n    def _post_start(self): ...\n": "overrides",
        "from aiohttp import web\nclass S(web.WebSocketResponse):\n    def go(self):\n        return self._reader\n": "base",
        "from aiohttp import web\ndef f(ws: web.WebSocketResponse):\n    return ws._writer\n": "_writer",
        "def f(ws):\n    return ws._writer.transport\n": "does not define",
        "def f(conn):\n    return getattr(conn, '_parser', None)\n": "_parser",
        "import asyncio\nclass P:\n    def __init__(self, w: asyncio.StreamWriter):\n"
        "        self.w: asyncio.StreamWriter = w\n        self._closing = 1\n"
        "    def f(self):\n        return self.w._closing\n": "self.w",
        "from aiohttp import web\nweb._run_app\n": "aiohttp.web",
        # followed through a local name, though the broker has a _closing of its own
        "from aiohttp import web\nclass T:\n    _closing = 0\n    def __init__(self, ws: web.WebSocketResponse):\n"
        "        self.ws = ws\n    def f(self):\n        writer = self.ws._writer\n        return writer._closing\n": "_closing",
        "from aiohttp.web_ws import WebSocketResponse as W\nclass S(W):\n    def f(self):\n        self._reader = 1\n": "sets",
    }
    for source, expected in cases.items():
        found = _scan_source(source)
        assert any(expected in what for what in found), (source, found)


def test_the_scan_lets_the_broker_use_its_own_private_names() -> None:
    source = (
        "from . import store\nfrom .hub import _RELAYED\nimport asyncio\n"
        "class A:\n    __slots__ = ('_x',)\n    def _go(self) -> int:\n        return self._x\n"
        "def f(a: A) -> None:\n    a._go()\n    store._helper\n"
        "def _helper() -> None: ...\n"
        "class E(Exception):\n    pass\n"
        "import asyncio\nclass P(asyncio.Protocol):\n    def _own_helper(self) -> None:\n        self._own = 1\n"
    )
    assert _scan_source(source) == []
