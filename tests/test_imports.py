"""What imports what: the runtime and the trainer never import Ray (only the Serve application
module may), the runtime never imports the trainer, and the command line stays cheap."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVING = Path(__file__).resolve().parents[1] / "serving"


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


def _imported(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_serving_imports_nothing_from_training():
    """A server installs without the trainer's dependencies; the trainer's commands reach
    ``espro`` through an entry point, never an import."""
    modules = sorted(SERVING.rglob("*.py"))
    assert SERVING / "cli.py" in modules
    found = {
        str(path.relative_to(SERVING)): trainer
        for path in modules
        if (trainer := {m for m in _imported(path) if m.split(".")[0] == "training"})
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
