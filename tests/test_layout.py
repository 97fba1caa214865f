"""The package layout (issue 18, docs/ARCHITECTURE.md): the library never imports the application
(``sharded_optim.app``), and the checkpoint modules import each other without a cycle.

Read from the source with ``ast`` (every import statement, at module level or inside a function), so a cycle
that only works because an import sits at the bottom of a module, or a lazy import of the app inside a library
function, is caught too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.jobs import REPO, job_env

PACKAGE = REPO / "sharded_optim"
APP = "sharded_optim.app"
CHECKPOINT = "sharded_optim.checkpoint"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def library_modules() -> dict[str, Path]:
    """Everything but the app and ``__main__`` (the ``python -m sharded_optim`` shim that starts the app)."""
    return {name: path for name, path in all_modules().items()
            if name != APP and not name.startswith(APP + ".") and name != "sharded_optim.__main__"}


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports: modules, and ``package.attribute`` for ``from package
    import attribute`` (an attribute that is a submodule is then that module's name)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    return out


def test_import_resolution_reads_relative_imports():
    path = PACKAGE / "checkpoint" / "saving.py"
    found = imports("sharded_optim.checkpoint.saving", path)
    assert {"sharded_optim.optimizer", "sharded_optim.checkpoint.state", "sharded_optim.agreement"} <= found, found


def test_the_library_never_imports_the_app():
    offenders = {name: sorted(m for m in imports(name, path) if m == APP or m.startswith(APP + "."))
                 for name, path in library_modules().items()}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"library modules importing the application: {offenders}"


def test_library_modules_exist_outside_the_app():
    names = set(library_modules())
    # the rooms of docs/ARCHITECTURE.md: a move that drops one of them out of the library fails here
    for module in ("sharded_optim", "sharded_optim.optimizer", "sharded_optim.rules", "sharded_optim.dist",
                   "sharded_optim.kernels", "sharded_optim.telemetry", "sharded_optim.integrations", CHECKPOINT):
        assert module in names, module


def test_importing_the_library_loads_no_app_module():
    modules = [n for n in library_modules() if not n.startswith("sharded_optim.integrations.")]  # optional deps
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m == {APP!r} or m.startswith({APP + '.'!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=job_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def import_graph(prefix: str) -> dict[str, set[str]]:
    """Edges between the modules of package ``prefix``.  A submodule's import of its own parent package is not an
    edge (Python imports the parent first anyway); importing a *name* from the package's ``__init__`` is."""
    modules = {n: p for n, p in all_modules().items() if n == prefix or n.startswith(prefix + ".")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in imports(name, path):
            if target in modules:
                if not (target == prefix and name != prefix):
                    edges.add(target)
            elif target.rpartition(".")[0] in modules:  # from package import attribute: the package's __init__
                edges.add(target.rpartition(".")[0])
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_the_old_circle():
    # the shape before the checkpoint package: checkpoint.py -> ckpt_load.py -> checkpoint.py
    old = {"checkpoint": {"ckpt_load", "ckpt_io"}, "ckpt_load": {"checkpoint", "ckpt_io"}, "ckpt_io": set()}
    assert find_cycle(old) == ["checkpoint", "ckpt_load", "checkpoint"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_checkpoint_modules_have_no_import_cycle():
    graph = import_graph(CHECKPOINT)
    assert len(graph) >= 9, sorted(graph)  # __init__, format, state, io, integrity, diagnose, saving, loading, ...
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])
    # only the package's __init__ re-exports: a submodule importing names from it would close a circle
    for name, edges in graph.items():
        if name != CHECKPOINT:
            assert CHECKPOINT not in edges, f"{name} imports from the package {CHECKPOINT} itself"


def test_no_flat_checkpoint_modules_are_left():
    assert not sorted(p.name for p in PACKAGE.glob("ckpt_*.py")), "checkpoint modules belong in checkpoint/"
    assert not (PACKAGE / "checkpoint.py").exists()


# ------------------------------------------------------------------------------- documented and typed (issue 18)
def _is_setter(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Attribute) and d.attr == "setter" for d in node.decorator_list)


def api_problems(source: str, where: str) -> list[str]:
    """Public classes, functions and methods (at module level and in public classes; names not starting with
    ``_``, plus ``__init__``) of one module that lack a docstring, a parameter annotation or a return annotation.

    ``__init__`` needs no docstring (the class has one) and no return annotation, but annotated parameters; a
    property setter (``@x.setter``) is documented by its getter.  ``self`` and ``cls`` need no annotation."""
    problems: list[str] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                if not ast.get_docstring(node):
                    problems.append(f"{where}:{node.lineno}: class {prefix}{node.name}: no docstring")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                name = f"{where}:{node.lineno}: {prefix}{node.name}"
                if node.name != "__init__" and not _is_setter(node) and not ast.get_docstring(node):
                    problems.append(f"{name}: no docstring")
                a = node.args
                params = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x is not None]
                untyped = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
                if untyped:
                    problems.append(f"{name}: parameters without annotation: {', '.join(untyped)}")
                if node.returns is None and node.name != "__init__":
                    problems.append(f"{name}: no return annotation")

    visit(ast.parse(source, filename=where).body, "")
    return problems


def test_api_checker_applies_the_rules():
    source = '''
class Public:
    def __init__(self, a: int, b):
        pass

    @property
    def value(self) -> int:
        """Documented."""

    @value.setter
    def value(self, v: int) -> None:
        pass

    def method(self, *args, **kwargs: int):
        pass

    def _private(self, x):
        pass


class _Private:
    def method(self):
        pass


def function(x: int) -> int:
    """Documented and typed."""


async def coroutine(*, key) -> None:
    """Documented."""
'''
    assert api_problems(source, "m.py") == [
        "m.py:2: class Public: no docstring",
        "m.py:3: Public.__init__: parameters without annotation: b",
        "m.py:14: Public.method: no docstring",
        "m.py:14: Public.method: parameters without annotation: args",
        "m.py:14: Public.method: no return annotation",
        "m.py:30: coroutine: parameters without annotation: key",
    ]


def test_every_public_class_and_function_is_documented_and_typed():
    problems = [problem for path in sorted(PACKAGE.rglob("*.py"))
                for problem in api_problems(path.read_text(), str(path.relative_to(REPO)))]
    assert not problems, f"{len(problems)} public definitions undocumented or untyped:\n" + "\n".join(problems)


MAX_MODULE_LINES = 400  # one module, one job (issue 18): a module past this is doing two


def test_no_module_is_over_the_size_limit():
    sizes = {str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert sizes, "no modules found"
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


# ------------------------------------------------------------------------------------- test result keys
def tuple_keyed_lookups(source: str, where: str) -> list[str]:
    """Subscripts whose index is a tuple holding a string, ``r[("assign", stage)]`` or ``out[name, "alone"]``:
    results keyed like that fail naming a key, not the scenario (issue 18).  Name the scenario instead
    (``r["assign zero-2"]``, ``tests/support/scenarios.py``).  Array indexing (``x[:, 1:]``, ``s[:, F["numel"]]``:
    the string sits inside another subscript, not in the tuple) and ``Literal["a", "b"]`` are not flagged."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if not (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple)):
            continue
        if getattr(node.value, "id", getattr(node.value, "attr", None)) == "Literal":
            continue
        if any(isinstance(e, ast.JoinedStr) or (isinstance(e, ast.Constant) and isinstance(e.value, str))
               for e in node.slice.elts):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_tuple_key_checker_flags_tuple_keys_only():
    source = textwrap.dedent('''
        r[("assign", stage)]
        out["dtype", 2] = 1
        r[name, "alone_error"]
        r[f"{how}", stage]
        x = r["assign zero-2"], r[zero("assign", 2)], r[name][stage]
        a[:, 1:], a[i, j], s[:, F["numel"]], a[0, ...], d[(1, 2)]
        def f(x: dict[str, tuple[int, ...]]) -> Callable[[], Literal["a", "b"]]: ...
    ''')
    assert tuple_keyed_lookups(source, "t.py") == ["t.py:2: r['assign', stage]", "t.py:3: out['dtype', 2]",
                                                   "t.py:4: r[name, 'alone_error']", "t.py:5: r[f'{how}', stage]"]


def test_no_test_keys_results_by_tuples():
    tests = REPO / "tests"
    found = [hit for path in sorted(tests.rglob("*.py"))
             for hit in tuple_keyed_lookups(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, ("results keyed by tuples (name the scenario instead, tests/support/scenarios.py):\n"
                       + "\n".join(found))
