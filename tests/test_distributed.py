"""Simplexes grown as Ray tasks give the bundle that one process gives."""

from __future__ import annotations

import torch
import yaml

from helpers import tiny_config
from serving.bundle import load_bundle
from training.espro import SequentialRunner
from training.pipeline import train


def test_ray_tasks_train_the_same_weights_as_one_process(ray_cluster, tmp_path):
    from training.distributed import RayRunner

    # The λ search too: every (mode, λ) simplex is a task of its own.
    config = tiny_config(simplex={"lambda": None, "search": {"grid": [0.03, 0.3], "modes": 2}})
    one, _ = train(config, tmp_path / "one", runner=SequentialRunner())
    many, _ = train(config, tmp_path / "many", runner=RayRunner())
    a, b = load_bundle(one), load_bundle(many)
    assert a.manifest.training["lambda"] == b.manifest.training["lambda"]
    assert a.tensors.keys() == b.tensors.keys()
    for name, tensor in a.tensors.items():
        torch.testing.assert_close(b.tensors[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert [s.model_dump() for s in a.manifest.simplexes] == [
        s.model_dump() for s in b.manifest.simplexes
    ]


def test_the_cli_trains_on_ray(ray_cluster, tmp_path):
    from serving.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json", by_alias=True)))
    assert main(["train", str(config), "-o", str(tmp_path / "bundle"), "--ray"]) == 0
    assert len(load_bundle(tmp_path / "bundle").manifest.simplexes) == 2
