"""The runtime and the trainer never import Ray: only the Serve application module may."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["serving.predictor", "serving.bundle", "serving.service", "serving.settings", "training.cli"],
)
def test_importing_does_not_import_ray(module):
    code = (
        f"import sys, {module}\n"
        "loaded = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_command_line_starts_without_scikit_learn():
    """``espro serve`` imports the CLI; scikit-learn takes seconds to import and only the
    data builders need it."""
    code = "import sys, training.cli\nassert 'sklearn' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_espro_serve_starts_ray_before_it_imports_torch():
    """``serving.launch.start`` imports torch in a thread while Ray starts; that saves seconds
    only if neither the command line nor the launcher has imported it already."""
    code = "import sys, training.cli, serving.launch\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)
