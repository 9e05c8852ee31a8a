"""The import rules of ``ARCHITECTURE.md`` (table "Import rules"), checked statically.

Every module under ``ugi_bids/`` is parsed with :mod:`ast`; every import counts, at any nesting
level (a lazy import inside a function is still an import of that module), relative imports are
resolved against the module's package, and importing ``a.b.c`` also counts as importing the
packages ``a`` and ``a.b`` (Python runs their ``__init__``). Rules about a third-party package
("never imports torch") hold over the transitive closure of *our* modules: a spatial module that
imports ``ugi_bids.engine.kernels.chain``, which imports torch, breaks the rule, and the failure
message shows the chain. Third-party packages are not followed.

Imports under ``if TYPE_CHECKING:`` are not counted (they never run).

Two runtime checks (in a fresh interpreter) back the static ones: loading an ``.h5``, resampling
or a Jacobian does not load torch, and the command-line front ends import without torch (so
``--help`` stays fast).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ugi_bids"


# --------------------------------------------------------------------------- the import graph

@dataclass
class ImportGraph:
    """Our modules (dotted name -> file), the modules of ours each one imports, and the
    third-party/standard-library names it imports (with line numbers)."""

    files: dict[str, Path]
    internal: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {ours: line}
    external: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {name: line}

    def closure(self, start: str) -> dict[str, str | None]:
        """Every module of ours that importing ``start`` runs (``start`` and its packages
        included), each mapped to the module that first imports it (breadth first)."""
        seen: dict[str, str | None] = {}
        queue: deque[tuple[str, str | None]] = deque([(start, None)])
        while queue:
            module, via = queue.popleft()
            if module in seen:
                continue
            seen[module] = via
            for package in _parents(module):
                if package in self.files:
                    queue.append((package, module))
            for imported in self.internal.get(module, {}):
                queue.append((imported, module))
        return seen

    def chain(self, closure: dict[str, str | None], module: str) -> list[str]:
        path = [module]
        while closure[path[-1]] is not None:
            path.append(closure[path[-1]])
        return path[::-1]


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _module_name(root: Path, path: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runnable_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _is_type_checking(node):
            stack.extend(node.orelse)
            stack.append(node.test)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _imported_names(tree: ast.AST, module: str, is_package: bool, known: set[str]):
    """``(dotted name, line)`` for every import in ``tree`` at any nesting level (but not under
    ``if TYPE_CHECKING:``), relative imports resolved; for ``from X import y`` both ``X`` and,
    when it is one of ours, the submodule ``X.y``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in _runnable_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                drop = node.level - 1
                if drop >= len(parts):
                    raise AssertionError(f"{module}:{node.lineno}: relative import beyond the top")
                base = ".".join(parts[: len(parts) - drop])
                if node.module:
                    base = f"{base}.{node.module}"
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            yield base, node.lineno
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}", node.lineno


def build_graph(root: Path) -> ImportGraph:
    """The import graph of the package whose folder is ``root``."""
    files = {_module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    graph = ImportGraph(files)
    top = root.name
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        internal, external = {}, {}
        for name, line in _imported_names(tree, module, path.name == "__init__.py", set(files)):
            if name == top or name.startswith(top + "."):
                # the module itself, or the deepest of its packages that is one of ours
                candidates = [name] + _parents(name)[::-1]
                target = next((c for c in candidates if c in files), None)
                if target is not None and target != module:
                    internal[target] = min(line, internal.get(target, line))
            else:
                external[name] = min(line, external.get(name, line))
        graph.internal[module], graph.external[module] = internal, external
    return graph


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph(REPO / PACKAGE)


# --------------------------------------------------------------------------- rule helpers

def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules_under(graph: ImportGraph, *prefixes: str) -> list[str]:
    found = sorted(m for m in graph.files if _in(m, prefixes))
    assert found, f"no module under {prefixes}: has the package moved?"
    return found


def forbidden_external(graph: ImportGraph, modules, forbidden) -> list[str]:
    """Every import of a ``forbidden`` top-level package reachable from ``modules`` through our
    own modules, as 'start: a -> b -> c imports torch (line n)'."""
    problems = []
    for start in modules:
        closure = graph.closure(start)
        for module in closure:
            for name, line in graph.external[module].items():
                if _in(name, forbidden):
                    chain = " -> ".join(graph.chain(closure, module))
                    problems.append(f"{start}: {chain} imports {name} (line {line})")
    return sorted(set(problems))


def forbidden_internal(graph: ImportGraph, modules, forbidden) -> list[str]:
    """Every module of ours matching ``forbidden`` that importing ``modules`` runs."""
    problems = []
    for start in modules:
        closure = graph.closure(start)
        for module in closure:
            if _in(module, forbidden):
                chain = graph.chain(closure, module)
                line = graph.internal[chain[-2]].get(module, "package") if len(chain) > 1 else "-"
                problems.append(f"{start}: {' -> '.join(chain)} (line {line})")
    return sorted(problems)


def direct_ours_outside(graph: ImportGraph, modules, allowed, exactly=()) -> list[str]:
    """Direct imports of our modules other than those under ``allowed``, the modules named in
    ``exactly`` and the package ``ugi_bids`` itself (which holds only ``__version__``)."""
    problems = []
    for module in modules:
        for imported, line in graph.internal[module].items():
            if imported not in (PACKAGE, *exactly) and not _in(imported, allowed):
                problems.append(f"{module} imports {imported} (line {line})")
    return sorted(problems)


# --------------------------------------------------------------------------- the rules

SPATIAL_FORMATS = ("ugi_bids.engine.spatial", "ugi_bids.engine.formats")
TORCH = ("torch",)
BIDS_APP_STACK = ("nipype", "niworkflows", "bids", "templateflow")
FRONT_ENDS = ("ugi_bids.cli", "ugi_bids.workflows", "ugi_bids.interfaces", "ugi_bids.utils")
SETTINGS = ("ugi_bids.errors", "ugi_bids.engine.options")
#: kernels without autograd: what spatial and formats may use
LIGHT_KERNELS = ("ugi_bids.engine.kernels.lattice", "ugi_bids.engine.kernels.layout")


def test_spatial_and_formats_never_import_torch(graph):
    """Also through our modules: spatial -> kernels.chain -> torch is a violation."""
    assert forbidden_external(graph, _modules_under(graph, *SPATIAL_FORMATS), TORCH) == []


def test_spatial_and_formats_use_only_light_kernels(graph):
    """Of the kernels, only the numba guard (the package) and the torch-free modules."""
    modules = _modules_under(graph, *SPATIAL_FORMATS)
    allowed = SETTINGS + SPATIAL_FORMATS + LIGHT_KERNELS
    assert direct_ours_outside(graph, modules, allowed, exactly=("ugi_bids.engine.kernels",)) == []


#: label tables and region volumes: read by the BIDS-App's parent process, the group level
LABEL_TABLES = ("ugi_bids.engine.labels.tables", "ugi_bids.engine.labels.volumes")


def test_label_tables_and_volumes_never_import_torch(graph):
    assert forbidden_external(graph, list(LABEL_TABLES), TORCH) == []


#: the mean of affines and the template's grid and average: numpy/scipy only
TEMPLATE_GEOMETRY = ("ugi_bids.engine.template.affine_mean", "ugi_bids.engine.template.space")


def test_template_geometry_never_imports_torch(graph):
    assert forbidden_external(graph, list(TEMPLATE_GEOMETRY), TORCH) == []


def test_light_kernels_never_import_torch(graph):
    modules = ["ugi_bids.engine.kernels", *LIGHT_KERNELS]
    assert forbidden_external(graph, modules, TORCH) == []


def test_kernels_import_nothing_above_them(graph):
    modules = _modules_under(graph, "ugi_bids.engine.kernels")
    assert direct_ours_outside(graph, modules, ("ugi_bids.engine.kernels",) + SETTINGS) == []


def test_engine_never_imports_the_bids_app_stack(graph):
    modules = _modules_under(graph, "ugi_bids.engine")
    assert forbidden_external(graph, modules, BIDS_APP_STACK) == []


def test_engine_never_imports_the_front_ends(graph):
    modules = _modules_under(graph, "ugi_bids.engine")
    assert forbidden_internal(graph, modules, FRONT_ENDS + ("ugi_bids.config",)) == []


def test_engine_imports_only_errors_and_engine(graph):
    modules = _modules_under(graph, "ugi_bids.engine")
    assert direct_ours_outside(graph, modules, ("ugi_bids.errors", "ugi_bids.engine")) == []


def test_model_optimise_prealign_never_import_the_registrar(graph):
    modules = _modules_under(graph, "ugi_bids.engine.model", "ugi_bids.engine.optimise",
                             "ugi_bids.engine.prealign")
    assert forbidden_internal(graph, modules, ("ugi_bids.engine.registrar",)) == []


@pytest.mark.parametrize("module", SETTINGS)
def test_settings_modules_import_only_the_standard_library(graph, module):
    assert module in graph.files
    assert graph.internal[module] == {}, "imports something of ours"
    third_party = {n: line for n, line in graph.external[module].items()
                   if n.partition(".")[0] not in sys.stdlib_module_names}
    assert third_party == {}


def test_config_imports_no_torch_nipype_or_argparse(graph):
    assert forbidden_external(graph, ["ugi_bids.config"], ("torch", "nipype", "argparse")) == []


def test_config_imports_only_errors_options_and_space_syntax(graph):
    """ARCHITECTURE.md: ``config`` may import ``errors`` and ``engine.options``, and
    ``utils.templates`` and ``utils.atlases`` (lazily) to check space and atlas syntax when a
    TOML file is read; nothing else of ours."""
    assert direct_ours_outside(graph, ["ugi_bids.config"], SETTINGS,
                               exactly=("ugi_bids.utils", "ugi_bids.utils.templates",
                                        "ugi_bids.utils.atlases")) == []


def test_interfaces_never_import_workflows_or_cli(graph):
    modules = _modules_under(graph, "ugi_bids.interfaces")
    assert forbidden_internal(graph, modules, ("ugi_bids.workflows", "ugi_bids.cli")) == []


def test_workflows_never_import_cli(graph):
    modules = _modules_under(graph, "ugi_bids.workflows")
    assert forbidden_internal(graph, modules, ("ugi_bids.cli",)) == []


# --------------------------------------------------------------------------- the checker itself

def test_the_checker_follows_relative_nested_and_transitive_imports(tmp_path):
    """A synthetic package: the violations the rules above look for are all found."""
    root = tmp_path / "pkg"
    sources = {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/light.py": "from ..b import heavy\n",              # relative, from-import of a module
        "a/lazy.py": "def f():\n    if True:\n        from pkg.b.heavy import x\n",  # nested
        "a/clean.py": "import numpy\nfrom . import light as _\n",
        "b/__init__.py": "import json\n",
        "b/heavy.py": "import torch.nn.functional as F\n",
        "c.py": "from .b import helper\n",                    # package attribute, not a module
        "b/helper_pkg/__init__.py": "import torch\n",
        "d.py": "import pkg.b.helper_pkg.missing\n",          # deepest existing package counts
        "e.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                 "else:\n    import numpy\n"),                # annotations only: not an import
    }
    for name, text in sources.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    fake = build_graph(root)
    assert fake.internal["pkg.a.light"] == {"pkg.b": 1, "pkg.b.heavy": 1}
    assert fake.internal["pkg.a.lazy"] == {"pkg.b.heavy": 3}
    assert fake.internal["pkg.c"] == {"pkg.b": 1}
    assert fake.internal["pkg.d"] == {"pkg.b.helper_pkg": 1}
    assert fake.external["pkg.b.heavy"] == {"torch.nn.functional": 1}
    assert fake.external["pkg.e"] == {"typing": 1, "numpy": 5}
    found = forbidden_external(fake, ["pkg.a.light", "pkg.a.lazy", "pkg.a.clean", "pkg.c",
                                      "pkg.d", "pkg.e"], TORCH)
    assert found == [
        ("pkg.a.clean: pkg.a.clean -> pkg.a.light -> pkg.b.heavy imports torch.nn.functional "
         "(line 1)"),
        "pkg.a.lazy: pkg.a.lazy -> pkg.b.heavy imports torch.nn.functional (line 1)",
        "pkg.a.light: pkg.a.light -> pkg.b.heavy imports torch.nn.functional (line 1)",
        "pkg.d: pkg.d -> pkg.b.helper_pkg imports torch (line 1)",
    ]
    assert forbidden_internal(fake, ["pkg.c"], ("pkg.b",)) == ["pkg.c: pkg.c -> pkg.b (line 1)"]
    assert direct_ours_outside(fake, ["pkg.a.clean"], ("pkg.a",)) == []
    assert direct_ours_outside(fake, ["pkg.a.light"], ("pkg.a",)) == [
        "pkg.a.light imports pkg.b (line 1)", "pkg.a.light imports pkg.b.heavy (line 1)"]
    # a package allowed exactly does not allow its modules
    assert direct_ours_outside(fake, ["pkg.a.light"], ("pkg.a",), exactly=("pkg.b",)) == [
        "pkg.a.light imports pkg.b.heavy (line 1)"]


# --------------------------------------------------------------------------- at run time

def _loaded_after(statement: str) -> dict:
    """Which heavy packages a fresh interpreter has loaded after ``statement``."""
    probe = textwrap.dedent(f"""
        import json, sys
        {statement}
        heavy = ("torch", "nipype", "niworkflows", "bids", "templateflow")
        print(json.dumps({{name: name in sys.modules for name in heavy}}))
    """)
    result = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_files_resampling_and_jacobians_load_without_torch():
    loaded = _loaded_after("import ugi_bids.engine.formats.itk, ugi_bids.engine.spatial.warp, "
                           "ugi_bids.engine.spatial.jacobian")
    assert loaded == dict.fromkeys(loaded, False)


def test_command_lines_import_without_torch_or_nipype():
    """``--help`` must stay fast: the parsers import neither torch nor the BIDS-App stack."""
    loaded = _loaded_after("import ugi_bids.cli.parser, ugi_bids.cli.register, ugi_bids.cli.run")
    assert loaded == dict.fromkeys(loaded, False)
