"""What imports what: only the Serve application, the cluster and launch helpers and the
trainer's distributed runner import Ray; the runtime never imports the trainer and has no import
cycles; the client imports neither; and the command line stays cheap.

The rules read the source with :mod:`ast`, so an import inside a function counts as much as one
at the top of a module."""

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
TRAINING = ROOT / "training"
CLIENT = ROOT / "clients" / "python" / "src"
MAY_IMPORT_RAY = (
    "serving/app/",
    "serving/cluster.py",
    "serving/launch.py",
    "training/distributed.py",
)
"""Paths from the repository root (a folder ends with ``/``) of the only modules that import
Ray."""


@pytest.mark.parametrize(
    "module",
    [
        "serving.predictor",
        "serving.bundle",
        "serving.service",
        "serving.settings",
        "serving.cli",
        "training.cli",
    ],
)
def test_importing_does_not_import_ray(module):
    code = (
        f"import sys, {module}\n"
        "loaded = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def python_files(*folders: Path) -> list[Path]:
    return sorted(path for folder in folders for path in folder.rglob("*.py"))


def module_name(path: Path, root: Path = ROOT) -> str:
    """``serving/engine/__init__.py`` → ``serving.engine``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from ... import`` names, its relative dots resolved within ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(path: Path, root: Path = ROOT, *, top_level: bool = False) -> Iterator[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, with
    ``module.name`` too for each ``from module import name`` (``name`` may be a submodule).

    ``top_level``: only the imports a module runs as it is imported, not those in functions,
    classes or ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    module, is_package = module_name(path, root), path.name == "__init__.py"

    def statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in body:
            yield node
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from statements(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                yield from statements(node.body + node.orelse + node.finalbody)
                for handler in node.handlers:
                    yield from statements(handler.body)

    nodes = statements(tree.body) if top_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def _top(name: str) -> str:
    return name.split(".")[0]


def test_serving_imports_nothing_from_training():
    """A server installs without the trainer's dependencies; the trainer's commands reach
    ``espro`` through an entry point, never an import."""
    modules = python_files(SERVING)
    assert SERVING / "cli.py" in modules
    found = {
        str(path.relative_to(ROOT)): trainer
        for path in modules
        if (trainer := sorted({m for m in imports(path) if _top(m) == "training"}))
    }
    assert found == {}


def test_only_the_serve_app_cluster_launch_and_distributed_training_import_ray():
    """Ray stays out of the runtime (``Predictor``, the service, the engines) and the trainer,
    which run and are tested without it."""
    importers = {
        path.relative_to(ROOT).as_posix()
        for path in python_files(SERVING, TRAINING, CLIENT)
        if any(_top(name) == "ray" for name in imports(path))
    }
    assert {"serving/cluster.py", "serving/launch.py", "training/distributed.py"} <= importers
    assert {path for path in importers if not path.startswith(MAY_IMPORT_RAY)} == set()


def test_the_serving_modules_import_one_another_without_cycles():
    """The graph of the imports each ``serving`` module runs as it is imported (a module also
    imports the packages above what it names) has no cycle."""
    modules = {module_name(path): path for path in python_files(SERVING)}

    def requires(name: str) -> set[str]:
        """``name`` and its packages, where they are serving modules."""
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()

    graph = {
        module: {
            needed
            for name in imports(path, top_level=True)
            for needed in requires(name)
            if needed != module and not module.startswith(f"{needed}.")
        }
        for module, path in modules.items()
    }
    assert "serving.service" in graph and "serving.batching" in graph["serving.service"]
    assert find_cycle(graph) is None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (as the path that closes it), or ``None``."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for successor in sorted(graph.get(node, ())):
            if cycle := visit(successor, [*path, node]):
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node, []):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_client_imports_neither_the_server_nor_the_trainer():
    """``espro-client`` installs alone (test_client.py checks it imports without torch or
    Ray)."""
    found = {
        str(path.relative_to(ROOT)): forbidden
        for path in python_files(CLIENT)
        if (forbidden := {m for m in imports(path, CLIENT) if _top(m) in ("serving", "training")})
    }
    assert found == {}


def test_the_command_line_starts_without_the_trainer_dependencies():
    """``espro --help`` and ``espro serve`` build the parser with every provider's commands;
    scikit-learn and matplotlib take seconds to import and only training commands need them."""
    code = (
        "import sys\nfrom serving.cli import build_parser\nbuild_parser()\n"
        "loaded = {'sklearn', 'mnist1d', 'matplotlib', 'torch'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_espro_serve_starts_ray_before_it_imports_torch():
    """``serving.launch.start`` imports torch in a thread while Ray starts; that saves seconds
    only if neither the command line nor the launcher has imported it already."""
    code = (
        "import sys, serving.launch\nfrom serving.cli import build_parser\nbuild_parser()\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
