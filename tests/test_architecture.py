"""Architecture rules of issue #13, checked on the source text (``ast``; nothing is imported).

The rules (docs: DESIGN.md, "Architecture in one screen"):

1. no import cycles among kdistill modules;
2. no private name (``_x``) imported from another module;
3. kdistill modules are imported at module top only (a function-level import is how a cycle gets hidden);
   an ``if TYPE_CHECKING:`` block is fine, and so are lazy imports of third-party packages;
4. nothing imports ``kdistill.cli`` (``kdistill/__main__.py`` may);
5. no module over ``MAX_LINES`` physical lines.

Every violation is reported as ``src/kdistill/x.py:LINE: what``, all of them in one message. The checking
functions take any source folder, so the tests at the bottom feed them small synthetic trees to prove that
each check can fail. ``python scripts/import_graph.py`` prints the graph and the same violations.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "kdistill"
CLI = f"{PACKAGE}.cli"
MAX_LINES = 400
# {"src/kdistill/x.py": "why it may stay longer"}: keep it empty; an entry needs a reason a reviewer accepts.
SIZE_ALLOWLIST: dict[str, str] = {}
# Modules whose function-level kdistill imports are allowed, with the reason. The cli is the one leaf: nothing
# imports it (rule 4), so its lazy imports cannot hide a cycle, and they keep `kdistill --help` and the light
# commands from loading torch and transformers (seconds) for commands that do not need them.
LAZY_IMPORTERS: dict[str, str] = {CLI: "entry point; lazy per-command imports keep startup fast"}
# Modules that may import kdistill.cli (the `python -m kdistill` entry point).
CLI_IMPORTERS = {f"{PACKAGE}.__main__"}


# --------------------------------------------------------------------------------------------- the scan
@dataclass(frozen=True)
class Import:
    """One import of a kdistill module, resolved to the module it names."""

    importer: str  # dotted name of the importing module
    line: int
    target: str  # the kdistill module the statement names (a submodule when `from pkg import submodule`)
    source: str  # for `from X import ...`: the resolved X; otherwise equal to target
    names: tuple[str, ...]  # names taken by `from X import a, b` (empty for `import X`)
    in_function: bool  # inside a def / async def / lambda (at any depth)
    type_checking: bool  # inside the body of `if TYPE_CHECKING:`
    dynamic: bool = False  # importlib.import_module("kdistill...") / __import__("kdistill...")


@dataclass
class Module:
    name: str
    path: Path
    display: str  # path as printed in messages, e.g. src/kdistill/x.py
    lines: int
    is_package: bool
    imports: list[Import] = field(default_factory=list)
    # (line, module, name) for `alias._x` where alias names a kdistill module (import kdistill.a as alias)
    private_uses: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass
class Tree:
    modules: dict[str, Module]

    def where(self, name: str, line: int) -> str:
        return f"{self.modules[name].display}:{line}"


def _module_name(rel: Path) -> tuple[str, bool]:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _dynamic_target(call: ast.Call) -> str | None:
    """'kdistill.x' for importlib.import_module("kdistill.x") or __import__("kdistill.x"), else None."""
    func = call.func
    fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if fname not in {"import_module", "__import__"} or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


class _Collector(ast.NodeVisitor):
    """Collects raw imports with their context (function depth, TYPE_CHECKING)."""

    def __init__(self) -> None:
        self.raw: list[tuple[ast.AST, bool, bool]] = []  # (node, in_function, type_checking)
        self._functions = 0
        self._type_checking = 0

    def _function(self, node: ast.AST) -> None:
        # Decorators and default values run with the enclosing scope; only the body is deferred. Counting the
        # whole def as function-level is fine: import statements cannot appear in those parts.
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.visit(node.test)
            self._type_checking += 1
            for stmt in node.body:
                self.visit(stmt)
            self._type_checking -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def _record(self, node: ast.AST) -> None:
        self.raw.append((node, self._functions > 0, self._type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        self._record(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._record(node)

    def visit_Call(self, node: ast.Call) -> None:
        if _dynamic_target(node) is not None:
            self._record(node)
        self.generic_visit(node)


def _longest_module(dotted: str, known: set[str]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _resolve(mod: Module, node: ast.AST, known: set[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """[(target, source, names)] for the kdistill modules one import node names."""
    if isinstance(node, ast.Call):
        dotted = _dynamic_target(node)
        target = _longest_module(dotted, known) if dotted else None
        return [(target, target, ())] if target else []
    if isinstance(node, ast.Import):
        out = []
        for alias in node.names:
            target = _longest_module(alias.name, known)
            if target:
                out.append((target, target, ()))
        return out
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        # Relative: level 1 is the package holding this module (the package itself for an __init__).
        base_parts = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
        if node.level > 1:
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    source = _longest_module(base, known)
    if source is None:
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        # `from pkg import sub` where sub is a module: the edge goes to the submodule, not to pkg/__init__.
        target = sub if sub in known and source == base else source
        out.append((target, source, (alias.name,)))
    return out


def _module_bindings(mod: Module, tree: ast.Module, known: set[str]) -> dict[str, str]:
    """{local name: kdistill module} for every name an import statement binds to a kdistill module."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    target = _longest_module(alias.name, known)
                    if target:
                        bound[alias.asname] = target
                elif alias.name.split(".")[0] in known:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for alias, (target, source, _) in zip(node.names, _resolve(mod, node, known)):
                if target != source:  # `from pkg import submodule`
                    bound[alias.asname or alias.name] = target
    return bound


def _private_attribute_uses(mod: Module, tree: ast.Module, known: set[str]) -> list[tuple[int, str, str]]:
    """`alias._x` (any depth: kdistill.a._x, m.sub._x) where alias is bound to a kdistill module."""
    bound = _module_bindings(mod, tree, known)
    uses = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name) or base.id not in bound:
            continue
        dotted = ".".join([bound[base.id]] + chain[::-1])
        owner = _longest_module(dotted, known)
        rest = dotted[len(owner) + 1 :].split(".") if owner and len(dotted) > len(owner) else []
        if rest and _private(rest[0]) and owner != mod.name:
            uses.add((node.lineno, owner, rest[0]))
    return sorted(uses)


def scan(src: Path, package: str = PACKAGE) -> Tree:
    """Parse every module of `package` under the folder `src` (the folder that holds `package/`)."""
    files = sorted((src / package).rglob("*.py"))
    modules: dict[str, Module] = {}
    display_root = src.parent
    for path in files:
        name, is_package = _module_name(path.relative_to(src))
        text = path.read_text(encoding="utf-8")
        display = path.relative_to(display_root).as_posix()
        modules[name] = Module(name, path, display, len(text.splitlines()), is_package)
    known = set(modules)
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(encoding="utf-8"), filename=str(mod.path))
        collector = _Collector()
        collector.visit(tree)
        for node, in_function, type_checking in collector.raw:
            for target, source, names in _resolve(mod, node, known):
                mod.imports.append(
                    Import(
                        importer=mod.name,
                        line=node.lineno,
                        target=target,
                        source=source,
                        names=names,
                        in_function=in_function,
                        type_checking=type_checking,
                        dynamic=isinstance(node, ast.Call),
                    )
                )
        mod.private_uses = _private_attribute_uses(mod, tree, known)
    return Tree(modules)


# --------------------------------------------------------------------------------------------- the checks
def import_graph(tree: Tree) -> dict[str, dict[str, int]]:
    """{importer: {imported: first line}}, every kdistill import statement counted.

    Counted: imports at module top, inside functions, inside `if TYPE_CHECKING:` and constant-string
    importlib.import_module / __import__ calls. A package's __init__ importing its submodules is an edge
    like any other. Only EXPLICIT edges are counted: `from kdistill.a.b import c` also runs
    kdistill/a/__init__.py first, but that implicit parent edge is not counted. Counting it would flag every
    submodule of a package whose __init__ re-exports it, a normal pattern that does not deadlock (the
    __init__ imports its submodules before the submodule's own import statement asks for the package,
    which is already in sys.modules). A submodule that names its package explicitly
    (`from kdistill.a import x`, or `from . import x` where x is not a submodule) does get an edge to the
    __init__, and that edge plus the __init__ importing the submodule is reported as a cycle.
    Self-edges (a module naming itself) are ignored.
    """
    graph: dict[str, dict[str, int]] = {name: {} for name in tree.modules}
    for mod in tree.modules.values():
        for imp in mod.imports:
            if imp.target != imp.importer:
                edges = graph[imp.importer]
                edges[imp.target] = min(edges.get(imp.target, imp.line), imp.line)
    return graph


def _shortest_path(graph: dict[str, dict[str, int]], start: str, goal: str, allowed: set[str]) -> list[str] | None:
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for nxt in sorted(graph[node]):
            if nxt in allowed and nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _elementary_cycles(graph: dict[str, dict[str, int]], component: set[str], limit: int) -> list[list[str]] | None:
    """Every simple cycle of one strongly connected group, each started at its smallest module; None past limit."""
    found: list[list[str]] = []
    for start in sorted(component):
        allowed = {n for n in component if n >= start}
        path = [start]
        on_path = {start}
        work = [iter(sorted(n for n in graph[start] if n in allowed))]
        while work:
            nxt = next(work[-1], None)
            if nxt is None:
                work.pop()
                on_path.discard(path.pop())
                continue
            if nxt == start:
                found.append(path + [start])
                if len(found) > limit:
                    return None
            elif nxt not in on_path:
                path.append(nxt)
                on_path.add(nxt)
                work.append(iter(sorted(n for n in graph[nxt] if n in allowed)))
    return found


def find_cycles(tree: Tree, limit: int = 500) -> list[list[str]]:
    """Import cycles, each as a chain [a, b, ..., a] starting at its smallest module name.

    All simple cycles are listed while a group of mutually importing modules has at most `limit` of them.
    Past that (a tangle), each edge u -> v on a cycle is reported once with the shortest way back
    v -> ... -> u, so every edge to break still appears in at least one chain.
    """
    graph = import_graph(tree)
    cycles: list[list[str]] = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        every = _elementary_cycles(graph, component, limit)
        if every is not None:
            cycles.extend(every)
            continue
        seen: set[tuple[str, ...]] = set()
        for u in sorted(component):
            for v in sorted(graph[u]):
                if v not in component:
                    continue
                back = _shortest_path(graph, v, u, component)
                assert back is not None  # same strongly connected component
                ring = [u] + back[:-1]
                turn = ring.index(min(ring))
                key = tuple(ring[turn:] + ring[:turn])
                if key not in seen:
                    seen.add(key)
                    cycles.append(list(key) + [key[0]])
    return sorted(cycles)


def cycle_violations(tree: Tree) -> list[str]:
    graph = import_graph(tree)
    out = []
    for chain in find_cycles(tree):
        hops = " -> ".join(
            f"{a} ({tree.where(a, graph[a][b])})" for a, b in zip(chain, chain[1:])
        )
        out.append(f"{tree.where(chain[0], graph[chain[0]][chain[1]])}: import cycle {hops} -> {chain[-1]}")
    return sorted(out, key=_order)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_import_violations(tree: Tree) -> list[str]:
    """`from kdistill.a import _x` in another module than kdistill.a; private module paths from outside;
    `a._x` where `a` was bound by importing kdistill.a (the same import, written as an attribute).

    A private submodule (kdistill/a/_impl.py) may be imported from inside its own package kdistill.a.
    """
    out = []
    for mod in tree.modules.values():
        for imp in mod.imports:
            # Private segments in the module path (import kdistill.a._impl / from kdistill.a._impl import y).
            parts = imp.source.split(".")
            for i, part in enumerate(parts):
                if _private(part):
                    owner = ".".join(parts[:i])
                    if not (mod.name == owner or mod.name.startswith(owner + ".")):
                        out.append(f"{tree.where(mod.name, imp.line)}: imports private module {imp.source}")
                    break
            for name in imp.names:
                if not _private(name) or mod.name == imp.source:
                    continue
                if imp.target != imp.source:  # `from kdistill.a import _impl`: a private submodule
                    if mod.name == imp.source or mod.name.startswith(imp.source + "."):
                        continue
                    out.append(f"{tree.where(mod.name, imp.line)}: imports private module {imp.target}")
                else:
                    out.append(f"{tree.where(mod.name, imp.line)}: imports private name {name} from {imp.source}")
        for line, owner, name in mod.private_uses:
            out.append(f"{tree.where(mod.name, line)}: uses private name {name} of {owner}")
    return sorted(set(out), key=_order)


def function_level_violations(tree: Tree, allowed: dict[str, str] = LAZY_IMPORTERS) -> list[str]:
    out = []
    for mod in tree.modules.values():
        if mod.name in allowed:
            continue
        for imp in mod.imports:
            if imp.in_function and not imp.type_checking:
                how = "dynamic import" if imp.dynamic else "import"
                out.append(f"{tree.where(mod.name, imp.line)}: function-level {how} of {imp.target} (move it to the top)")
    return sorted(set(out), key=_order)


def cli_import_violations(tree: Tree, cli: str = CLI, allowed: set[str] = CLI_IMPORTERS) -> list[str]:
    out = []
    for mod in tree.modules.values():
        if mod.name in allowed:
            continue
        for imp in mod.imports:
            if imp.target == cli or imp.target.startswith(cli + "."):
                out.append(f"{tree.where(mod.name, imp.line)}: imports {imp.target} (nothing imports the cli)")
    return sorted(set(out), key=_order)


def size_violations(tree: Tree, limit: int = MAX_LINES, allowlist: dict[str, str] = SIZE_ALLOWLIST) -> list[str]:
    out = []
    for mod in sorted(tree.modules.values(), key=lambda m: -m.lines):
        if mod.lines > limit and mod.display not in allowlist:
            out.append(f"{mod.display}:{limit + 1}: {mod.lines} lines, over the limit of {limit}")
    return out


def _order(message: str) -> tuple[str, int, str]:
    path, line, rest = message.split(":", 2)
    return path, int(line), rest


def _fail_if_any(violations: list[str], what: str) -> None:
    if violations:
        raise AssertionError(f"{len(violations)} {what}:\n" + "\n".join(violations))


# --------------------------------------------------------------------------------------------- the real tree
def _tree() -> Tree:
    return scan(SRC)


def test_the_scan_sees_the_package():
    tree = _tree()
    assert PACKAGE in tree.modules and f"{PACKAGE}.cli" in tree.modules
    assert sum(len(m.imports) for m in tree.modules.values()) > 0


def test_no_import_cycles():
    _fail_if_any(cycle_violations(_tree()), "import cycles (break one edge of each)")


def test_no_private_names_imported_across_modules():
    _fail_if_any(private_import_violations(_tree()), "private names imported from another module")


def test_kdistill_imports_only_at_module_top():
    _fail_if_any(function_level_violations(_tree()), "function-level imports of kdistill modules")


def test_nothing_imports_the_cli():
    _fail_if_any(cli_import_violations(_tree()), "imports of kdistill.cli")


def test_no_module_over_the_line_limit():
    tree = _tree()
    stale = sorted(set(SIZE_ALLOWLIST) - {m.display for m in tree.modules.values()})
    assert not stale, f"size allowlist names files that no longer exist: {stale}"
    _fail_if_any(size_violations(tree), f"modules over {MAX_LINES} lines")


# --------------------------------------------------------------------------------------------- the checker fails
def _write(root: Path, files: dict[str, str]) -> Path:
    """Write {"kdistill/x.py": source} under root/src and return root/src."""
    src = root / "src"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_checker_clean_tree_has_no_violations(tmp_path):
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "__version__ = '0'\n",
            "kdistill/__main__.py": "from kdistill.cli import main\n",
            "kdistill/cli.py": "import json\nfrom kdistill import losses\n\ndef main():\n    import torch\n",
            "kdistill/losses/__init__.py": "from .kl import kl\nfrom kdistill.losses.js import js\n",
            "kdistill/losses/kl.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kdistill.types import Tensor\n"
            "def kl():\n    pass\n",
            "kdistill/losses/js.py": "from kdistill.losses import kl as kl_module\nfrom . import _impl\n",
            "kdistill/types.py": "Tensor = object\n",
            "kdistill/losses/_impl.py": "from kdistill import __version__\nfrom kdistill.losses.kl import kl\n",
        },
    )
    tree = scan(src)
    assert import_graph(tree)["kdistill.losses.js"] == {"kdistill.losses.kl": 1, "kdistill.losses._impl": 2}
    assert cycle_violations(tree) == []
    assert private_import_violations(tree) == []
    assert function_level_violations(tree) == []
    assert size_violations(tree) == []
    assert cli_import_violations(tree) == []


def test_checker_counts_type_checking_imports_in_cycles(tmp_path):
    # A TYPE_CHECKING import may stay at the top of a module, but the dependency it states still counts.
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "",
            "kdistill/a.py": "import kdistill.b\n",
            "kdistill/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kdistill.a import A\n",
        },
    )
    tree = scan(src)
    assert function_level_violations(tree) == []
    assert find_cycles(tree) == [["kdistill.a", "kdistill.b", "kdistill.a"]]


def test_checker_finds_cycles_with_their_chain(tmp_path):
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "",
            "kdistill/a.py": "import kdistill.b\n",
            "kdistill/b.py": "x = 1\n\ndef f():\n    from kdistill.c import y\n",  # hidden in a function
            "kdistill/c.py": "from . import a\n",
            # Package __init__ re-exporting a submodule that asks the __init__ for a name: a cycle.
            "kdistill/pkg/__init__.py": "from kdistill.pkg.sub import f\nHELPER = 1\n",
            "kdistill/pkg/sub.py": "from kdistill.pkg import HELPER\n\ndef f():\n    pass\n",
            # Re-exporting __init__ whose submodule imports a sibling through the package: no cycle.
            "kdistill/ok/__init__.py": "from .one import g\nfrom .two import h\n",
            "kdistill/ok/one.py": "from kdistill.ok import two\n\ndef g():\n    pass\n",
            "kdistill/ok/two.py": "def h():\n    pass\n",
        },
    )
    tree = scan(src)
    assert sorted(find_cycles(tree)) == [
        ["kdistill.a", "kdistill.b", "kdistill.c", "kdistill.a"],
        ["kdistill.pkg", "kdistill.pkg.sub", "kdistill.pkg"],
    ]
    messages = cycle_violations(tree)
    assert (
        "src/kdistill/a.py:1: import cycle kdistill.a (src/kdistill/a.py:1) -> kdistill.b (src/kdistill/b.py:4)"
        " -> kdistill.c (src/kdistill/c.py:1) -> kdistill.a" in messages
    )
    assert len(messages) == 2
    # Only explicit edges count: from kdistill.ok import two does not add ok.one -> ok.
    assert "kdistill.ok" not in import_graph(tree)["kdistill.ok.one"]


def test_checker_finds_two_module_cycle_and_reports_every_cycle_edge(tmp_path):
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "",
            "kdistill/a.py": "from kdistill import b\n",
            "kdistill/b.py": "from kdistill.a import x\nimport kdistill.c\n",
            "kdistill/c.py": "import kdistill.a\n",
        },
    )
    cycles = find_cycles(scan(src))
    assert ["kdistill.a", "kdistill.b", "kdistill.a"] in cycles
    assert ["kdistill.a", "kdistill.b", "kdistill.c", "kdistill.a"] in cycles
    assert len(cycles) == 2


def test_checker_cycle_fallback_keeps_every_cycle_edge(tmp_path):
    # Four modules that all import each other: 20 simple cycles; with limit=3 one chain per edge remains.
    names = ["a", "b", "c", "d"]
    files = {"kdistill/__init__.py": ""}
    for n in names:
        files[f"kdistill/{n}.py"] = "".join(f"import kdistill.{m}\n" for m in names if m != n)
    tree = scan(_write(tmp_path, files))
    assert len(find_cycles(tree)) == 20
    fallback = find_cycles(tree, limit=3)
    assert len(fallback) == 6  # the 2-cycles a<->b ... c<->d: each edge's shortest way back
    edges = {(x, y) for chain in fallback for x, y in zip(chain, chain[1:])}
    assert edges == {(f"kdistill.{x}", f"kdistill.{y}") for x in names for y in names if x != y}


def test_checker_finds_private_imports(tmp_path):
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "",
            "kdistill/a.py": "_x = 1\n__version__ = '1'\n",
            "kdistill/b.py": "import os\nfrom kdistill.a import __version__, _x\n",
            "kdistill/pkg/__init__.py": "",
            "kdistill/pkg/_impl.py": "_y = 2\n",
            "kdistill/pkg/inner.py": "from . import _impl\nfrom ._impl import _y\n",
            "kdistill/c.py": "import kdistill.pkg._impl\nfrom os import _exit\n",
            "kdistill/d.py": (
                "import kdistill.a\nimport kdistill.a as m\nfrom kdistill import a\nimport os\n"
                "def f(self):\n"
                "    return kdistill.a._x, m._x, a._x, os._exit, self._y, a.__version__\n"
            ),
        },
    )
    assert private_import_violations(scan(src)) == [
        "src/kdistill/b.py:2: imports private name _x from kdistill.a",
        "src/kdistill/c.py:1: imports private module kdistill.pkg._impl",
        "src/kdistill/d.py:6: uses private name _x of kdistill.a",
        "src/kdistill/pkg/inner.py:2: imports private name _y from kdistill.pkg._impl",
    ]


def test_checker_finds_function_level_imports(tmp_path):
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "",
            "kdistill/a.py": "import json\n\ndef f():\n    import torch\n    return torch\n",
            "kdistill/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from kdistill.a import f\n"
                "class C:\n"
                "    def m(self):\n"
                "        from kdistill import a\n"
                "        return a\n"
                "def g():\n"
                "    import importlib\n"
                "    return importlib.import_module('kdistill.a')\n"
                "async def h():\n"
                "    from .a import f\n"
            ),
        },
    )
    assert function_level_violations(scan(src)) == [
        "src/kdistill/b.py:6: function-level import of kdistill.a (move it to the top)",
        "src/kdistill/b.py:10: function-level dynamic import of kdistill.a (move it to the top)",
        "src/kdistill/b.py:12: function-level import of kdistill.a (move it to the top)",
    ]


def test_checker_finds_cli_imports(tmp_path):
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "",
            "kdistill/__main__.py": "from kdistill.cli import main\n",
            "kdistill/cli.py": "def main():\n    pass\n",
            "kdistill/a.py": "from kdistill import cli\n",
            "kdistill/b.py": "def f():\n    from .cli import main\n",
        },
    )
    assert cli_import_violations(scan(src)) == [
        "src/kdistill/a.py:1: imports kdistill.cli (nothing imports the cli)",
        "src/kdistill/b.py:2: imports kdistill.cli (nothing imports the cli)",
    ]


def test_checker_finds_long_modules(tmp_path):
    src = _write(
        tmp_path,
        {
            "kdistill/__init__.py": "",
            "kdistill/long.py": "x = 1\n" * 401,
            "kdistill/exact.py": "x = 1\n" * 400,
            "kdistill/allowed.py": "x = 1\n" * 500,
        },
    )
    tree = scan(src)
    assert size_violations(tree, allowlist={"src/kdistill/allowed.py": "generated table"}) == [
        "src/kdistill/long.py:401: 401 lines, over the limit of 400",
    ]
    assert len(size_violations(tree, allowlist={})) == 2
