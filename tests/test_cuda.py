"""CUDA code paths. Skipped without a GPU (as in CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config
from serving.bundle import load_bundle
from serving.devices import resolve_device
from serving.errors import DeviceError
from serving.predictor import Predictor
from training.pipeline import train
from training.volume import log_volume

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_is_refused_clearly_without_a_gpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(DeviceError, match="device: device 'cuda' was asked for but CUDA"):
            resolve_device("cuda")


@cuda
def test_volume_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    vertices = [{"w": torch.randn(1000, generator=g)} for _ in range(4)]
    on_gpu = [{k: v.cuda() for k, v in vx.items()} for vx in vertices]
    assert log_volume(on_gpu).item() == pytest.approx(log_volume(vertices).item(), rel=1e-9)


@cuda
@pytest.mark.parametrize("architecture", ["mlp", "helpers:batchnorm_mlp"])
def test_training_on_cuda_gives_a_bundle_that_predicts_alike_on_cpu_and_cuda(
    tmp_path, architecture
):
    config = tiny_config(
        device="cuda",
        model={
            "architecture": architecture,
            "kwargs": {"hidden": 16} if ":" in architecture else {"hidden": [16]},
            "allow_custom": True,
        },
    )
    path, results = train(config, tmp_path / "bundle", workdir=tmp_path / "work")
    assert results["test"]["espro"]["calibrated"]["accuracy"] > 0.5
    bundle = load_bundle(path)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    on_cpu = Predictor(bundle, allow_custom_architecture=True).predict(x)
    on_gpu = Predictor(bundle, device="cuda", allow_custom_architecture=True).predict(x)
    torch.testing.assert_close(on_gpu.probs.cpu(), on_cpu.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        on_gpu.mutual_information.cpu(), on_cpu.mutual_information, atol=1e-5, rtol=0
    )
    # Resuming on CUDA from the checkpoints gives the finished vertices back unchanged.
    again, _ = train(config, tmp_path / "again", workdir=tmp_path / "work")
    assert load_bundle(again).manifest.simplexes == bundle.manifest.simplexes


@cuda
def test_lambda_search_and_diagnostics_run_on_cuda(tmp_path):
    config = tiny_config(
        device="cuda", simplex={"lambda": None, "search": {"grid": [0.01, 0.1, 1.0]}}
    )
    path, _ = train(config, tmp_path / "bundle")
    training = load_bundle(path).manifest.training
    assert training["lambda"] in (0.01, 0.1, 1.0)
    assert len(training["diagnostics"]) == 2


@cuda
@pytest.mark.parametrize("engine", ["fused:graphs", "shortcut:fp16,graphs", "auto"])
def test_predictor_on_cuda_with_graphs_matches_the_cpu_reference(
    tmp_path, make_tiny_bundle, engine
):
    tiny = make_tiny_bundle(num_vertices=(2, 3), draws=4)
    bundle = load_bundle(tiny.write(tmp_path / "bundle"))
    on_cpu = Predictor(bundle)
    on_gpu = Predictor(bundle, device="cuda", engine=engine)
    on_gpu.warm_up()
    tolerance = 2e-3 if "fp16" in engine else 1e-5
    for batch in (1, 5, 64, 100, 5):  # graphs for 1, 8 and 64 rows; 100 rows run eagerly
        x = torch.randn(batch, 4, generator=torch.Generator().manual_seed(batch))
        for draws in (None, 2):
            expected, got = on_cpu.predict(x, draws=draws), on_gpu.predict(x, draws=draws)
            for name in ("probs", "entropy", "mutual_information"):
                torch.testing.assert_close(
                    getattr(got, name).cpu(), getattr(expected, name), atol=tolerance, rtol=0
                )
