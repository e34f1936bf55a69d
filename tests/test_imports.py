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
