"""Self-checking architecture rules over the library packages (``cache_server``, ``kdlib``, ``triton_kernels``).

The rules of docs/ARCHITECTURE.md and docs/CONTRIBUTING_NOTES.md, checked from the source text (nothing of the
library is imported, so a module that does not import still gets a readable report). One test per rule:

1. Import contract, read from the AST of every module: every ``import`` / ``from ... import`` statement anywhere
   (module level, inside functions, under ``if TYPE_CHECKING:``) and every ``importlib.import_module("...")``
   call with a literal name.
2. No block of 6 or more repeated lines in library code (pylint's duplicate-code checker).
3. No module over 500 lines; no function over 80 lines unless the line above its ``def`` (or above its
   decorators) is a comment ``# long: <reason>``.

Tests, benchmarks and examples are not library code and are not checked. The last tests plant each kind of
violation in a small library under ``tmp_path`` and check that its rule reports it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = ("cache_server", "kdlib", "triton_kernels")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MIN_SIMILARITY_LINES = 6
LONG_MARKER = "# long:"
FORMAT, BUILD, SERVE, CLI = "cache_server.format", "cache_server.build", "cache_server.serve", "cache_server.cli"
INTEROP = "cache_server.interop"


# ----------------------------------------------------------------------------------------------- the module graph


@dataclass(frozen=True)
class Import:
    """One import in a module: ``target`` is a module of ours, or the top-level name of an external package."""

    importer: str  # dotted name of the module holding the statement
    target: str
    path: str  # file path relative to the library root
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.target}  ({self.path}:{self.line})"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _resolve_relative(package: str, level: int, module: str | None) -> str:
    """The absolute name of ``from {'.' * level}{module} import ...`` written in a module of ``package``."""
    parts = package.split(".")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _literal_import_module(node: ast.Call) -> tuple[str, str | None] | None:
    """``(name, package)`` of an ``importlib.import_module("literal"[, "package"])`` call, else None."""
    func = node.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module" and isinstance(func.value, ast.Name)
             and func.value.id == "importlib") or (isinstance(func, ast.Name) and func.id == "import_module")
    literals = [a.value for a in [*node.args[:2], *(k.value for k in node.keywords if k.arg == "package")]
                if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if not (named and node.args and isinstance(node.args[0], ast.Constant) and literals):
        return None
    return literals[0], (literals[1] if len(literals) > 1 else None)


class Library:
    """The ``.py`` files of the library packages under ``root``, and the imports between them."""

    def __init__(self, root: Path, packages: tuple[str, ...] = LIBRARY_PACKAGES):
        self.root = root
        self.packages = packages

    @cached_property
    def modules(self) -> dict[str, Path]:
        """Dotted module name -> file (``pkg/__init__.py`` is module ``pkg``)."""
        modules = {}
        for package in self.packages:
            for path in sorted((self.root / package).rglob("*.py")):
                if "__pycache__" not in path.parts:
                    parts = list(path.relative_to(self.root).with_suffix("").parts)
                    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        return modules

    def relpath(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def is_ours(self, name: str) -> bool:
        return name.split(".")[0] in self.packages

    def node_of(self, name: str) -> str:
        """The graph node of an imported dotted name: the module of ours (or its longest prefix that is one),
        or the top-level name of an external package."""
        if not self.is_ours(name):
            return name.split(".")[0]
        parts = name.split(".")
        while parts and ".".join(parts) not in self.modules:
            parts.pop()
        return ".".join(parts) or name  # no such file of ours (a typo or a removed module): kept as written

    def _imported_names(self, module: str, path: Path) -> list[tuple[str, int]]:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: list[tuple[str, int]] = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_relative(package, node.level, node.module) if node.level else node.module
                for alias in node.names:
                    # `from pkg import name` imports module pkg.name when there is one, else a name of pkg.
                    submodule = f"{base}.{alias.name}"
                    found.append((submodule if submodule in self.modules else base, node.lineno))
            elif isinstance(node, ast.Call) and (call := _literal_import_module(node)):
                name, anchor = call
                if name.startswith("."):
                    stripped = name.lstrip(".")
                    name = _resolve_relative(anchor or package, len(name) - len(stripped), stripped or None)
                found.append((name, node.lineno))
        return found

    @cached_property
    def imports(self) -> list[Import]:
        """Every import of every module (a module importing itself, e.g. a name of its own package, left out).

        No edge is added from a submodule to its own parent package: Python runs ``pkg/__init__`` before
        ``pkg.sub``, but that is no dependency of ``pkg.sub``. An explicit ``from pkg import NAME`` in ``pkg.sub``
        is one, and an ``__init__`` importing its submodules is one too.
        """
        found: dict[Import, None] = {}
        for module, path in self.modules.items():
            for name, line in self._imported_names(module, path):
                imp = Import(module, self.node_of(name), self.relpath(path), line)
                if imp.target != module:
                    found[imp] = None
        return list(found)

    def graph(self) -> nx.DiGraph:
        """Modules of ours as nodes; an edge per importing pair, with every ``file:line`` that makes it."""
        graph = nx.DiGraph()
        for imp in self.imports:
            if imp.target in self.modules:
                graph.add_edge(imp.importer, imp.target)
                graph.edges[imp.importer, imp.target].setdefault("where", {})[f"{imp.path}:{imp.line}"] = None
        return graph


# ----------------------------------------------------------------------------------------------- the rules


def format_violations(lib: Library) -> list[Import]:
    return [imp for imp in lib.imports if _in(imp.importer, FORMAT)
            and ((lib.is_ours(imp.target) and not _in(imp.target, FORMAT)) or imp.target == "torch")]


def kdlib_violations(lib: Library) -> list[Import]:
    return [imp for imp in lib.imports if _in(imp.importer, "kdlib") and _in(imp.target, "cache_server")
            and not _in(imp.target, FORMAT)]


def build_serve_violations(lib: Library) -> list[Import]:
    return [imp for imp in lib.imports for a, b in ((BUILD, SERVE), (SERVE, BUILD))
            if _in(imp.importer, a) and _in(imp.target, b)]


def both_rooms_violations(lib: Library) -> list[Import]:
    """Imports of build and serve by a module, outside cache_server.cli, that imports both."""
    by_importer: dict[str, dict[str, list[Import]]] = {}
    for imp in lib.imports:
        for room in (BUILD, SERVE):
            if _in(imp.target, room) and not _in(imp.importer, room):
                by_importer.setdefault(imp.importer, {}).setdefault(room, []).append(imp)
    return [imp for importer, rooms in sorted(by_importer.items()) if len(rooms) == 2 and not _in(importer, CLI)
            for imps in rooms.values() for imp in imps]


def interop_violations(lib: Library) -> list[Import]:
    """cache_server.interop (import/export of peers' datasets) reads and writes caches: format and build only."""
    return [imp for imp in lib.imports if _in(imp.importer, INTEROP) and lib.is_ours(imp.target)
            and not any(_in(imp.target, room) for room in (INTEROP, FORMAT, BUILD))]


def triton_violations(lib: Library) -> list[Import]:
    return [imp for imp in lib.imports if _in(imp.importer, "triton_kernels") and lib.is_ours(imp.target)
            and not _in(imp.target, "triton_kernels")]


def import_cycles(lib: Library) -> list[str]:
    """One entry per strongly connected group of modules, with the edges (and their file:line) inside it."""
    graph = lib.graph()
    cycles = []
    for component in sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1):
        edges = [f"{a} -> {b}  ({', '.join(graph.edges[a, b]['where'])})"
                 for a, b in sorted(graph.subgraph(component).edges)]
        cycles.append(f"cycle among {', '.join(component)}:\n    " + "\n    ".join(edges))
    return cycles


_SIMILAR = re.compile(r"^==(?P<path>[^:]+):\[(?P<start>\d+):(?P<stop>\d+)\]$")


def _without_imports_and_signatures(path: Path) -> str:
    """The file with its import statements and ``def`` signatures blanked (line numbers kept).

    What pylint's ``--ignore-imports=yes`` and its default ``--ignore-signatures=yes`` leave out, found with the
    stdlib ``ast``: pylint finds them with astroid, whose parse infers through torch and takes minutes here.
    """
    lines = path.read_text().splitlines()
    ignored: set[int] = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            ignored.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            ignored.update(range(node.lineno, node.body[0].lineno))
    return "".join(("" if number in ignored else line) + "\n" for number, line in enumerate(lines, start=1))


_AGAIN = " (again)"  # the stream name of a file's second copy, for repeats inside one file


def _symilar_blocks(streams: dict[str, str]) -> list[list[tuple[str, int, int]]]:
    """pylint's Symilar over named texts: per repeated block, its places as (name, first line, last line)."""
    try:
        from pylint.checkers.symilar import Symilar
    except ImportError:
        pytest.fail("the repeated-code rule needs pylint (a dev dependency): pip install -e '.[dev]'")

    # pylint reports a common run only when it is LONGER than min_lines (`eff_cmn_nb > min_similarity_lines`
    # in symilar.py): one less makes "6 or more lines" the rule.
    symilar = Symilar(min_lines=MIN_SIMILARITY_LINES - 1, ignore_comments=True, ignore_docstrings=True)
    for name, text in streams.items():
        symilar.append_stream(name, io.StringIO(text))
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        symilar.run()
    blocks, current = [], []
    for line in [*report.getvalue().splitlines(), "<end>"]:
        match = _SIMILAR.match(line.strip())
        if match:  # pylint prints a 0-based start and an exclusive stop: 1-based lines start+1 .. stop
            current.append((match["path"], int(match["start"]) + 1, int(match["stop"])))
        elif current:
            blocks.append(current)
            current = []
    return blocks


def repeated_blocks(lib: Library) -> list[str]:
    """Places sharing ``MIN_SIMILARITY_LINES`` or more code lines, found by pylint's duplicate-code checker.

    The algorithm and options of ``pylint --disable=all --enable=duplicate-code --min-similarity-lines=6
    --ignore-imports=yes --ignore-docstrings=yes --ignore-comments=yes``, run in-process on pre-stripped text.
    pylint compares files pairwise only, so each file is also compared with a copy of itself (the trivial
    match of every line with itself left out) to find a block repeated inside one module.
    """
    texts = {lib.relpath(path): _without_imports_and_signatures(path) for path in lib.modules.values()}
    found = [" ~ ".join(f"{name}:{first}-{last}" for name, first, last in block)
             for block in _symilar_blocks(texts)]
    for name, text in texts.items():
        if sum(bool(line.strip()) for line in text.splitlines()) < 2 * MIN_SIMILARITY_LINES:
            continue  # too short to hold a block twice (and pylint's report divides by its line count)
        inside = set()
        for block in _symilar_blocks({name: text, name + _AGAIN: text}):
            places = tuple(sorted({(first, last) for _, first, last in block}))
            if len(places) > 1:  # one place only: the file matching its own copy line for line
                inside.add(places)
        found += [" ~ ".join(f"{name}:{first}-{last}" for first, last in places) for places in sorted(inside)]
    return found


def long_modules(lib: Library) -> list[str]:
    return [f"{lib.relpath(path)}: {lines} lines" for path in lib.modules.values()
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES]


def long_functions(lib: Library) -> list[str]:
    """Functions (methods and nested ones too) longer than the limit without a ``# long: <reason>`` line above."""
    violations = []
    for path in lib.modules.values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            has_reason = above.startswith(LONG_MARKER) and above[len(LONG_MARKER):].strip()
            if length > MAX_FUNCTION_LINES and not has_reason:
                violations.append(f"{lib.relpath(path)}:{node.lineno} {node.name}: {length} lines")
    return sorted(violations)


# ----------------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def library() -> Library:
    lib = Library(REPO)
    for name in (FORMAT, "kdlib", "triton_kernels"):
        if name not in lib.modules:
            pytest.fail(f"{name} not found under {REPO}: the architecture tests look in the wrong place")
    return lib


def _assert_none(found: list, rule: str) -> None:
    __tracebackhide__ = True  # pytest: the failure shows the rule's test, not this helper
    assert not found, f"{rule} ({len(found)}):\n" + "\n".join(f"  {v}" for v in found)


def test_format_imports_nothing_else_of_ours_and_no_torch(library):
    """The on-disk contract stands alone: the server, kdlib and tooling all read it; it must not need torch."""
    _assert_none(format_violations(library), "cache_server.format imports another part of ours, or torch")


def test_kdlib_imports_only_format_from_cache_server(library):
    """A training job installs kdlib without the build or the server side: move what it needs into format."""
    _assert_none(kdlib_violations(library), "kdlib imports cache_server beyond cache_server.format")


def test_build_and_serve_never_import_each_other(library):
    _assert_none(build_serve_violations(library), "cache_server.build and cache_server.serve import each other")


def test_only_cli_imports_both_build_and_serve(library):
    """Only the command line wires the two sides together; anything both need belongs in format."""
    _assert_none(both_rooms_violations(library), "modules outside cache_server.cli importing build and serve")


def test_interop_imports_only_format_and_build(library):
    """Import/export write through the build's writer and read the format; never the server or kdlib."""
    _assert_none(interop_violations(library), "cache_server.interop imports beyond cache_server.format/build")


def test_triton_kernels_imports_nothing_of_ours(library):
    """The kernels take tensors and return tensors; kdlib.losses dispatches to them, never the other way."""
    _assert_none(triton_violations(library), "triton_kernels imports cache_server or kdlib")


def test_no_import_cycles(library):
    """Lazy imports inside functions count: they only hide a cycle until the function first runs.

    Break one by moving the shared piece into a module both import, or by passing it in as an argument.
    """
    _assert_none(import_cycles(library), "import cycles between library modules")


def test_no_repeated_blocks_in_library_code(library):
    _assert_none(repeated_blocks(library),
                 f"blocks of {MIN_SIMILARITY_LINES}+ repeated lines (pylint duplicate-code): one function for both")


def test_no_module_over_500_lines(library):
    _assert_none(long_modules(library), f"modules over {MAX_MODULE_LINES} lines (split them by concept)")


def test_no_function_over_80_lines_without_a_reason(library):
    """Split long functions into named steps; where one really must be long, say why on the line above it."""
    _assert_none(long_functions(library), f"functions over {MAX_FUNCTION_LINES} lines without a "
                                          f"`{LONG_MARKER} <reason>` comment above the def (or its decorators)")


# ----------------------------------------------------------------------------------------------- the rules catch


def _write(root: Path, files: dict[str, str]) -> Library:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return Library(root)


def test_the_import_rules_catch_planted_violations(tmp_path):
    lib = _write(tmp_path, {
        "cache_server/__init__.py": "",
        "cache_server/format/__init__.py": "from .layout import Layout\nfrom . import errors\n",
        "cache_server/format/errors.py": "from cache_server.format import Layout\n",  # explicit: counts
        "cache_server/tools.py": "from cache_server.build import job\nfrom cache_server.serve import app\n",
        "cache_server/format/layout.py": "def f():\n    import torch\n    from cache_server.build import job\n",
        "cache_server/build/__init__.py": "",
        "cache_server/build/job.py": "from ..serve import app\n",
        "cache_server/serve/__init__.py": "",
        "cache_server/serve/app.py": "import importlib\nimportlib.import_module('cache_server.build.job')\n",
        "cache_server/cli/__init__.py": "from cache_server.build import job\nfrom cache_server.serve import app\n",
        "kdlib/__init__.py": "from cache_server.format import layout\n",
        "kdlib/loader.py": "from cache_server.serve.app import x\nfrom . import batch\n",
        "kdlib/batch.py": "def g():\n    from kdlib.loader import y\n",
        "triton_kernels/__init__.py": "",
        "triton_kernels/k.py": "import kdlib.batch\n",
    })
    assert [str(v) for v in format_violations(lib)] == [
        "cache_server.format.layout -> torch  (cache_server/format/layout.py:2)",
        "cache_server.format.layout -> cache_server.build.job  (cache_server/format/layout.py:3)"]
    assert [str(v) for v in kdlib_violations(lib)] == [
        "kdlib.loader -> cache_server.serve.app  (kdlib/loader.py:1)"]
    assert [str(v) for v in build_serve_violations(lib)] == [
        "cache_server.build.job -> cache_server.serve.app  (cache_server/build/job.py:1)",
        "cache_server.serve.app -> cache_server.build.job  (cache_server/serve/app.py:2)"]
    assert [str(v) for v in both_rooms_violations(lib)] == [  # cache_server.cli may import both, tools may not
        "cache_server.tools -> cache_server.build.job  (cache_server/tools.py:1)",
        "cache_server.tools -> cache_server.serve.app  (cache_server/tools.py:2)"]
    assert [str(v) for v in triton_violations(lib)] == ["triton_kernels.k -> kdlib.batch  (triton_kernels/k.py:1)"]
    cycles = import_cycles(lib)
    assert [c.splitlines()[0] for c in cycles] == [
        "cycle among cache_server.build.job, cache_server.serve.app:",  # a lazy import_module closes it
        "cycle among cache_server.format, cache_server.format.errors:",  # layout has no implicit parent edge
        "cycle among kdlib.batch, kdlib.loader:"]  # a lazy import inside a function closes it
    assert "kdlib.batch -> kdlib.loader  (kdlib/batch.py:2)" in cycles[2]


def test_the_size_and_repetition_rules_catch_planted_violations(tmp_path):
    body = "".join(f"    v{i} = {i} * x + {i}\n" for i in range(MAX_FUNCTION_LINES))
    shared = [f"    total = total + {i} * x\n" for i in range(MIN_SIMILARITY_LINES)]
    other_body = body.replace(" * x + ", " - x * ")
    long_text = f"def too_long(x):\n{body}\n\n# long: one table of cases\ndef allowed(x):\n{other_body}" + "\n" * 500
    again = [f"    count = count - {i} * x\n" for i in range(MIN_SIMILARITY_LINES)]
    lib = _write(tmp_path, {
        "kdlib/__init__.py": "",
        "kdlib/long.py": long_text,
        "kdlib/a.py": "def a(x):\n    total = 0\n" + "".join(shared) + "    return total\n",
        "kdlib/b.py": 'def b(x, y):\n    """Doc."""\n' + "".join(shared) + "    return -total\n",
        "kdlib/c.py": "def c(x):\n" + "".join(shared[:-1]),  # one line short of a repeated block
        "kdlib/d.py": "def d1(x):\n    count = 0\n" + "".join(again) + "    return count\n\n\n"
                      "def d2(x):\n    count = 1\n" + "".join(again) + "    return -count\n",  # inside one file
    })
    assert long_functions(lib) == [f"kdlib/long.py:1 too_long: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_modules(lib) == [f"kdlib/long.py: {len(long_text.splitlines())} lines"]
    stop = 2 + MIN_SIMILARITY_LINES
    assert repeated_blocks(lib) == [f"kdlib/a.py:3-{stop} ~ kdlib/b.py:3-{stop}",
                                    f"kdlib/d.py:3-{stop} ~ kdlib/d.py:14-{stop + 11}"]
